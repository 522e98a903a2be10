"""A real 2-node SLURM cluster on this machine (`NODES=2 scripts/slurm_up.sh`: each node a slurmd in its
own network + UTS namespace on a private bridge), gloo on CPU:
  2a  `submit train` over 2 nodes x 1 task == one process (~1e-6); SIGUSR2 -> requeue -> resume == the
      uninterrupted 2-node run, same MLflow run, every step logged once;
  2b  2 tasks on one node (ranks from srun through submitit): the same checks;
  2c  `submit sweep` over 2 nodes (Ray head on n1, worker on n2, token auth), the node of every trial
      recorded; n2's raylet killed mid-trial -> the trial retries on n1 from its checkpoint;
  2d  every node logs to one MLflow server on the host's bridge address;
  3   `python -m pipeline sweep --address` against a `ray start` cluster in the two namespaces, with
      token authentication (refused without, refused with a wrong token).
Needs root (namespaces, bridge); skips with the reason otherwise. Leaves no namespace, bridge or process."""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import (ROOT, assert_close_states, assert_same_training, final_state, interrupt_at_first_checkpoint,
                      tiny_params)
from pipeline import config as C
from pipeline.launch import submit, wait
from pipeline.training import TrainHooks, train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]   # one SLURM cluster at a time (pytest-xdist)
NET, BRIDGE, PREFIX = "10.213.78", "br-edm2t", "edm2t-"
HOST_IP, N1, N2 = f"{NET}.1", f"{NET}.11", f"{NET}.12"
TRAIN = {"duration_nimg": 384, "checkpoint_nimg": 32, "status_nimg": 16, "amp": "none"}   # float32: exact DDP


def _leftovers() -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return ([f"netns {x.split()[0]}" for x in ns.splitlines() if x.startswith(PREFIX)]
            + [f"link {x.split()[0]}" for x in links.splitlines() if BRIDGE in x or f"vh-{PREFIX}" in x])


@pytest.fixture(scope="module")
def cluster2():
    if os.geteuid() != 0:
        pytest.skip("the 2-node cluster needs root (network namespaces, a bridge); `make test` runs as root in CI")
    missing = [t for t in ("slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (as root, `make test` installs them: "
                    f"scripts/system-deps.sh slurm)")
    probe = subprocess.run(["ip", "netns", "add", PREFIX + "probe"], capture_output=True, text=True)
    if probe.returncode != 0:                                    # root in a container without CAP_NET_ADMIN
        pytest.skip(f"network namespaces are not permitted here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", PREFIX + "probe"], check=True)
    assert not _leftovers(), f"a cluster of an earlier run is still up: {_leftovers()}"
    root = Path(tempfile.mkdtemp(prefix="slurm2", dir="/tmp"))     # short path: munge's socket name limit
    env = {**os.environ, "SLURM_ROOT": str(root), "NODES": "2", "SLURM_PORT_BASE": "16917", "SLURM_NET": NET,
           "SLURM_BRIDGE": BRIDGE, "SLURM_NS_PREFIX": PREFIX, "SLURM_FIRST_JOB_ID": "500000", "WITH_SLURMDBD": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts/slurm_up.sh")], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, f"slurm_up.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        yield {"root": root, "conf": str(root / "etc/slurm.conf"), "onnode": str(root / "bin/onnode")}
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/slurm_down.sh")], env=env, timeout=120)
        left = _leftovers()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"slurm_down.sh left {left}"


@pytest.fixture
def on_cluster(cluster2, monkeypatch):
    """SLURM commands (and submitit) talk to the 2-node cluster during the test."""
    monkeypatch.setenv("SLURM_CONF", cluster2["conf"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                   # 2 cores, several processes
    return cluster2


@pytest.fixture(scope="module")
def bridge_mlflow(cluster2, tmp_path_factory):
    """One MLflow tracking server for every node, on the host's side of the bridge."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = 15917
    env = {**os.environ, "DIR": str(d), "HOST": HOST_IP, "PORT": str(port), "WORKERS": "2",
           "ALLOWED_HOSTS": f"{HOST_IP}:{port},{HOST_IP}"}
    p = subprocess.Popen(["bash", str(ROOT / "scripts/mlflow_server.sh")], env=env, stdout=open(d / "log", "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST_IP}:{port}"
    try:
        from pipeline.tracking.store import _reachable
        for _ in range(120):
            if _reachable(url, timeout=2) is None:
                break
            assert p.poll() is None, (d / "log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            raise AssertionError("the MLflow server did not come up:\n" + (d / "log").read_text()[-2000:])
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)


def _params(tmp_path, fmnist, name, uri, **launcher):
    return tiny_params(tmp_path / name, fmnist, train=TRAIN, tracking={"uri": uri, "experiment": "edm2-multinode"},
                       launcher={"slurm": {"cpus_per_task": 1}, "timeout_min": 20, **launcher})


def _steps(uri, run_id, key="loss"):
    from mlflow.tracking import MlflowClient
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_ddp_across_nodes_and_tasks_equals_one_process_and_resumes_after_requeue(on_cluster, bridge_mlflow,
                                                                                   tmp_path, fmnist):
    uri = bridge_mlflow
    two_nodes = _params(tmp_path, fmnist, "2x1", uri, nnodes=2, nproc_per_node=1)
    two_nodes_usr2 = _params(tmp_path, fmnist, "2x1-usr2", uri, nnodes=2, nproc_per_node=1)
    two_tasks_usr2 = _params(tmp_path, fmnist, "1x2-usr2", uri, nnodes=1, nproc_per_node=2)
    jobs = {p.parent.name: submit("train", [], str(p), executor="slurm", folder=p.parent / "jobs")
            for p in (two_nodes, two_nodes_usr2, two_tasks_usr2)}
    usr2 = ["scancel", "--signal=USR2"]
    run_ids = interrupt_at_first_checkpoint({"2x1-usr2": (jobs["2x1-usr2"], two_nodes_usr2, usr2),
                                             "1x2-usr2": (jobs["1x2-usr2"], two_tasks_usr2, usr2)})
    # Without SLURM: torchrun on each node (static rendezvous at n1), as README "Scaling out" shows.
    via_torchrun = _params(tmp_path, fmnist, "torchrun", uri)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", "--nproc-per-node=1", "--master-addr=n1",
                "--master-port=29400"]
    launched = [subprocess.Popen([on_cluster["onnode"], node, *torchrun, f"--node-rank={rank}", "-m", "stages.train",
                                  "--params", str(via_torchrun), "--no-progress"], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for rank, node in enumerate(("n1", "n2"))]
    # The reference: one process, here, while the jobs requeue and finish.
    one = tiny_params(tmp_path / "1", fmnist, train=TRAIN, tracking={"enabled": False})
    assert train(C.load_config(one), TrainHooks(progress=False)).nimg == TRAIN["duration_nimg"]
    results = {name: wait(s) for name, s in jobs.items()}
    for proc in launched:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]

    # Where the ranks ran: two nodes (n1, n2) for 2x1; both tasks on one node for 1x2.
    for name, s in jobs.items():
        log = s.stdout.read_text() + s.stderr.read_text()
        assert results[name]["nimg"] == TRAIN["duration_nimg"], (name, log[-3000:])
    def hosts(s):                                # each task says where it ran (TrainJob's first line)
        return [next(ln.split(" on ")[-1].strip() for ln in (s.folder / f"{s.job_id}_{t}_log.out").read_text()
                     .splitlines() if ln.startswith("edm2 task ")) for t in (0, 1)]
    assert hosts(jobs["2x1"]) == hosts(jobs["2x1-usr2"]) == ["n1", "n2"]
    h = hosts(jobs["1x2-usr2"])
    assert h[0] == h[1] and h[0] in ("n1", "n2")
    for name in ("2x1-usr2", "1x2-usr2"):
        log = jobs[name].stdout.read_text() + jobs[name].stderr.read_text()
        assert "SIGUSR2" in log and "resuming from" in log, (name, log[-3000:])
        assert results[name]["mlflow_run_id"] == run_ids[name]               # the same MLflow run across the requeue

    ref, a, b, c, d = (final_state(p) for p in (one, two_nodes, two_nodes_usr2, two_tasks_usr2, via_torchrun))
    assert_close_states(ref["net"], a["net"], "2 nodes x 1 task vs one process")
    for other, what in ((b, "2 nodes, requeued"), (c, "2 tasks on one node, requeued"), (d, "torchrun on 2 nodes")):
        assert_same_training(a, other, what)                               # bit for bit: same world size, same order
    assert not torch.allclose(ref["net"]["unet.out_gain"], torch.zeros([]))   # training moved the weights
    # 2d: every run is on the bridge's MLflow server, every step exactly once.
    results["torchrun"] = {"mlflow_run_id": d["mlflow_run_id"]}
    for name in ("2x1", "2x1-usr2", "1x2-usr2", "torchrun"):
        steps = _steps(uri, results[name]["mlflow_run_id"])
        assert sorted(steps) == list(range(16, TRAIN["duration_nimg"] + 1, 16)), (name, steps)


def _sweep_project(tmp_path, fmnist, uri, name, duration_nimg=96):
    """A project with a 2-trial sweep (one trial per node: each needs both CPUs of a node) logging to `uri`."""
    tiny_params(tmp_path, fmnist, tracking={"uri": uri})
    sweep = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    sweep.update(name=name, search={"train.ref_lr": {"grid": [0.005, 0.02]}}, resources={"cpus": 2, "gpus": 0},
                 max_failures=2, experiment=f"edm2-{name}")
    sweep["overrides"]["train.duration_nimg"] = duration_nimg
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def _ns_pids(node: str, comm: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", PREFIX + node], capture_output=True, text=True).stdout.split()
    comms = {int(p): Path(f"/proc/{p}/comm") for p in out}
    return [p for p, f in comms.items() if f.is_file() and f.read_text().strip() == comm]


def _check_sweep_runs(uri, experiment, table, expect_trials):
    """2d: the sweep, its trials and their EMA children are all on the one server; node tags; steps once."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    kinds = Counter(r.data.tags.get("kind", "trial") for r in runs)
    assert kinds == {"sweep": 1, "trial": expect_trials, "ema": 3 * expect_trials}, kinds
    trials = [r for r in runs if "kind" not in r.data.tags]
    by_name = {r.info.run_name.removeprefix("trial-"): r for r in trials}
    for tid, nodes in table.groupby("trial_id")["nodes"].first().items():
        assert by_name[tid].data.tags["nodes"] == nodes and by_name[tid].data.tags["node"] == nodes.split(",")[-1]
    for r in trials:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert len(steps) == len(set(steps)) and max(steps) == table["nimg"].max(), steps
    return by_name


def test_sweep_over_two_slurm_nodes_survives_a_dead_raylet(on_cluster, bridge_mlflow, tmp_path, fmnist):
    sweep = _sweep_project(tmp_path, fmnist, bridge_mlflow, "mn", duration_nimg=192)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_MODE", None)                       # the job sets token auth itself
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "submit", "sweep", str(sweep), "--executor", "slurm",
                          "--nodes", "2", "--cpus", "2", "--wait", "--folder", str(tmp_path / "jobs")],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials, killed, deadline = tmp_path / "runs/sweeps/mn/trials", None, time.time() + 600
    while killed is None and p.poll() is None and time.time() < deadline:
        for t in sorted(trials.glob("*")) if trials.is_dir() else []:
            nodes = (t / "nodes.jsonl").read_text().split("\n") if (t / "nodes.jsonl").is_file() else []
            if any('"n2"' in x for x in nodes) and list((t / "run/checkpoints").glob("*.pt")) \
                    and not (t / "run/train_summary.json").is_file():
                raylets = _ns_pids("n2", "raylet")
                assert len(raylets) == 1, raylets
                os.kill(raylets[0], signal.SIGKILL)      # node n2 is gone for Ray; SLURM still sees it up
                killed = t.name
                break
        time.sleep(0.2)
    out, _ = p.communicate(timeout=900)
    job_id = out.split("submitted job ")[1].split()[0] if "submitted job " in out else None
    if job_id:
        shutil.rmtree(f"/tmp/ray-edm2-{job_id}", ignore_errors=True)   # the job's Ray session files
    assert p.returncode == 0, out[-5000:]
    assert killed, "no trial was caught running on n2 mid-training:\n" + out[-3000:]
    table = pd.read_csv(tmp_path / "reports/sweeps/mn/results.csv")
    assert len(table) == 6 and set(table["status"]) == {"finished"} and table["fid"].notna().all()
    nodes = table.groupby("trial_id")["nodes"].first().to_dict()
    assert nodes[killed] == "n2,n1", nodes                # retried on the surviving node ...
    (other,) = set(nodes) - {killed}
    assert nodes[other] == "n1", nodes
    job_log = "".join(f.read_text() for f in (tmp_path / "jobs").glob("*_0_log.*"))
    resumed = job_log.split("resuming from")[1]                      # ... from its checkpoint
    assert f"trials/{killed}/run/checkpoints/checkpoint-" in resumed, job_log[-3000:]
    _check_sweep_runs(bridge_mlflow, "edm2-mn", table, 2)
    assert not _ns_pids("n1", "raylet") and not _ns_pids("n2", "raylet")   # each task stopped its node's Ray


def test_sweep_address_against_ray_start_cluster_needs_its_token(on_cluster, bridge_mlflow, tmp_path, fmnist):
    sweep = _sweep_project(tmp_path, fmnist, bridge_mlflow, "rs")
    onnode, token, port = on_cluster["onnode"], secrets.token_hex(32), 6390   # Ray: not in 10002-19999
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    common = ["--block", "--disable-usage-stats", "--num-cpus=2"]
    from pipeline.launch import ray_cli
    log = open(tmp_path / "ray-start.log", "w")
    nodes = [subprocess.Popen([onnode, "n1", ray_cli(), "start", "--head", f"--node-ip-address={N1}", f"--port={port}",
                               "--include-dashboard=false", "--temp-dir=/tmp/ray-edm2t", *common], env=env,
                              start_new_session=True, stdout=log, stderr=subprocess.STDOUT)]
    try:
        from pipeline.launch import wait_for_port
        wait_for_port(N1, port, 120)
        nodes.append(subprocess.Popen([onnode, "n2", ray_cli(), "start", f"--address={N1}:{port}",
                                       f"--node-ip-address={N2}", *common], env=env, start_new_session=True,
                                      stdout=log, stderr=subprocess.STDOUT))
        driver = [onnode, "n1", sys.executable, "-m", "pipeline", "sweep", str(sweep), "--address", f"{N1}:{port}"]

        def run(**changes):
            t = time.time()
            r = subprocess.run(driver, cwd=tmp_path, env={**env, **changes}, capture_output=True, text=True,
                               timeout=900)
            print(f"sweep --address with {changes or 'the token'}: exit {r.returncode} after {time.time() - t:.0f} s")
            return r
        off = run(RAY_AUTH_MODE="disabled")             # no authentication towards a network address: refused
        assert off.returncode == 2 and "not loopback" in off.stderr and "RAY_AUTH_MODE=token" in off.stderr, off.stderr
        wrong = run(RAY_AUTH_TOKEN=secrets.token_hex(32))
        assert wrong.returncode == 2 and "could not join the Ray cluster" in wrong.stderr, wrong.stderr[-3000:]
        assert not (tmp_path / "reports/sweeps/rs").exists()             # refused before any work
        ok = run()
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-5000:]
    finally:
        for n in nodes:                                  # never `ray stop`: it kills every Ray on the machine
            from pipeline.launch import stop_ray_node
            stop_ray_node(n, grace_s=20)
        shutil.rmtree("/tmp/ray-edm2t", ignore_errors=True)
    table = pd.read_csv(tmp_path / "reports/sweeps/rs/results.csv")
    assert len(table) == 6 and table["fid"].notna().all()
    assert sorted(table.groupby("trial_id")["node"].first()) == ["n1", "n2"]      # one trial on each node
    _check_sweep_runs(bridge_mlflow, "edm2-rs", table, 2)
