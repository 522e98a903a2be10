"""The MLflow server a sweep starts for its many writers: bound to 127.0.0.1, logs land in the sqlite
store behind it, it stops with the sweep, and a killed sweep leaves no server behind."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.sweep.schema import SERVER_ABOVE_WRITERS, SweepConfig, wants_tracking_server
from pipeline.tracking.store import _reachable


def sweep_of(**changes) -> SweepConfig:
    return SweepConfig.model_validate({"name": "s", "ema_lengths": [0.1], **changes})


@pytest.mark.unit
def test_a_server_only_for_many_writers_on_a_sqlite_store_of_a_local_ray():
    db = "sqlite:////tmp/x/mlflow.db"
    assert not wants_tracking_server(sweep_of(max_concurrent=SERVER_ABOVE_WRITERS), db, None)
    assert wants_tracking_server(sweep_of(max_concurrent=SERVER_ABOVE_WRITERS + 1), db, None)
    assert wants_tracking_server(sweep_of(tracking_server=True), db, None)
    assert not wants_tracking_server(sweep_of(max_concurrent=64, tracking_server=False), db, None)
    assert not wants_tracking_server(sweep_of(max_concurrent=64), "http://10.0.0.1:5000", None)   # a given server
    assert not wants_tracking_server(sweep_of(max_concurrent=64), db, "10.0.0.1:6379")  # other nodes cannot reach it
    with pytest.raises(ValueError, match="cannot reach"):
        wants_tracking_server(sweep_of(tracking_server=True), db, "10.0.0.1:6379")


def test_the_server_serves_the_store_on_loopback_and_stops(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking_server import TrackingServer
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = TrackingServer(db, tmp_path / "mlartifacts")
    with server as url:
        assert url.startswith("http://127.0.0.1:") and _reachable(url) is None
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("e"))
        client.log_metric(run.info.run_id, "fid", 1.5)
        (tmp_path / "a.txt").write_text("x")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    assert _reachable(url, timeout=1) is not None                  # stopped
    direct = MlflowClient(db)                                       # written through the server into the store
    assert direct.get_run(run.info.run_id).data.metrics["fid"] == 1.5
    assert list((tmp_path / "mlartifacts").rglob("a.txt"))


def test_a_killed_sweep_leaves_no_server(tmp_path):
    """The process that started the server is SIGKILLed (no atexit, no finally): the watchdog ends the server."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.tracking_server import TrackingServer
        s = TrackingServer("sqlite:///{tmp_path / 'mlflow.db'}", "{tmp_path / 'art'}")
        print(s.start(), flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    url = p.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and _reachable(url) is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30
    while _reachable(url, timeout=1) is None and time.time() < deadline:
        time.sleep(0.5)
    assert _reachable(url, timeout=1) is not None, "the server outlived the killed sweep"
