"""SLURM through submitit on a real one-node cluster: preemption (SIGUSR2) and `scontrol requeue`
(SIGTERM) resume to identical parameters in the same MLflow run; a sweep inside a SLURM job; sbatch
errors in one line; the local executor."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, assert_same_training, final_state, interrupt_at_first_checkpoint, tiny_params
from pipeline.launch import LaunchError, submit, wait

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]   # one SLURM cluster at a time (pytest-xdist)
TRAIN = {"duration_nimg": 480, "checkpoint_nimg": 32, "status_nimg": 16}


def _params(tmp_path, fmnist, name):
    return tiny_params(tmp_path / name, fmnist, train=TRAIN, launcher={"slurm": {"cpus_per_task": 1}, "timeout_min": 20})


def _check_same(ref, got, params):
    from mlflow.tracking import MlflowClient
    a, b = final_state(ref), final_state(params)
    assert a["nimg"] == b["nimg"] == TRAIN["duration_nimg"]
    assert_same_training(a, b, str(params))
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
    run_ids = interrupt_at_first_checkpoint({       # preemption / time-limit warning; `scontrol requeue`
        "usr2": (jobs["usr2"], params["usr2"], ["scancel", "--signal=USR2"]),
        "term": (jobs["term"], params["term"], ["scontrol", "requeue"])}, timeout=240)
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
               launcher_overrides={"slurm.partition": "nope"})
    assert "invalid partition" in str(e.value).lower() and "\n" not in str(e.value)
    with pytest.raises(LaunchError) as e:
        submit("train", [], str(params), executor="slurm", folder=tmp_path / "j2",
               launcher_overrides={"slurm.gpus_per_node": 8})
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
