"""Sweep overhead: seconds from the sweep command's start to the first trial's first training step,
and per-trial overhead (trial wall time minus its training time), on a local Ray instance."""
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

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--sweep", default=str(ROOT / "sweeps" / "tiny.yaml"))
    p.add_argument("--dataset-dir", help="encoded dataset folder (default: data.dataset_dir of params.yaml)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["data"]["dataset_dir"] = str(Path(args.dataset_dir or ROOT / raw["data"]["dataset_dir"]).resolve())
        raw["tracking"]["uri"] = f"sqlite:///{d / 'mlflow.db'}"
        (d / "params.yaml").write_text(yaml.safe_dump(raw))
        sweep = yaml.safe_load(Path(args.sweep).read_text())
        if args.smoke:
            sweep["search"] = {"train.ref_lr": {"grid": [0.01]}}      # one trial
            sweep["ema_lengths"] = [0.1]
        (d / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pipeline", "sweep", "sweep.yaml"], cwd=d, env=env, check=True,
                       capture_output=True)
        wall = time.time() - t0
        trials = sorted((d / "runs" / "sweeps" / sweep["name"] / "trials").glob("*"))
        first_steps, overheads = [], []
        for t in trials:
            rows = [json.loads(l) for l in (t / "run" / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((t / "run" / "train_summary.json").read_text())
            first_steps.append(rows[0]["time"])
            start = (t / "worker.pid").stat().st_mtime
            end = (t / "fid_records.json").stat().st_mtime
            overheads.append((end - start) - summary["seconds"])
        shutil.rmtree(d / "runs", ignore_errors=True)
    write("sweep", args, {"trials": len(trials), "sweep_wall_s": round(wall, 1),
                          "start_to_first_logged_step_s": round(min(first_steps) - t0, 1),
                          "per_trial_overhead_s": round(sum(overheads) / len(overheads), 1),
                          "note": "overhead = trial wall time minus training time: EMA fan-out (reconstruct + FID) "
                                  "and process start; the first logged step is at the first status interval"})


if __name__ == "__main__":
    main()
