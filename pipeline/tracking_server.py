"""An MLflow tracking server for a sweep's many writers: `mlflow server` over the sweep's own store (one
writer: the server), bound to 127.0.0.1 on a free port, stopped when the sweep ends (and by a
watchdog if the sweep's process dies first). Trials then log over HTTP instead of each opening the
sqlite file. docs/sweeps.md, "MLflow with many writers".
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .tracking.store import TrackingError, _reachable

START_TIMEOUT_S = 120.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrackingServer:
    """`with TrackingServer(backend_uri, artifacts_dir) as url:` -> http://127.0.0.1:<port>."""

    def __init__(self, backend_uri: str, artifacts_dir: str | Path, host: str = "127.0.0.1",
                 port: int | None = None):
        self.backend_uri, self.artifacts_dir, self.host = backend_uri, Path(artifacts_dir), host
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> str:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self._log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.artifacts_dir), "--host", self.host, "--port", str(self.port),
               "--workers", "1"]
        # A session of its own: a terminal's Ctrl-C reaches the sweep only (which still needs the server to
        # close its runs). A shell watchdog ends the server when the sweep's process is gone, killed or not.
        watch = (f"{shlex.join(cmd)} & s=$!; while kill -0 {os.getpid()} 2>/dev/null && kill -0 $s 2>/dev/null; "
                 f"do sleep 1; done; kill $s 2>/dev/null; wait $s")
        self.process = subprocess.Popen(["sh", "-c", watch], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + START_TIMEOUT_S
        while _reachable(self.url, timeout=2) is not None:
            if self.process.poll() is not None or time.time() > deadline:
                why = self._tail()
                self.stop()
                raise TrackingError(f"the MLflow server for {self.backend_uri} did not start on {self.url} "
                                    f"within {START_TIMEOUT_S:.0f} s: {why or 'no output'}")
            time.sleep(0.3)
        return self.url

    def _tail(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-400:]

    def stop(self) -> None:
        """SIGTERM to the server's process group (the watchdog, mlflow, uvicorn), until the group is gone;
        SIGKILL after 20 s."""
        if self.process is not None:
            group, deadline = self.process.pid, time.time() + 20
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(group, sig)
                    while time.time() < deadline:
                        self.process.poll()                  # reap the watchdog (a zombie still counts)
                        os.killpg(group, 0)                  # raises once no process of the group is left
                        time.sleep(0.1)
                except ProcessLookupError:
                    break
            self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
