"""DVC stage: train the run described by params.yaml (method.md 2, 3, 6), or resume it.

Rerunning the same command resumes from the newest checkpoint in train.run_dir. With
launcher.nproc_per_node > 1 (or --nproc-per-node) the stage starts itself under torchrun (DDP: NCCL
on GPUs, gloo on CPU); under an existing torchrun/srun it just trains. SIGTERM / SIGUSR2 / Ctrl-C
write a checkpoint and exit with code 75 (resumable).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from pipeline import cli
from pipeline.devices import use_given_cpus
from pipeline.io import RunLock, check_writable
from pipeline.checkpoints import list_checkpoints, load_latest_checkpoint
from pipeline.errors import TrainingError
from pipeline.training import TrainHooks, train
from pipeline.workspace import link_run_dir

EXIT_STOPPED = 75          # EX_TEMPFAIL: stopped on request, rerun to resume


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.train", __doc__)
    p.add_argument("--nproc-per-node", type=cli.positive_int, help="processes per node (default: launcher.nproc_per_node)")
    p.add_argument("--on-mismatch", choices=["refuse", "archive"], default="refuse",
                   help="when train.run_dir holds a run of another configuration: refuse (default), or move it "
                        "aside to <run_dir>.<time> and start afresh (what `dvc exp run -S ...` needs)")
    p.add_argument("--stage", default=None, help="DVC stage name to tag the MLflow run with")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics", help="also write the training summary's numbers here (a git-tracked DVC metrics "
                   "file, e.g. metrics/train.json, so `dvc exp show` has training columns)")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        if args.metrics:                           # before any training: an unwritable file would lose the summary
            check_writable(args.metrics, "--metrics", folder=False)
        if int(os.environ.get("RANK", "0")) == 0:
            link_run_dir(cfg)                      # in a DVC experiment copy: the project's run, by run key
        nproc = args.nproc_per_node or cfg.launcher.nproc_per_node
        if cfg.launcher.nnodes > 1 and "LOCAL_RANK" not in os.environ:
            raise TrainingError(f"launcher.nnodes={cfg.launcher.nnodes} is for SLURM (`python -m pipeline submit train "
                                f"--executor slurm`); without SLURM start `torchrun --nnodes {cfg.launcher.nnodes} "
                                f"--node-rank R --master-addr HOST ... -m stages.train` on every node (docs/scaling.md)")
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return cli.torchrun_self("stages.train", nproc, argv if argv is not None else sys.argv[1:])
        if int(os.environ.get("RANK", "0")) == 0:
            use_given_cpus(log=print)               # "cpu: N threads (...)", and a busy-machine warning
        if args.on_mismatch == "archive" and int(os.environ.get("RANK", "0")) == 0:
            _archive_if_mismatched(cfg)
        from pipeline.tracking.logger import training_run_name
        name = training_run_name(cfg, "dvc" if args.stage else "local", args.params)
        res = train(cfg, TrainHooks(stage=args.stage, progress=not args.no_progress, run_name=name))
        if args.metrics and int(os.environ.get("RANK", "0")) == 0:
            _write_metrics(Path(cfg.train.run_dir) / "train_summary.json", Path(args.metrics))
        return 0 if res.status == "finished" else EXIT_STOPPED
    return cli.run("train", go)


TRAIN_METRICS = ("final_loss", "images_per_s")        # the headline; train_summary.json has the rest


def _write_metrics(summary_file: Path, out: Path) -> None:
    """The numbers of train_summary.json (which lives in the git-ignored run folder) in a small file
    beside metrics/fid.json, which git (and so `dvc exp show`) tracks."""
    import json

    from pipeline.io import atomic_write_text
    summary = json.loads(summary_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {k: summary.get(k) for k in TRAIN_METRICS}
    if head["final_loss"] is not None:                 # 4 decimals: a narrow `dvc exp show` column
        head["final_loss"] = round(head["final_loss"], 4)
    atomic_write_text(json.dumps(head, indent=2), out)


def _archive_if_mismatched(cfg) -> None:
    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_dir() or not list_checkpoints(run_dir):
        return
    with RunLock(run_dir):                         # never move a folder another process is writing
        try:
            load_latest_checkpoint(run_dir, cfg, log=lambda *a: None)
            return
        except TrainingError as err:
            reason = err
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), aside)
    print(f"train: {run_dir} held another configuration; moved it to {aside} ({reason})")


if __name__ == "__main__":
    sys.exit(main())
