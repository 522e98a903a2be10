"""`python -m pipeline sweep promote SWEEP`: from a finished sweep to the long run.

The chosen trial (the sweep's best FID unless --trial) gives its searched values, and the EMA length
of its best record (unless --sigma-rel) becomes `ema.targets`; --duration-nimg sets the long run's
length. They are written into params.yaml (comments and order kept) or queued as a DVC experiment
(`dvc exp run --queue -S ...`). The sweep's fixed `overrides` (its small network, short training) are
not copied: they describe the sweep, not the long run. What changed is printed, value by value, and
whether the winner is resolved from the other trials (paired 95 % interval, method.md 8).
"""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from ..config import ConfigError, flatten, load_config
from ..errors import SweepError
from ..io import atomic_write_text
from .trial_state import read_trial_state


def sweep_folder(sweep: str, storage: str | Path = "runs/sweeps") -> Path:
    """A sweep's folder from its name, its folder, or its sweep file (name and storage read from it)."""
    p = Path(sweep)
    if p.is_file():
        from .schema import load_sweep
        cfg, _ = load_sweep(p)
        return Path(cfg.storage) / cfg.name
    folder = p if (p / "trials").is_dir() else Path(storage) / sweep
    if not (folder / "trials").is_dir():
        raise SweepError(f"no sweep {sweep!r}: {folder / 'trials'} does not exist (give the sweep's name, its "
                         f"folder or its sweep file; --storage if it is not under {storage})")
    return folder


def finished_trials(folder: Path) -> dict[str, dict]:
    """{trial: {"values", "records"}} for every trial with results (finished, or early-stopped with records)."""
    from ..records import computed, read_records
    out = {}
    for t in sorted((folder / "trials").iterdir()):
        if (t / "fid_records.json").is_file():
            out[t.name] = {"values": read_trial_state(t).get("params") or {},
                           "records": computed(read_records(t / "fid_records.json", "trial records"))}
    if not out:
        raise SweepError(f"sweep {folder.name}: no trial has results yet (nothing to promote)")
    return out


def choose(trials: dict[str, dict], trial: str | None, sigma_rel: float | None) -> tuple[str, dict, list[str]]:
    """(trial, its record at the chosen EMA length, what the ranking resolves) for --trial/--sigma-rel."""
    from ..stats import rank
    if trial is not None and trial not in trials:
        raise SweepError(f"--trial {trial}: not a trial with results (those: {', '.join(trials)})")
    bests = {name: min(t["records"], key=lambda r: r["fid"]) for name, t in trials.items()}
    names = list(bests)
    res = rank([bests[n] for n in names])
    winner = names[res["best"]]
    tied = [names[i] for i in res["tied"] if names[i] != winner]
    chosen = trial or winner
    notes = [f"the sweep's best: trial {winner} (FID {bests[winner]['fid']:.2f}); "
             + (f"not resolved from it (paired 95% interval contains 0): {', '.join(tied)}" if tied
                else "resolved from every other trial")]
    recs = trials[chosen]["records"]
    if sigma_rel is None:
        rec = min(recs, key=lambda r: r["fid"])
    else:
        rec = next((r for r in recs if abs(r["sigma_rel"] - sigma_rel) < 1e-9), None)
        if rec is None:
            have = ", ".join(f"{r['sigma_rel']:g}" for r in recs)
            raise SweepError(f"--sigma-rel {sigma_rel}: trial {chosen} has no result at it (its EMA lengths: {have})")
    return chosen, rec, notes


def promoted_values(trial_values: dict, rec: dict, duration_nimg: int | None) -> dict:
    values = {k: v for k, v in trial_values.items()}
    values["ema.targets"] = [float(rec["sigma_rel"])]
    if duration_nimg is not None:
        values["train.duration_nimg"] = int(duration_nimg)
    return values


def changes(params: Path, values: dict) -> list[tuple[str, object, object]]:
    """(key, current value, new value) for every value that differs from params.yaml's (checked by the schema)."""
    load_config(params, [f"{k}={json.dumps(v)}" for k, v in values.items()])       # bad values fail here
    current = flatten(load_config(params).to_dict())
    return [(k, current.get(k), v) for k, v in values.items() if current.get(k) != v]


def write_params(params: Path, values: dict) -> None:
    """Set dotted keys in params.yaml, keeping its comments and order (a round-trip YAML edit)."""
    from ruamel.yaml import YAML
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(params.read_text())
    for key, value in values.items():
        node, parts = doc, key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    import io
    buf = io.StringIO()
    yaml.dump(doc, buf)
    atomic_write_text(buf.getvalue(), params)


def promote(sweep: str, params: str | Path = "params.yaml", trial: str | None = None, sigma_rel: float | None = None,
            duration_nimg: int | None = None, queue: bool = False, storage: str | Path = "runs/sweeps",
            name: str | None = None) -> list[str]:
    """Promote a sweep's trial; returns the lines to print."""
    params = Path(params)
    if not params.is_file():
        raise ConfigError(f"{params}: no such params file (run from the project folder, or give --params)")
    folder = sweep_folder(sweep, storage)
    trials = finished_trials(folder)
    chosen, rec, notes = choose(trials, trial, sigma_rel)
    values = promoted_values(trials[chosen]["values"], rec, duration_nimg)
    diff = changes(params, values)
    se = f" +- {rec['fid_se']:.2f}" if rec.get("fid_se") is not None else ""
    out = [f"promote: sweep {folder.name}, trial {chosen}, sigma_rel {rec['sigma_rel']:g} (FID {rec['fid']:.2f}{se})",
           *notes]
    out += [f"  {k}: {old!r} -> {new!r}" for k, old, new in diff] or ["  nothing changes: params.yaml has these values"]
    if queue:
        sets = [a for k, v in values.items() for a in ("-S", f"{k}={json.dumps(v)}")]
        cmd = ["dvc", "exp", "run", "--queue", *(["--name", name] if name else []), *sets]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SweepError(f"`{shlex.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        out.append(f"queued as a DVC experiment: {shlex.join(cmd)} (start it with `dvc queue start`)")
    elif diff:
        write_params(params, {k: new for k, _, new in diff})
        out.append(f"written to {params} (review with `git diff {params}`, then `dvc repro`)")
    return out
