"""Ray Tune sweeps on a real local Ray instance: table shape, nested MLflow runs, no retraining per EMA
length, a killed trial worker that resumes, ASHA early stopping, bad sweep files."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, tiny_params
from pipeline import config as C
from pipeline.sweep.schema import SweepConfig, ValidationSpec, load_sweep
from safetensors.torch import load_file

class Payload:
    """Unpickling this creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def make_project(tmp_path, fmnist, params=None, **sweep_changes):
    """A project folder with a shrunken params.yaml and sweeps/tiny.yaml adapted to it."""
    tiny_params(tmp_path, fmnist, **(params or {}))
    sweep = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    sweep.update(sweep_changes)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def mlflow_runs(tmp_path, experiment="edm2-sweeps"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, fmnist):
    """The tiny sweep (4 trials x 3 EMA lengths) on a local Ray instance, with one trial's worker
    process SIGKILLed mid-run."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    # As on a fresh clone: no encoded data yet (the sweep encodes what it needs).
    sweep_file = make_project(tmp_path, fmnist, params={"data": {"dataset_dir": "data/encoded", "max_images": 512}})
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "runs/sweeps/tiny/trials"
    killed, deadline, listeners, seen_at = None, time.time() + 600, set(), 0.0
    while killed is None and time.time() < deadline and p.poll() is None:
        if time.time() - seen_at > 1:
            listeners |= ray_listeners(p.pid)
            seen_at = time.time()
        for t in sorted(trials.glob("*")) if trials.is_dir() else []:
            ckpts = list((t / "run" / "checkpoints").glob("*.pt"))
            done = (t / "run" / "train_summary.json").is_file()
            if ckpts and not done and (t / "worker.pid").is_file():
                pid = int((t / "worker.pid").read_text())
                os.kill(pid, signal.SIGKILL)                 # the Ray worker process running this trial
                killed = (t.name, pid)
                break
        time.sleep(0.2)
    out, _ = p.communicate(timeout=900)
    return {"dir": tmp_path, "out": out, "rc": p.returncode, "killed": killed, "trials": trials, "listeners": listeners}


def ray_listeners(root_pid: int) -> set:
    """(local address, process name) of every listening TCP/UDP socket of `root_pid` and its descendants
    (the sweep driver, its GCS, raylet, agents and workers), from `ss`."""
    import psutil
    try:
        pids = {root_pid} | {c.pid for c in psutil.Process(root_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for line in subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True).stdout.splitlines():
        procs = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        if any(int(pid) in pids for _, pid in procs):
            found.add((line.split()[4], procs[0][0]))
    return found


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_only(tiny_sweep):
    listeners = tiny_sweep["listeners"]
    print(sorted(listeners))
    assert {"gcs_server", "raylet"} <= {name for _, name in listeners}, listeners      # ss saw Ray's servers
    exposed = [(a, n) for a, n in listeners if not re.match(r"(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$", a)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert list(Path(f"/tmp/ray-{os.getuid()}").glob("session_2*")), "no session in the per-user Ray folder"


@pytest.mark.slow
def test_tiny_sweep_survives_a_killed_worker(tiny_sweep):
    tmp_path, out, killed, trials = (tiny_sweep[k] for k in ("dir", "out", "killed", "trials"))
    assert tiny_sweep["rc"] == 0, out[-4000:]
    assert killed is not None, "no trial was caught mid-run"
    print(f"killed worker {killed[1]} of trial {killed[0]}")

    table = pd.read_csv(tmp_path / "reports/sweeps/tiny/results.csv")
    assert len(table) == 12 and set(table["status"]) == {"finished"}
    assert sorted(Counter(table["trial_id"]).values()) == [3, 3, 3, 3]
    assert set(table["sigma_rel"].round(3)) == {0.05, 0.1, 0.15}
    for col in ("fid", "feature_net", "num_images", "reference", "ref_num_images", "nfe", "seeds", "train.ref_lr"):
        assert table[col].notna().all(), col
    assert (tmp_path / "reports/sweeps/tiny/fid_vs_ema.png").is_file()
    assert (tmp_path / "reports/sweeps/tiny/best_fid_vs_param.png").is_file()
    assert "winner: FID" in out
    # A fresh project: the sweep encoded both splits with the encode stage's code before the first trial.
    assert out.count("not encoded yet, encoding it now") == 2, out[:3000]
    for split in ("train", "test"):
        assert json.loads((tmp_path / "data/encoded" / split / "manifest.json").read_text())["count"] == 512
    assert (table["train_min"] > 0).all() and (table["img_per_s"] > 0).all()          # the cost column

    client, runs = mlflow_runs(tmp_path)
    kinds = Counter(r.data.tags.get("kind", "trial") for r in runs)
    assert kinds == {"sweep": 1, "trial": 4, "ema": 12}
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = {r.info.run_id: r for r in runs if "kind" not in r.data.tags}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    per_child = Counter(r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("kind") == "ema")
    assert set(per_child) == set(children) and set(per_child.values()) == {3}
    # Four trainings, one per trial: EMA lengths never retrained.
    assert len(list(trials.glob("*/run/train_summary.json"))) == 4
    # The killed trial resumed in a new worker, in the same MLflow run, with no step logged twice.
    t = trials / killed[0]
    assert int((t / "worker.pid").read_text()) != killed[1]
    for run_id in children:
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert len(steps) == len(set(steps)) and max(steps) == 96, steps


@pytest.mark.slow
def test_dataframe_loader_one_row_per_trial_and_ema_length(tiny_sweep):
    from pipeline.tracking.runs import load_runs
    d = tiny_sweep["dir"]
    df = load_runs("edm2-sweeps", f"sqlite:///{d / 'mlflow.db'}", sweep="tiny")
    table = pd.read_csv(d / "reports/sweeps/tiny/results.csv")
    assert len(df) == 12 and df["run_name"].nunique() == 4
    assert {"param.train.ref_lr", "param.loss.P_mean"} <= set(df.columns)
    assert (df["train_seconds"] > 0).all() and (df["gpu_seconds"] == 0).all()      # CPU trials: no GPU cost
    mine = df.set_index([df["run_name"].str.removeprefix("trial-"), df["sigma_rel"].round(3)])["fid"]
    theirs = table.set_index(["trial_id", table["sigma_rel"].round(3)])["fid"]
    assert mine.sort_index().round(6).tolist() == theirs.sort_index().round(6).tolist()


def test_promote_writes_the_winner_into_params_or_queues_a_dvc_experiment(tiny_sweep, tmp_path):
    """`sweep promote`: the best trial's searched values and its best EMA length go into params.yaml (its
    comments kept), each change printed; --queue queues them as a DVC experiment instead."""
    d = tiny_sweep["dir"]
    table = pd.read_csv(d / "reports/sweeps/tiny/results.csv").dropna(subset=["fid"])
    best = table.loc[table["fid"].idxmin()]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    cmd = [sys.executable, "-m", "pipeline", "sweep", "promote", "tiny", "--params", str(params), "--storage",
           str(d / "runs/sweeps"), "--duration-nimg", "4096"]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"promote: sweep tiny, trial {best['trial_id']}, sigma_rel {best['sigma_rel']:g}" in r.stdout, r.stdout
    long_run = C.load_config(ROOT / "params.yaml").train.duration_nimg
    assert f"train.duration_nimg: {long_run} -> 4096" in r.stdout, r.stdout
    assert "resolved from every other trial" in r.stdout or "not resolved from it" in r.stdout
    cfg = C.load_config(params)
    assert (cfg.train.ref_lr, cfg.loss.P_mean) == (best["train.ref_lr"], best["loss.P_mean"])
    assert cfg.ema.targets == [best["sigma_rel"]] and cfg.train.duration_nimg == 4096
    assert params.read_text().splitlines()[0] == (ROOT / "params.yaml").read_text().splitlines()[0]   # comments kept
    assert cfg.network.model_channels == C.load_config(ROOT / "params.yaml").network.model_channels  # overrides not
    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert "nothing changes" in again.stdout, again.stdout
    # --queue: a DVC experiment with those values, params.yaml untouched.
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("stages:\n  show:\n    cmd: echo\n    params: [train.ref_lr, ema.targets]\n")
    git = {**ENV, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run("git init -q && dvc init -q && git add -A && git commit -qm init", shell=True, cwd=repo, env=git,
                   check=True)
    r = subprocess.run([*cmd[:5], "tiny", "--storage", str(d / "runs/sweeps"), "--queue", "--name", "promoted"],
                       cwd=repo, env=git, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "queued as a DVC experiment: dvc exp run --queue --name promoted" in r.stdout, \
        r.stdout + r.stderr
    assert (repo / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    status = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=git, capture_output=True, text=True).stdout
    assert "promoted" in status and "Queued" in status, status


@pytest.mark.slow
def test_sweep_report_and_mlflow_ui_in_headless_chromium(tiny_sweep, tmp_path):
    from chromium_helpers import chromium_or_skip, render, served_mlflow
    chromium = chromium_or_skip()
    d = tiny_sweep["dir"]
    html = (d / "reports/sweeps/tiny/report.html").read_text()
    for needle in ("Samples per trial, at its best EMA length", "cost: train min", "images/s", "ref_lr="):
        assert needle in html, needle
    for width in (1280, 1400):                   # the table scrolls inside the page, at both widths
        shot = render(chromium, (d / "reports/sweeps/tiny/report.html").as_uri(), tmp_path, f"sweep-report-{width}",
                      width=width)
        assert shot["view_width"] == width and shot["page_width"] <= width, shot
    assert shot["images_total"] == 3 + 4 and shot["images_loaded"] == 7          # 3 figures + a grid per trial
    assert "Trial timeline" in html
    assert not re.search(r"NFE \d+\.0\b|\d\.0 vs \d", html)                     # counts printed as integers
    assert not shot["external_requests"] and not shot["non_local_connections"]
    with served_mlflow(f"sqlite:///{d / 'mlflow.db'}") as base:
        import json as _json
        import urllib.request

        def api(path, body=None):
            req = urllib.request.Request(base + path, data=_json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
            return _json.loads(urllib.request.urlopen(req, timeout=30).read())
        exp = api("/api/2.0/mlflow/experiments/get-by-name?experiment_name=edm2-sweeps")["experiment"]
        runs = api("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parent = [r for r, t in zip(runs, tags) if t.get("kind") == "sweep"]
        trials = [r for r, t in zip(runs, tags) if "kind" not in t]
        emas = [(r, t) for r, t in zip(runs, tags) if t.get("kind") == "ema"]
        assert len(parent) == 1 and len(trials) == 4 and len(emas) == 12
        # A trial's params: the searched values and its run key (no paths); the full config is its artifact.
        assert all({p["key"] for p in r["data"].get("params", [])} == {"train.ref_lr", "loss.P_mean", "run_key"}
                   for r in trials), [r["data"].get("params") for r in trials][:1]
        trial_ids = {r["info"]["run_id"] for r in trials}
        assert all(t["mlflow.parentRunId"] in trial_ids for _, t in emas)
        assert all(any(m["key"] == "fid" for m in r["data"]["metrics"]) for r, _ in emas)
        from pipeline.tracking.store import runs_table_url      # the address `pipeline results` prints
        printed = runs_table_url(f"sqlite:///{d / 'mlflow.db'}", "edm2-sweeps")
        assert printed == f"http://127.0.0.1:5000/#/experiments/{exp['experiment_id']}/runs", printed
        page = render(chromium, printed.replace("http://127.0.0.1:5000", base), tmp_path, "mlflow-ui",
                      budget_ms=30000)
        # The runs table: the sweep's parent row (children nested under it) and all 17 runs counted.
        dom = page["dom"]
        i = dom.find("matching runs")
        shown = "".join(ch for ch in re.sub(r"<[^>]*>", " ", dom[max(0, i - 80):i]).split()[-1:])
        assert "sweep-tiny" in dom and i > 0 and shown == "17", dom[max(0, i - 300):i + 50]
        assert not page["non_local_connections"]


@pytest.mark.slow
def test_asha_stops_the_clearly_bad_trial(tmp_path, fmnist):
    sweep_file = make_project(
        tmp_path, fmnist, name="asha", search={"train.ref_lr": {"grid": [0.02, 0.01, 0.015, 1.0e-7]}},
        ema_lengths=[0.1], max_concurrent=1,
        overrides={**yaml.safe_load((ROOT / "sweeps/tiny.yaml").read_text())["overrides"],
                   "train.duration_nimg": 192},
        scheduler={"type": "asha", "grace_period_nimg": 64, "reduction_factor": 2,       # metric: val_loss (default)
                   "evaluate_stopped": True})                                            # their FID from snapshots
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    table = pd.read_csv(tmp_path / "reports/sweeps/asha/results.csv")
    stopped = table[table["status"] == "early-stopped"]
    assert len(stopped) >= 1 and (stopped["nimg"] < 192).all()
    assert stopped["stop_reason"].str.contains("ASHA at nimg=").all() and stopped["val_loss"].notna().all()
    bad = table[table["train.ref_lr"] == 1.0e-7]               # the clearly bad trial, by exact value
    assert len(bad) == 1 and bad["status"].item() == "early-stopped", table[["train.ref_lr", "status", "nimg"]]
    assert 64 <= bad["nimg"].item() < 192                       # stopped after the grace period, before the end
    state = json.loads((tmp_path / "runs/sweeps/asha/trials" / bad["trial_id"].item() / "trial.json").read_text())
    assert state["status"] == "early-stopped" and state["stop"]["scheduler"] == "asha", state   # not "running"
    assert table[table["status"] == "finished"]["fid"].notna().all()
    # evaluate_stopped: a stopped trial is ranked by FID too, measured at the images it trained (no retraining).
    assert stopped["fid"].notna().all() and (stopped["nimg"] == stopped["nimg"].astype(int)).all()
    assert f"ranked by: FID for {table['trial_id'].nunique()} of {table['trial_id'].nunique()} trials" in r.stdout
    assert "stopped early by ASHA on val_loss" in r.stdout and "--resume finishes" not in r.stdout
    # No traceback and no "Exception ignored" noise on a sweep where nothing failed.
    assert "Traceback" not in r.stdout + r.stderr and "Exception ignored" not in r.stdout + r.stderr, \
        (r.stdout + r.stderr)[-3000:]
    html = (tmp_path / "reports/sweeps/asha/report.html").read_text()
    assert html.count("<tr class='stopped'>") == len(stopped) and "ASHA at nimg=" in html     # shown as such
    # MLflow ends true: nothing RUNNING; the stopped trial KILLED, with the reason.
    client, runs = mlflow_runs(tmp_path)
    assert runs and not [x.info.run_name for x in runs if x.info.status == "RUNNING"]
    bad_id = (tmp_path / "runs/sweeps/asha/trials" / bad["trial_id"].item() / "run/mlflow_run_id").read_text().strip()
    bad_run = client.get_run(bad_id)
    assert bad_run.info.status == "KILLED" and bad_run.data.tags["stop_reason"] == "asha"
    finished = table[table["status"] == "finished"]["trial_id"].iloc[0]
    fin_id = (tmp_path / "runs/sweeps/asha/trials" / finished / "run/mlflow_run_id").read_text().strip()
    fin = client.get_run(fin_id)
    assert fin.info.status == "FINISHED" and {"best_fid", "best_sigma_rel", "best_kid"} <= set(fin.data.metrics)


def _sweep_file(tmp_path, fmnist, **changes):
    tiny_params(tmp_path, fmnist)
    sweep = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            sweep.pop(k, None)
        else:
            sweep[k] = v
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(sweep))
    return f


@pytest.mark.parametrize("changes, message", [
    ({"searchh": {}}, "searchh: unknown key"),
    ({"search": {}, "ema_lengths": []}, "empty search space"),
    ({"ema_lengths": [0.05, 0.3]}, "ema_lengths[1]=0.3: sigma_rel must be in (0, 0.2887)"),
    ({"search": {"train.ref_lr": {"grid": [0.01, -1]}}}, "train.ref_lr=-1: must be > 0"),
    ({"search": {"train.ref_lrr": {"grid": [0.01]}}}, "search.train.ref_lrr: unknown key"),
    ({"search": {"loss.P_std": {"grid": [1.0, 0.0]}}}, "loss.P_std=0.0: must be > 0"),
    ({"search": {"loss.noise": {"choice": ["lognormal", "loguniform"]}, "loss.P_std": {"uniform": [0.8, 2.0]}},
      "algorithm": "random"}, "search: override: loss.P_std=0.8 belongs to the lognormal noise law, not to loss.noise=loguniform"),
    ({"search": {"loss.sigma_lo": {"grid": [0.01]}}}, "search.loss.sigma_lo: unknown key"),
    ({"search": {"train.ref_lr": {"uniform": [0.02, 0.01]}}, "algorithm": "random"}, "needs low < high"),
    ({"search": {"train.ref_lr": {"grid": []}}}, "grid is empty"),
    ({"search": {"ema.targets": {"grid": [[0.1]]}}}, "sweep EMA length with `ema_lengths`"),
    ({"scheduler": "asha"}, "scheduler='asha': expected a mapping, e.g. scheduler: {type: asha"),
    ({"scheduler": {"type": "asha", "grace_period_nimg": 4096}}, "grace_period_nimg=4096 is longer than the training"),
    ({"scheduler": {"type": "asha", "metric": "fid"}}, "scheduler.metric='fid'"),
    ({"validation": {"sigmas": [0.5, -1]}}, "validation.sigmas[1]=-1"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, fmnist, monkeypatch, changes, message):
    f = _sweep_file(tmp_path, fmnist, **changes)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(C.ConfigError) as info:
        load_sweep(f)
    assert message in str(info.value), str(info.value)


def test_gpus_per_trial_checked_against_a_real_ray_cluster(tmp_path, fmnist, monkeypatch, capsys):
    import ray

    from pipeline.sweep.cluster import SweepError, check_resources
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, configure_logging=False)   # 1 logical GPU
    try:
        with pytest.raises(SweepError, match="resources.gpus=2 per trial, but the cluster has 1 GPUs"):
            check_resources(SweepConfig(name="x", search={}, ema_lengths=[0.1], resources={"gpus": 2}), ray)
        assert check_resources(SweepConfig(name="x", ema_lengths=[0.1], resources={"gpus": 0.5}), ray) == (0.5, "cuda")
        with pytest.raises(SweepError, match=r"resources.cpus=1 x resources.workers=2 per trial \+ 1 for the trial driver, but the cluster has 1 CPUs"):
            check_resources(SweepConfig(name="x", ema_lengths=[0.1], resources={"workers": 2}), ray)
    finally:
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)                # no GPUs at all
    try:
        assert check_resources(SweepConfig(name="x", ema_lengths=[0.1], resources={"gpus": 1}), ray) == (0.0, "cpu")
        assert "no GPUs: running trials on CPU workers" in capsys.readouterr().out
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ctrl_c_at_the_first_trial_then_mid_sweep_resumes_without_rerunning_finished_trials(tmp_path, fmnist):
    """One sweep of two trials interrupted twice. Ctrl-C as soon as the first trial's worker starts: no
    traceback, no MLflow run left RUNNING, the results table lists every planned trial with its values.
    Then --resume, and Ctrl-C while the second trial trains and the first has finished; the second
    --resume (from the trials' own records, never Ray's pickles: crafted ones are planted) keeps the
    finished trial as it is and finishes the other from its checkpoint."""
    sweep_file = make_project(tmp_path, fmnist, search={"train.ref_lr": {"grid": [0.005, 0.02]}}, max_concurrent=1,
                              name="resume")
    cmd = [sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"]
    trials = tmp_path / "runs/sweeps/resume/trials"

    # 1. Ctrl-C at the first trial's start.
    p = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent, deadline = False, time.time() + 600
    while not sent and time.time() < deadline and p.poll() is None:
        if list(trials.glob("*/worker.pid")):
            p.send_signal(signal.SIGINT)
            sent = True
        time.sleep(0.1)
    out, _ = p.communicate(timeout=300)
    assert sent, out[-3000:]
    assert "Traceback" not in out, out[-4000:]
    _, runs = mlflow_runs(tmp_path)
    assert runs and not [x.info.run_name for x in runs if x.info.status == "RUNNING"]
    table = pd.read_csv(tmp_path / "reports/sweeps/resume/results.csv")
    assert set(table["trial_id"]) == {"t0000", "t0001"} and table["train.ref_lr"].notna().all(), table
    assert (table["status"] != "finished").any()

    # 2. --resume, then Ctrl-C once one trial has finished and the other is mid-run.
    p = subprocess.Popen(cmd + ["--resume"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    finished, deadline = None, time.time() + 600
    while finished is None and time.time() < deadline and p.poll() is None:
        done = [t for t in trials.glob("*") if (t / "fid_records.json").is_file()] if trials.is_dir() else []
        running = [t for t in trials.glob("*") if t not in done and list((t / "run/checkpoints").glob("*.pt"))] \
            if done else []
        if done and running:
            finished = done[0]
            p.send_signal(signal.SIGINT)                      # what Ctrl-C does
        time.sleep(0.2)
    out1, _ = p.communicate(timeout=300)
    assert finished is not None, "never caught one trial finished and one mid-run:\n" + out1[-3000:]
    assert "1 trial(s) were interrupted" in out1 and "--resume" in out1, out1[-3000:]
    client, runs = mlflow_runs(tmp_path)                      # nothing left RUNNING; the interrupted one says so
    assert not [x.info.run_name for x in runs if x.info.status == "RUNNING"]
    assert any(x.data.tags.get("stop_reason") == "interrupted" and x.info.status == "KILLED" for x in runs)
    assert len(pd.read_csv(tmp_path / "reports/sweeps/resume/results.csv").dropna(subset=["fid"])) < 6
    kept = {f: (finished / f).stat().st_mtime_ns for f in ("run/train_summary.json", "fid_records.json")}
    kept_lines = (finished / "run/metrics.jsonl").read_text()

    # 3. Every pickle Ray wrote (tuner.pkl, params.pkl, ...) and one planted where Ray's old layout had it
    # are replaced by payloads that would create a marker: --resume must read none of them.
    marker = tmp_path / "EXECUTED"
    exp = tmp_path / "runs/sweeps/resume"
    planted = sorted(exp.rglob("*.pkl")) + [exp / "tuner.pkl"]
    assert any(p.name == "tuner.pkl" for p in planted[:-1]), [str(p) for p in planted]
    for f in planted:
        f.write_bytes(pickle.dumps(Payload(marker)))
    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    out2 = r.stdout + r.stderr
    assert r.returncode == 0, out2[-4000:]
    print(out1[-1500:], "\n-----\n", "\n".join(l for l in out2.splitlines() if "resum" in l))
    assert "sweep: resuming" in out2 and "resuming from" in out2     # our records, then the trial's checkpoint
    assert not marker.exists(), "a pickle in the sweep folder was executed"
    assert {f: (finished / f).stat().st_mtime_ns for f in kept} == kept, "the finished trial was re-run"
    assert (finished / "run/metrics.jsonl").read_text() == kept_lines
    table = pd.read_csv(tmp_path / "reports/sweeps/resume/results.csv")
    assert len(table) == 6 and set(table["status"]) == {"finished"} and table["trial_id"].nunique() == 2
    client, runs = mlflow_runs(tmp_path)
    kinds = Counter(r.data.tags.get("kind", "trial") for r in runs)
    assert kinds == {"sweep": 1, "trial": 2, "ema": 6}, kinds
    for run in runs:
        if "kind" not in run.data.tags:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
            assert len(steps) == len(set(steps)) and max(steps) == 96, steps


@pytest.mark.slow
def test_ctrl_c_during_the_final_report_closes_everything_and_resume_writes_it(tmp_path, fmnist):
    """Ctrl-C after the trials, while the driver writes the table, figures and report (the driver stamps
    trials_ended_at in sweep_state.json as it starts them): one line, exit 130, every run closed, the
    table written from the trials' records; --resume runs no trial again and writes the report. The trials
    log through the sweep's own MLflow server (tracking_server: true), which is gone when the sweep ends."""
    sweep_file = make_project(tmp_path, fmnist, search={}, name="last", tracking_server=True)
    cmd = [sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state, sent, deadline = tmp_path / "runs/sweeps/last/sweep_state.json", False, time.time() + 600
    while not sent and time.time() < deadline and p.poll() is None:
        try:
            ended = "trials_ended_at" in json.loads(state.read_text())
        except (OSError, ValueError):
            ended = False
        if ended:
            p.send_signal(signal.SIGINT)
            sent = True
        time.sleep(0.02)
    out, _ = p.communicate(timeout=300)
    assert sent and p.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "the same command with --resume finishes it" in out, out[-3000:]
    url = re.search(r"sweep: MLflow server (http://127\.0\.0\.1:\d+) over sqlite:", out).group(1)
    from pipeline.tracking.store import _reachable
    assert _reachable(url, timeout=1) is not None              # stopped with the sweep
    _, runs = mlflow_runs(tmp_path)
    assert runs and not [x.info.run_name for x in runs if x.info.status == "RUNNING"]
    table = pd.read_csv(tmp_path / "reports/sweeps/last/results.csv")
    assert set(table["status"]) == {"finished"} and table["fid"].notna().all()
    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "0 trial(s) to run" in r.stdout, (r.stdout + r.stderr)[-4000:]
    assert (tmp_path / "reports/sweeps/last/report.html").is_file()
    _, runs = mlflow_runs(tmp_path)
    assert {x.info.status for x in runs if x.data.tags.get("kind") == "sweep"} == {"FINISHED"}


@pytest.mark.slow
def test_trial_spanning_two_workers_through_ray_train(tmp_path, fmnist):
    """resources.workers=2: the trial trains under Ray Train's TorchTrainer (2 gloo CPU workers),
    reports reach Tune, rank 0 fans out the EMA lengths; the training equals a 1-process run."""
    sweep_file = make_project(tmp_path, fmnist, search={}, name="ddp", resources={"cpus": 1, "workers": 2})
    # 3 logical CPUs: 2 workers + the trial's driver (on this 2-core machine they mostly wait in turn).
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "3"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    table = pd.read_csv(tmp_path / "reports/sweeps/ddp/results.csv")
    assert len(table) == 3 and set(table["status"]) == {"finished"} and table["fid"].notna().all()
    assert (table["nimg"] == 96).all()                       # Tune got the workers' reports
    client, runs = mlflow_runs(tmp_path)
    assert Counter(r.data.tags.get("kind", "trial") for r in runs) == {"sweep": 1, "trial": 1, "ema": 3}
    trial = next(r for r in runs if "kind" not in r.data.tags)
    assert trial.data.tags["processes"] == "2"
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 96
    # The same configuration trained by one process gives the same EMA (DDP is exact up to float sums).
    (run_dir,) = (tmp_path / "runs/sweeps/ddp/trials").glob("*/run")
    cfg = C.load_config(run_dir / "config.yaml", {"train.run_dir": str(tmp_path / "single"), "tracking.enabled": False})
    from pipeline.training import TrainHooks, train
    train(cfg, TrainHooks(progress=False))
    name = sorted(p.name for p in (run_dir / "snapshots").glob("phema-*.safetensors"))[-1]
    a = load_file(run_dir / "snapshots" / name)
    b = load_file(tmp_path / "single" / "snapshots" / name)
    num = sum((a[k].float() - b[k].float()).norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
    den = sum(b[k].float().norm() ** 2 for k in b if b[k].is_floating_point()) ** 0.5
    print(f"2 Ray Train workers vs 1 process: relative L2 of the last snapshot {float(num / den):.2e}")
    assert float(num / den) < 1e-3


@pytest.mark.slow
def test_sweep_over_the_noise_law_itself_and_a_private_store(tmp_path, fmnist, monkeypatch):
    """`loss.noise` as a `choice` axis: trials train with either law, the table and figures take the
    text-valued axis; the sweep's store is private, and --resume of a finished sweep runs nothing."""
    sweep_file = make_project(tmp_path, fmnist, name="law", algorithm="random", num_samples=4, seed=3,
                              search={"loss.noise": {"choice": ["lognormal", "loguniform"]}}, ema_lengths=[0.1])
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    table = pd.read_csv(tmp_path / "reports/sweeps/law/results.csv")
    assert set(table["loss.noise"]) == {"lognormal", "loguniform"} and table["fid"].notna().all()
    assert (tmp_path / "reports/sweeps/law/best_fid_vs_param.png").stat().st_size > 5000
    for trial in (tmp_path / "runs/sweeps/law/trials").iterdir():     # each trial trained with its own law
        cfg = yaml.safe_load((trial / "run" / "config.yaml").read_text())
        assert cfg["loss"]["noise"] in ("lognormal", "loguniform")
    from pipeline.sweep.plan import plan
    monkeypatch.chdir(tmp_path)
    drawn = plan(*load_sweep(sweep_file))["points"]          # what --dry-run shows is what ran
    per_trial = table.groupby("trial_id")["loss.noise"].first().sort_values().tolist()
    assert per_trial == sorted(p["loss.noise"] for p in drawn)
    again = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already has results" in again.stderr and "--resume" in again.stderr
    exp_dir = tmp_path / "runs/sweeps/law"
    assert exp_dir.stat().st_mode & 0o777 == 0o700
    # A store others can write (a colleague's copy) resumes: nothing in it is unpickled. All trials are
    # finished, so nothing runs (not even Ray) and the table is rebuilt from the trials' own records.
    os.chmod(exp_dir, 0o777)
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--resume"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 trial(s) to run" in r.stdout and "Trial status" not in r.stdout, r.stdout + r.stderr
    again = pd.read_csv(tmp_path / "reports/sweeps/law/results.csv")
    pd.testing.assert_frame_equal(again.drop(columns=["tied_with_best"]), table.drop(columns=["tied_with_best"]))


def test_the_same_sweep_file_draws_the_same_values(tmp_path, fmnist, monkeypatch, capsys):
    from pipeline.sweep import run_sweep
    from pipeline.sweep.plan import plan
    f = _sweep_file(tmp_path, fmnist, algorithm="random", num_samples=5, seed=7,
                    search={"train.ref_lr": {"loguniform": [0.001, 0.1]}, "loss.sigma_data": {"uniform": [0.4, 0.6]},
                            "loss.noise": {"choice": ["lognormal", "loguniform"]}})
    monkeypatch.chdir(tmp_path)
    first, second = plan(*load_sweep(f)), plan(*load_sweep(f))
    assert first["points"] == second["points"] and len({str(p) for p in first["points"]}) == 5
    other = tmp_path / "other.yaml"
    other.write_text(f.read_text().replace("seed: 7", "seed: 8"))
    assert plan(*load_sweep(other))["points"] != first["points"]
    assert run_sweep(f, dry_run=True)["points"] == first["points"]          # --dry-run prints exactly these
    out = capsys.readouterr().out
    assert "5 trial(s), algorithm random (seed 7)" in out and "images to train" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_grace_period_longer_than_training_exits_2_before_ray_and_mlflow(tmp_path, fmnist):
    f = _sweep_file(tmp_path, fmnist, scheduler={"type": "asha", "grace_period_nimg": 100000})
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(f)], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "grace_period_nimg=100000 is longer than the training" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_validation_loss_does_not_depend_on_the_trials_noise_law(tmp_path, fmnist):
    """The same weights give the same validation loss whatever P_mean / P_std / law the trial trains
    with (the training loss would not), and different weights give a different one."""
    from pipeline.networks import build_network
    from pipeline.sweep.trial import make_validator
    base = C.load_config(tiny_params(tmp_path, fmnist))
    spec = ValidationSpec(num_images=16)
    torch.manual_seed(0)
    net = build_network(base, 32, 1, 10)
    with torch.no_grad():
        net.unet.out_gain.fill_(0.5)                      # not the zero-initialised identity
    values = [make_validator(C.load_config(tiny_params(tmp_path, fmnist), o), spec)(net)
              for o in ([], ["loss.P_mean=0.5", "loss.P_std=0.6"], ["loss.noise=loguniform"])]
    assert values[0] == values[1] == values[2] and values[0] > 0
    assert net.training                                   # put back in its mode
    with torch.no_grad():
        net.unet.out_gain.fill_(0.2)
    assert make_validator(base, spec)(net) != values[0]


@pytest.mark.slow
def test_sweep_posthoc_grid_from_one_training_per_trial(tmp_path, fmnist):
    """A sweep file's `posthoc:` block: every trial evaluates EMA length x guide x guidance from its
    own snapshots (the guide reconstructed in the same pass), with no retraining."""
    sweep_file = make_project(
        tmp_path, fmnist, name="posthoc", search={}, ema_lengths=[], max_concurrent=1,
        posthoc={"sigma_rel": [0.1, 0.15], "guide": ["none", {"nimg": 64, "sigma_rel": 0.05}], "guidance": [1.0, 2.0]})
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--num-cpus", "2"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    table = pd.read_csv(tmp_path / "reports/sweeps/posthoc/results.csv")
    assert len(table) == 8 and table["trial_id"].nunique() == 1                 # 2 x 2 x 2 points, one training
    assert set(zip(table["guide"], table["guidance"])) == {("none", 1.0), ("none", 2.0), ("ema 0.050 at 64 img", 1.0),
                                                          ("ema 0.050 at 64 img", 2.0)}
    assert table["same_as"].notna().sum() == 4
    trial = tmp_path / "runs/sweeps/posthoc/trials" / table["trial_id"].iloc[0]
    assert len(list((trial / "run" / "checkpoints").glob("*.pt"))) >= 1 and (trial / "fid_grid.png").is_file()
    assert sorted(p.name for p in (trial / "ema").glob("ema-*.safetensors")) == [
        "ema-0000000064-0.050.safetensors", "ema-0000000096-0.100.safetensors", "ema-0000000096-0.150.safetensors"]
    html = (tmp_path / "reports/sweeps/posthoc/report.html").read_text()
    assert "Post-hoc grid per trial" in html and "<th>guide</th>" in html
    client, runs = mlflow_runs(tmp_path)
    emas = [x for x in runs if x.data.tags.get("kind") == "ema"]
    assert len(emas) == 8 and {x.data.params["guide"] for x in emas} == {"none", "ema 0.050 at 64 img"}


def test_ray_authentication_off_only_on_loopback(monkeypatch, tmp_path):
    from pipeline.sweep.cluster import SweepError, is_loopback, prepare_ray_env
    assert all(is_loopback(a) for a in ("127.0.0.1:6379", "localhost:6379", "[::1]:6379", "ray://127.0.0.1:10001"))
    assert not any(is_loopback(a) for a in ("10.0.0.5:6379", "auto", "head-node:6379", "[fd00::2]:6379"))
    monkeypatch.setenv("HOME", str(tmp_path))                       # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    prepare_ray_env("127.0.0.1:6379")                               # loopback: as configured
    with pytest.raises(SweepError, match="not loopback, and RAY_AUTH_MODE=disabled"):
        prepare_ray_env("10.0.0.5:6379")
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(SweepError, match="no Ray authentication token"):
        prepare_ray_env("10.0.0.5:6379")
    (tmp_path / "token").write_text("x" * 32)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    prepare_ray_env("10.0.0.5:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"
