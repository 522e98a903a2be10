"""Hundreds of trials through the sweep's own orchestration, with a stub trial: a real local Ray Tune run
(random search, the driver, trial records, MLflow parent / trial / EMA runs through the project's
logger, closing, the results table, report and figures), where each trial skips training and FID and
writes records drawn from its seed. What it measures is what grows with the number of trials:

- sweep wall time, and per trial;
- the results table + report (`write_results`), budget REPORT_BUDGET_S at 200 trials;
- `python -m pipeline runs --sweep <name>` (a fresh process, as a user types it), budget RUNS_BUDGET_S;
- an MLflow search of every run of the experiment, and the size of one trial run's row.

`python -m benchmarks.sweep_scale --trials 200` writes reports/bench/sweep_scale-cpu.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import yaml

from benchmarks.common import parser, write

ROOT = Path(__file__).resolve().parents[1]
REPORT_BUDGET_S = 10.0
RUNS_BUDGET_S = 5.0
EMA_LENGTHS = [0.05, 0.10, 0.15]


def stub_trial(job: dict, report) -> None:
    """A trial without training or FID, behind the real orchestration: the trial's MLflow run (searched
    values + run key as params, config.yaml as its artifact, as training logs them), its records and EMA
    child runs (tracking.log_ema_runs), its state, and Tune reports at two 'snapshots' and the end."""
    import numpy as np

    from pipeline.config import yaml_dump
    from pipeline.io import atomic_write_text
    from pipeline.records import FIDRecord
    from pipeline.sweep.trial import write_trial_state
    from pipeline.tracking.logger import RunLogger, log_ema_runs, run_tags
    cfg, spec, trial_dir = job["config"], job["spec"], Path(job["trial_dir"])
    run_dir = trial_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml_dump(cfg), run_dir / "config.yaml")
    logger = RunLogger(cfg, quiet=True)
    run_id = logger.start(None, run_name=f"trial-{job['trial_id']}",
                          tags={**run_tags("sweep"), "run_key": cfg.run_key()},
                          params={**job["values"], "run_key": cfg.run_key()}, parent_run_id=spec.parent_run_id,
                          on_run_id=lambda rid: atomic_write_text(rid, run_dir / "mlflow_run_id"))
    logger.log_artifact(run_dir / "config.yaml")
    rng = np.random.default_rng(zlib.crc32(job["trial_id"].encode()))    # str hash() differs per process
    lr = float(job["values"].get("train.ref_lr", 0.01))
    for nimg, loss in ((32, 1.0), (64, 0.8)):
        logger.log_metrics({"loss": loss + abs(np.log10(lr) + 2) * 0.1}, step=nimg)
        write_trial_state(trial_dir, nimg=nimg, loss=loss, updated_at=time.time())
        report({"nimg": nimg, "loss": loss})
    records = []
    for s in EMA_LENGTHS:                                     # the FID curve's shape, with bootstrap replicates
        fid = 100 + 200 * abs(np.log10(lr) + 2) + 400 * (s - 0.09) ** 2 + rng.normal(0, 1)
        reps = (fid + rng.normal(0, 2, 64)).tolist()
        records.append(FIDRecord(
            fid=float(fid), feature_net="inception", feature_net_sha256="0" * 64, mode="clean", num_images=4,
            reference="test", reference_sha256="1" * 64, ref_num_images=8,
            sampler={"steps": 4, "nfe": 7, "solver": "heun", "churn": 0, "rho": 7, "sigma_min": 0.002,
                     "sigma_max": 80, "guidance": 1.0}, seeds=[0, 3],
            model_file=str(trial_dir / "ema" / f"phema-0000000064-{s:.3f}.safetensors"), sigma_rel=s, nimg=64,
            fid_se=2.0, fid_ci95=[float(fid) - 4, float(fid) + 4], kid=0.1,
            bootstrap={"resamples": 64, "seed": 0, "replicates": reps}).to_dict())
    atomic_write_text(json.dumps(records), trial_dir / "fid_records.json")
    log_ema_runs(logger, run_id, records, None)
    best = min(records, key=lambda r: r["fid"])
    logger.log_summary({"best_fid": best["fid"], "best_sigma_rel": best["sigma_rel"]})
    atomic_write_text(json.dumps({"status": "finished", "nimg": 64, "final_loss": 0.8,
                                  "mlflow_run_id": run_id}), run_dir / "train_summary.json")
    write_trial_state(trial_dir, status="finished", nimg=64, best_fid=best["fid"], best_sigma_rel=best["sigma_rel"],
                      ended_at=time.time())
    report({"nimg": 64, "loss": 0.8, "best_fid": best["fid"], "done": True})


def run(trials: int, workdir: Path, concurrent: int = 2) -> dict:
    """The stub sweep of `trials` trials in workdir (a project folder with params.yaml); the figures."""
    from pipeline.sweep.driver import run_sweep
    from pipeline.sweep.results import results_table, write_results
    from pipeline.sweep.schema import load_sweep
    from pipeline.sweep.plan import plan
    sweep = {"name": f"scale{trials}", "search": {"train.ref_lr": {"loguniform": [0.001, 0.1]}},
             "algorithm": "random", "num_samples": trials, "ema_lengths": EMA_LENGTHS, "max_concurrent": concurrent,
             "experiment": "sweep-scale", "storage": "runs/sweeps"}
    sweep_file = workdir / "scale.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    # Ray's workers start in the project folder: they import the stub from this repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        t0 = time.time()
        res = run_sweep(sweep_file, num_cpus=concurrent, trial_body="benchmarks.sweep_scale:stub_trial")
        wall = time.time() - t0
        spec, base = load_sweep(sweep_file)
        exp_dir = workdir / "runs" / "sweeps" / spec.name
        t1 = time.time()
        table = results_table(exp_dir / "trials", spec, {}, plan(spec, base))
        assert table["trial_id"].nunique() == trials, "the table lost trials"
        write_results(table, workdir / "reports" / "again", spec)      # the table + figures + report, again
        report_s = time.time() - t1
    finally:
        os.chdir(cwd)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t2 = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--sweep", spec.name, "--experiment", "sweep-scale"],
                         cwd=workdir, env=env, capture_output=True, text=True)
    runs_s = time.time() - t2
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    from mlflow.tracking import MlflowClient
    from pipeline.sweep.driver import sweep_tracking_uri
    client = MlflowClient(sweep_tracking_uri(base))
    exp = client.get_experiment_by_name("sweep-scale")
    t3 = time.time()
    found = client.search_runs([exp.experiment_id], max_results=5000)
    search_s = time.time() - t3
    trial_runs = [r for r in found if r.data.tags.get("mlflow.runName", "").startswith("trial-")]
    row_bytes = max(len(json.dumps({"params": r.data.params, "metrics": r.data.metrics, "tags": r.data.tags}))
                    for r in trial_runs)
    statuses = sorted({r.info.status for r in found})
    return {"trials": trials, "max_concurrent": concurrent, "finished": int(res.table.loc[res.table["status"] == "finished", "trial_id"].nunique()),
            "sweep_wall_s": round(wall, 1), "per_trial_s": round(wall / trials, 2),
            "report_s": round(report_s, 2), "report_budget_s": REPORT_BUDGET_S,
            "pipeline_runs_s": round(runs_s, 2), "pipeline_runs_budget_s": RUNS_BUDGET_S,
            "mlflow_runs": len(found), "mlflow_search_s": round(search_s, 2), "trial_run_row_bytes": row_bytes,
            "mlflow_statuses": statuses, "runs_lines": len(out.stdout.splitlines())}


def project(workdir: Path, dataset_dir: str | None = None) -> Path:
    """A project folder: the repository's params.yaml with its MLflow store inside the folder, the encoded
    data of the project (or dataset_dir) and a small FID reference (the stub measures nothing)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    raw["data"]["dataset_dir"] = str(Path(dataset_dir or ROOT / raw["data"]["dataset_dir"]).resolve())
    raw["data"]["path"] = str((ROOT / raw["data"]["path"]).resolve())
    raw["metrics"].update(num_images=4, ref_num_images=8)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    return workdir


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--dataset-dir", help="encoded dataset folder (default: data.dataset_dir of params.yaml)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        figures = run(8 if args.smoke else args.trials, project(Path(d), args.dataset_dir))
    figures["within_budgets"] = figures["report_s"] <= REPORT_BUDGET_S and figures["pipeline_runs_s"] <= RUNS_BUDGET_S
    write("sweep_scale", args, figures)


if __name__ == "__main__":
    main()
