"""Issue #35, sweeps that tell the truth: artifacts whether or not a sweep runs its own MLflow server
(also in an experiment first made through one), a sweep with no finished trial fails with each trial's
error, one driver per sweep name, committed example results do not block, no Ray restore hint, and a new
sqlite store opened by several processes at once."""
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import ROOT, tiny_params
from pipeline.io import RunLock, RunLockedError


def _sweep(tmp_path, name, **fields):
    sweep = {"name": name, "search": {"train.ref_lr": {"loguniform": [0.001, 0.1]}}, "algorithm": "random",
             "num_samples": 1, "ema_lengths": [0.05, 0.1, 0.15], "max_concurrent": 1, "experiment": "truth",
             "max_failures": 0, **fields}
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(sweep))
    return f


@pytest.mark.slow
def test_sweeps_tell_the_truth(tmp_path, fmnist, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.cluster import prepare_ray_env, ray_temp_dir
    from pipeline.sweep.driver import run_sweep
    from pipeline.tracking_server import TrackingServer
    tiny_params(tmp_path, fmnist)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stub = "benchmarks.sweep_scale:stub_trial"             # logs an artifact (config.yaml) like training

    # An experiment first made through a server keeps mlflow-artifacts:, which only a server can serve.
    with TrackingServer(uri, tmp_path / "mlartifacts") as url:
        MlflowClient(url).create_experiment("truth")
    assert MlflowClient(uri).get_experiment_by_name("truth").artifact_location.startswith("mlflow-artifacts:")
    (tmp_path / "reports/sweeps/direct").mkdir(parents=True)
    (tmp_path / "reports/sweeps/direct/results.csv").write_text("trial_id,fid\nold,1\n")   # a committed example
    res = run_sweep(_sweep(tmp_path, "direct", tracking_server=False), num_cpus=1, trial_body=stub)
    out = capfd.readouterr()
    assert "starting this sweep's MLflow server" in out.out and "replaced by this run's" in out.out
    import ray
    assert not ray.is_initialized()                 # the Ray run_sweep started ended with it
    # The rest share one Ray the caller started (as in a notebook): run_sweep uses it and leaves it up.
    prepare_ray_env(None)
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, _temp_dir=ray_temp_dir())
    try:
        _the_rest(tmp_path, uri, stub, capfd)
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def _the_rest(tmp_path, uri, stub, capfd):
    from mlflow.tracking import MlflowClient

    from pipeline.errors import SweepError
    from pipeline.sweep.driver import run_sweep
    # ... and a new experiment gets a local artifact folder: with and without the server, both work.
    for name, served in (("served", True), ("plain", False)):
        res = run_sweep(_sweep(tmp_path, name, experiment="truth2", tracking_server=served), num_cpus=1,
                        trial_body=stub)
        assert res.best is not None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("truth2")
    assert exp.artifact_location.startswith("file:")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert len(trials) == 2 and all(client.list_artifacts(r.info.run_id) for r in trials)

    # No finished trial: exit non-zero, each trial's error in the one line.
    with pytest.raises(SweepError, match=r"no trial finished \(t0000: error \(OSError: \[Errno 28\] No space"):
        run_sweep(_sweep(tmp_path, "full"), num_cpus=1, trial_body="sweep_bodies:no_space")
    out = capfd.readouterr()
    assert "Tuner.restore" not in out.out + out.err
    parent = [r for r in client.search_runs([client.get_experiment_by_name("truth").experiment_id])
              if r.info.run_name == "sweep-full"]
    assert [r.info.status for r in parent] == ["FAILED"]

    # One driver per sweep name: a second one is refused while the first holds the sweep.
    with RunLock(tmp_path / "runs/sweeps/busy"):
        with pytest.raises(RunLockedError, match="sweep 'busy'.* is in use by pid"):
            run_sweep(_sweep(tmp_path, "busy"), num_cpus=1, trial_body=stub)


def test_a_new_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.tracking.logger import RunLogger
        t = float(sys.argv[1])
        while time.time() < t:
            time.sleep(0.001)
        log = RunLogger(uri="sqlite:///{tmp_path / 'new.db'}", experiment="race")
        assert log.start(run_name="r") is not None and log.offline_reason is None, log.offline_reason
        log.end("FINISHED")
    """)
    (tmp_path / "race.py").write_text(script)
    import time
    start = time.time() + 8                                # all import MLflow first, then open the store together
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "race.py"), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert not any("warning: MLflow logging off" in o for o in outs), outs


def test_run_lock_waits_when_asked(tmp_path):
    """Queued DVC experiments of one training: the later one waits for the folder (in an experiment copy
    training asks RunLock to wait), a plain second writer is refused."""
    import threading
    import time
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / "run").acquire()
    said, got = [], []
    t = threading.Thread(target=lambda: got.append(RunLock(tmp_path / "run").acquire(wait=True, log=said.append)))
    t.start()
    time.sleep(1.0)
    assert not got and said and "waiting for it to finish" in said[0]
    first.release()
    t.join(10)
    assert got
    got[0].release()


def test_training_waits_for_its_folder_in_an_experiment_copy(tmp_path, monkeypatch):
    from pipeline import workspace
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "e1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert workspace.in_experiment_copy()
    import inspect

    from pipeline import training
    assert "acquire(wait=in_experiment_copy())" in inspect.getsource(training.train)
