"""What the sweep orchestration adds to its trials: the same tiny trials (8 channels, 64 training images,
2 EMA lengths, a 4-image FID; random search over train.ref_lr; 2 concurrent on a local Ray instance)
through the pipeline (`python -m pipeline sweep`) and through a bare Ray Tune script calling the same
training and evaluation functions (benchmarks/bare_tune.py: no MLflow, records, table or report; at
Ray's defaults and with reuse_actors), one after the other in one run, at each trial count. Writes reports/bench/sweep_overhead-<device>.json:
the wall-time ratio pipeline / the faster bare script and, per side, the phases

- driver start: the command's start to the first trial (imports, Ray, encoded data, reference
  statistics, MLflow parent run);
- per trial (trial.json "phases", bare: its own timers): worker start (a fresh worker's imports; 0
  when Ray reuses it), training, validation, evaluation (reconstruction + sampling + features),
  tracking (MLflow), figures, other (checkpoints, snapshots, trial records, reports to Tune);
- trials: the first trial's start to the last one's end, and the share of it max_concurrent trials ran;
- report: results table, figures, report, closing the runs; exit: the report's end to the process's.

    python -m benchmarks.sweep_overhead --trials 4 32
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import parser, write
from pipeline.sweep.results import PHASES         # trial.json's phases, as the sweep report sums them

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2                  # pipeline / bare at 32 trials (issue: sweeps at scale)
TINY = {"network.model_channels": 8, "network.channel_mult": [1, 2], "network.num_blocks": 1,
        "network.attn_resolutions": [], "network.channels_per_head": 8,
        "train.batch_size": 16, "train.duration_nimg": 64, "train.checkpoint_nimg": 32, "train.status_nimg": 16,
        "train.rampup_nimg": 32, "train.sample_nimg": None, "train.amp": "none", "ema.snapshot_nimg": 32,
        "sampler.steps": 4, "sampler.amp": "none", "metrics.num_images": 4, "metrics.ref_num_images": 8,
        "metrics.names": ["fid"]}
EMA_LENGTHS = [0.05, 0.10]
LR_RANGE = [0.003, 0.03]
MAX_CONCURRENT = 2


def _workdir(d: Path, dataset_dir: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = dataset_dir
    raw["data"]["path"] = str((ROOT / raw["data"]["path"]).resolve())
    raw["tracking"]["uri"] = f"sqlite:///{d / 'mlflow.db'}"
    (d / "params.yaml").write_text(yaml.safe_dump(raw))


def _spans(rows: list[dict]) -> dict:
    """Per-trial phases summed, the trials' wall time, and how full the max_concurrent slots were."""
    rows = [r for r in rows if r.get("started_at") and r.get("ended_at")]
    # A trial's wall time: its worker's start (before the trial function runs) + start to end.
    wall = sum(r["ended_at"] - r["started_at"] + (r.get("phases") or {}).get("worker_start", 0.0) for r in rows)
    sums = {p: sum((r.get("phases") or {}).get(p, 0.0) for r in rows) for p in PHASES}
    sums["other"] = max(wall - sum(sums.values()), 0.0)
    first, last = min(r["started_at"] for r in rows), max(r["ended_at"] for r in rows)
    return {"n": len(rows), "wall": wall, "sums": sums, "first": first, "last": last,
            "busy": wall / (MAX_CONCURRENT * (last - first)) if last > first else None}


def _breakdown(t0: float, t_end: float, times: dict, spans: dict) -> dict:
    n = max(spans["n"], 1)
    return {"wall_s": round(t_end - t0, 1),
            "driver_start_s": round(spans["first"] - t0, 1),
            "trials_s": round(spans["last"] - spans["first"], 1),
            "slots_busy": round(spans["busy"], 3) if spans["busy"] is not None else None,
            "per_trial_s": {p: round(v / n, 2) for p, v in spans["sums"].items()},
            "trial_wall_per_trial_s": round(spans["wall"] / n, 2),
            "report_s": round(times["report_ended_at"] - times["trials_ended_at"], 1),
            "exit_s": round(t_end - times["report_ended_at"], 1)}


def run_pipeline(d: Path, trials: int, env: dict) -> dict:
    sweep = {"name": f"overhead-{trials}", "base": "params.yaml", "overrides": TINY,
             "search": {"train.ref_lr": {"loguniform": LR_RANGE}}, "ema_lengths": EMA_LENGTHS,
             "algorithm": "random", "num_samples": trials, "seed": 0, "max_concurrent": MAX_CONCURRENT,
             "resources": {"cpus": 1, "gpus": 0}, "experiment": "overhead", "storage": "runs/sweeps"}
    (d / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "sweep.yaml", "--num-cpus", "2"], cwd=d,
                         env=env, capture_output=True, text=True)
    t_end = time.time()
    if out.returncode:
        raise SystemExit(f"pipeline sweep failed ({out.returncode}):\n{out.stderr[-3000:]}")
    exp = d / "runs" / "sweeps" / sweep["name"]
    rows = [json.loads((t / "trial.json").read_text()) for t in sorted((exp / "trials").iterdir())]
    times = json.loads((exp / "sweep_state.json").read_text())
    return _breakdown(t0, t_end, times, _spans(rows))


def run_bare(d: Path, trials: int, env: dict, reuse: bool = False) -> dict:
    work = d / f"bare-{trials}{'-reuse' if reuse else ''}"
    work.mkdir()
    shutil.copy(d / "params.yaml", work / "params.yaml")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "benchmarks.bare_tune", "--workdir", str(work), "--trials",
                          str(trials), "--overrides", json.dumps({**TINY, "ema.targets": EMA_LENGTHS}),
                          "--lr-range", *map(str, LR_RANGE), *(["--reuse-actors"] if reuse else [])], cwd=ROOT, env=env, capture_output=True, text=True)
    t_end = time.time()
    if out.returncode:
        raise SystemExit(f"bare Ray Tune script failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rows = [json.loads((t / "phases.json").read_text()) for t in sorted((work / "bare").iterdir())
            if (t / "phases.json").is_file()]
    return _breakdown(t0, t_end, json.loads((work / "bare_times.json").read_text()), _spans(rows))


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--trials", type=int, nargs="+", default=[4, 32])
    p.add_argument("--dataset-dir", help="encoded dataset folder (default: data.dataset_dir of params.yaml)")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials = [2]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dataset_dir = str(Path(args.dataset_dir or ROOT / raw["data"]["dataset_dir"]).resolve())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    runs = []
    for n in args.trials:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            _workdir(d, dataset_dir)
            print(f"{n} trials: pipeline ...", flush=True)
            pipe = run_pipeline(d, n, env)
            print(f"{n} trials: bare Ray Tune (Ray's defaults) ...", flush=True)
            bare = run_bare(d, n, env)
            print(f"{n} trials: bare Ray Tune with reuse_actors ...", flush=True)
            reuse = run_bare(d, n, env, reuse=True)
        # the ratio against the faster bare script: the pipeline's own choices (reuse_actors) do not count for it
        ratio = pipe["wall_s"] / min(bare["wall_s"], reuse["wall_s"])
        runs.append({"trials": n, "ratio": round(ratio, 3), "ratio_vs_ray_defaults": round(pipe["wall_s"] / bare["wall_s"], 3),
                     "pipeline": pipe, "bare": bare, "bare_reuse_actors": reuse})
        print(f"{n} trials: pipeline {pipe['wall_s']} s, bare {bare['wall_s']} s (reuse_actors {reuse['wall_s']} s), "
              f"ratio {ratio:.2f}", flush=True)
    at = next((r for r in runs if r["trials"] == 32), None)
    write("sweep_overhead", args, {
        "runs": runs, "target_ratio_at_32": TARGET_RATIO,
        "met": (at["ratio"] <= TARGET_RATIO) if at else None,
        "trial": {"overrides": TINY, "ema_lengths": EMA_LENGTHS, "search": {"train.ref_lr": {"loguniform": LR_RANGE}},
                  "max_concurrent": MAX_CONCURRENT}})
    for r in runs:                                               # the README's table
        print(table(r))


def table(run: dict) -> str:
    """The per-phase comparison as a markdown table (seconds; trial phases per trial)."""
    sides = [run["pipeline"], run["bare"], run["bare_reuse_actors"]]
    lines = [f"| {run['trials']} trials (ratio {run['ratio']:.2f}) | pipeline | bare Ray Tune | bare + reuse_actors |",
             "| --- | --- | --- | --- |"]

    def row(label, get):
        return f"| {label} | " + " | ".join(f"{get(x)} s" for x in sides) + " |"
    lines += [row("wall time", lambda x: x["wall_s"]), row("driver start", lambda x: x["driver_start_s"]),
              row("trials (first start to last end)", lambda x: x["trials_s"])]
    lines += [row(f"per trial: {p.replace('_', ' ')}", lambda x, p=p: x["per_trial_s"][p]) for p in (*PHASES, "other")]
    lines += [row("report", lambda x: x["report_s"]), row("exit", lambda x: x["exit_s"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
