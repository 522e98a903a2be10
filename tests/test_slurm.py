"""SLURM through submitit on a real one-node cluster: preemption (SIGUSR2) and `scontrol requeue`
(SIGTERM) resume to identical parameters in the same MLflow run; a sweep inside a SLURM job; sbatch
errors in one line; the local executor."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, tiny_params
from pipeline.launch import LaunchError, submit, wait
from pipeline.training import list_checkpoints

pytestmark = pytest.mark.slow
TRAIN = {"duration_nimg": 480, "checkpoint_nimg": 32, "status_nimg": 16}


def _params(tmp_path, fmnist, name):
    return tiny_params(tmp_path / name, fmnist, train=TRAIN, launcher={"cpus_per_task": 1, "timeout_min": 20})


def _final(params):
    run = Path(yaml.safe_load(Path(params).read_text())["train"]["run_dir"])
    return torch.load(list_checkpoints(run)[-1], weights_only=True)


def _check_same(ref, got, params):
    from mlflow.tracking import MlflowClient
    a, b = _final(ref), _final(params)
    assert a["nimg"] == b["nimg"] == TRAIN["duration_nimg"]
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    for ea, eb in zip(a["ema"]["emas"], b["ema"]["emas"]):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    client = MlflowClient(yaml.safe_load(Path(params).read_text())["tracking"]["uri"])
    steps = [m.step for m in client.get_metric_history(b["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(16, TRAIN["duration_nimg"] + 1, 16)), steps   # every step exactly once


def test_preemption_and_scontrol_requeue_resume_to_identical_parameters(slurm_cluster, tmp_path, fmnist):
    """Three jobs at once: the uninterrupted reference, one preempted (SIGUSR2: checkpoint, submitit
    requeues), one requeued by `scontrol requeue` (SIGTERM, then SLURM restarts it from disk). The
    reference runs as a SLURM job too (same environment, so results compare bitwise)."""
    params = {name: _params(tmp_path, fmnist, name) for name in ("ref", "usr2", "term")}
    jobs = {name: submit("train", [], str(p), executor="slurm", folder=tmp_path / name / "jobs")
            for name, p in params.items()}
    run_ids, t = {}, time.time()
    while len(run_ids) < 2 and time.time() - t < 240:
        for name, how in (("usr2", ["scancel", "--signal=USR2"]), ("term", ["scontrol", "requeue"])):
            run = Path(yaml.safe_load(params[name].read_text())["train"]["run_dir"])
            if name not in run_ids and list_checkpoints(run):
                assert not (run / "train_summary.json").is_file(), f"{name} finished before it could be interrupted"
                subprocess.run([*how, jobs[name].job_id], check=True)   # preemption / time-limit warning; requeue
                run_ids[name] = (run / "mlflow_run_id").read_text()
        time.sleep(0.2)
    assert len(run_ids) == 2, f"only {sorted(run_ids)} reached a checkpoint mid-run"
    results = {name: wait(s) for name, s in jobs.items()}
    usr2_log = jobs["usr2"].stdout.read_text() + jobs["usr2"].stderr.read_text()
    assert "SIGUSR2" in usr2_log and "resuming from" in usr2_log, usr2_log[-3000:]
    assert "resuming from" in jobs["term"].stdout.read_text()
    for name in ("usr2", "term"):
        assert results[name]["nimg"] == TRAIN["duration_nimg"] and results[name]["mlflow_run_id"] == run_ids[name]
        _check_same(params["ref"], results[name], params[name])


def test_sweep_inside_a_slurm_job(slurm_cluster, tmp_path, fmnist):
    tiny_params(tmp_path, fmnist)
    sweep = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    sweep["search"] = {"train.ref_lr": {"grid": [0.005, 0.02]}}            # 2 trials, one per CPU
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "sweep", "sweep.yaml", "--executor", "slurm",
                        "--cpus", "2", "--wait"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "submitted job" in r.stdout and "squeue -j" in r.stdout
    table = pd.read_csv(tmp_path / "reports/sweeps/tiny/results.csv")
    assert len(table) == 6 and table["trial_id"].nunique() == 2 and table["fid"].notna().all()
    assert set(table["node"]) == {"localhost"} or set(table["node"]) == {os.uname().nodename}


def test_sbatch_errors_in_one_line(slurm_cluster, tmp_path, fmnist):
    params = _params(tmp_path, fmnist, "bad")
    with pytest.raises(LaunchError) as e:
        submit("train", [], str(params), executor="slurm", folder=tmp_path / "j1",
               launcher_overrides={"partition": "nope"})
    assert "invalid partition" in str(e.value).lower() and "\n" not in str(e.value)
    with pytest.raises(LaunchError) as e:
        submit("train", [], str(params), executor="slurm", folder=tmp_path / "j2",
               launcher_overrides={"gpus_per_node": 8})
    assert "gres" in str(e.value).lower() and "\n" not in str(e.value)


def test_dvc_stage_command_through_slurm_waits_and_propagates_exit(slurm_cluster, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "pipeline", "submit", "cmd", "--executor", "slurm", "--wait",
                         "--folder", str(tmp_path / "ok"), "--", "python3", "-c", "open('done.txt','w').write('1')"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and (tmp_path / "done.txt").read_text() == "1", ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "pipeline", "submit", "cmd", "--executor", "slurm", "--wait",
                          "--folder", str(tmp_path / "bad"), "--", "false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "exited with 1" in bad.stderr


def test_no_slurm_suggests_local_executor_and_local_runs(tmp_path, fmnist):
    params = tiny_params(tmp_path, fmnist, train={"duration_nimg": 32}, tracking={"enabled": False})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": os.path.dirname(sys.executable)}   # no sbatch here
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "train", "--params", str(params),
                        "--executor", "slurm"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no `sbatch`" in r.stderr and "--executor local" in r.stderr   # bad input: exit 2
    s = submit("train", [], str(params), executor="local", folder=tmp_path / "local")
    assert wait(s)["nimg"] == 32
