"""The project's own stores when a stage runs in one of DVC's experiment copies.

`dvc exp run --queue` (and `--temp`) runs the pipeline in a copy of the repository under
`<project>/.dvc/tmp/exps/...` that has only what git and DVC track: the git-ignored training runs and
MLflow store are not there. Without care, every queued experiment would retrain from scratch and log
to a new MLflow database inside a folder DVC deletes afterwards. Here the MLflow store (a relative or
default sqlite file) resolves to the project's, and a training run lives in the project's run store,
by run key: the copy's `train.run_dir` becomes a link to it, so an experiment whose training params
match an existing run reuses its checkpoints and snapshots (a sampler change reruns evaluation only),
two experiments with different training params never share a folder, and a repeated one resumes.
"""
from __future__ import annotations

import os
from pathlib import Path

EXPS = (".dvc", "tmp", "exps")                 # where DVC makes its experiment copies


def project_root(cwd: str | Path | None = None) -> Path:
    """The project folder: the repository an experiment copy was made from, else `cwd` itself."""
    here = Path(cwd or Path.cwd()).resolve()
    if os.environ.get("EDM2_PROJECT_ROOT"):
        return Path(os.environ["EDM2_PROJECT_ROOT"]).resolve()
    parts = here.parts
    for i in range(len(parts) - len(EXPS) + 1):
        if parts[i:i + len(EXPS)] == EXPS:
            return Path(*parts[:i])
    return here


def in_experiment_copy(cwd: str | Path | None = None) -> bool:
    return project_root(cwd) != Path(cwd or Path.cwd()).resolve()


def shared_path(path: str | Path) -> Path:
    """A relative path of the project's shared stores, resolved against the project (not the copy)."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


def keyed_run_dir(cfg) -> Path:
    """The project's folder for this training: train.run_dir there when it holds a run of the same run
    key (the baseline's), else runs/keyed/<run key>."""
    home = shared_path(cfg.train.run_dir)
    return home if run_key_of(home) == cfg.run_key() else project_root() / "runs" / "keyed" / cfg.run_key()


def run_key_of(run_dir: Path) -> str | None:
    """The run key a training folder holds (its run_key file, or its summary's), None when unknown."""
    import json
    try:
        if (run_dir / "run_key").is_file():
            return (run_dir / "run_key").read_text().strip()
        return json.loads((run_dir / "train_summary.json").read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):            # missing, torn or foreign: not this run
        return None


def link_run_dir(cfg, log=print) -> Path | None:
    """In an experiment copy: make the copy's train.run_dir a link to the project's folder for this run
    (created when new). Outside one, or when the run folder is already there: nothing."""
    if not in_experiment_copy() or Path(cfg.train.run_dir).is_absolute():
        return None
    local = Path(cfg.train.run_dir)
    if local.is_symlink() or local.exists():
        return None
    target = keyed_run_dir(cfg)
    target.mkdir(parents=True, exist_ok=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.symlink_to(target, target_is_directory=True)
    log(f"experiment copy: {local} -> {target} (the project's run store, by run key {cfg.run_key()[:8]})")
    return target
