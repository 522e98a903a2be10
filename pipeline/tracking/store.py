"""Where runs live (MLflow): the tracking URI (a project sqlite file by default, a server for many
writers), its checks, clients with bounded requests, the store's tables and the experiment.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PipelineError

# Seconds this process spent talking to MLflow (client creation + every call through RunLogger._call):
# a sweep trial records its share (trial.json "phases"), so the sweep's own overhead is visible.
_SPENT = [0.0]


def seconds_spent() -> float:
    return _SPENT[0]


class TrackingError(PipelineError):
    """The tracking URI cannot work at all (unknown scheme, a database that cannot be created)."""


def tracking_uri(cfg=None) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the project folder. A relative
    sqlite path is the project's too, also from DVC's experiment copies (workspace.py): queued
    experiments log to the same store as `dvc repro`."""
    from ..workspace import shared_path
    uri = (cfg.tracking.uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{shared_path('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):   # relative to the project
        path, _, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{shared_path(path)}" + (f"?{query}" if query else "")
    return uri

KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str) -> None:
    """Fail early, in one line, on a URI that can never work; an unreachable server is not checked
    here (training carries on without it, see RunLogger)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"tracking URI {uri!r}: unknown scheme {scheme or '(none)'!r}; use sqlite:///<file>, "
                            f"http(s)://<server> or a database URI (set tracking.uri or MLFLOW_TRACKING_URI)")
    if scheme == "sqlite":
        path = uri.split("?", 1)[0][len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            folder = Path(path).parent
            if not folder.is_dir():
                raise TrackingError(f"tracking URI {uri!r}: folder {folder} does not exist (the sqlite file "
                                    f"cannot be created)")
            if not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
                raise TrackingError(f"tracking URI {uri!r}: {path} is not writable")


def bound_requests() -> None:
    """MLflow's HTTP client retries with back-off for minutes by default: a few quick tries instead, so a
    closed port or a dead server is one line within seconds (a user's own settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client_for(uri: str, existing: bool = False):
    """An MlflowClient for reading (`pipeline runs`, a sweep's bookkeeping), with the URI checked and a
    server's reachability tested first: any failure is a TrackingError in one line. existing=True: an
    sqlite file must already exist (reading never creates a database)."""
    check_uri(uri)
    if existing and uri.startswith("sqlite:///"):
        path = Path(uri.split("?", 1)[0][len("sqlite:///"):])
        if not path.is_file():
            raise TrackingError(f"no MLflow database at {path} (nothing was logged there yet; give --uri or "
                                f"set tracking.uri)")
    bound_requests()
    why = _reachable(uri)
    if why:
        raise TrackingError(f"tracking server {uri} is unreachable ({why})")
    from mlflow.tracking import MlflowClient
    try:
        init_store(uri)
        return MlflowClient(uri)
    except Exception as err:
        raise TrackingError(f"tracking URI {uri!r} cannot be used: {str(err).strip()[:200] or err!r}") from None

_INITIALISED: set[str] = set()


def init_store(uri: str) -> None:
    """Create a new sqlite store's tables under a file lock: MLflow migrates a fresh database on first use,
    and two processes doing it at once collide (`_alembic_tmp_experiments already exists`)."""
    if not uri.startswith("sqlite:///") or uri in _INITIALISED:
        return
    import fcntl
    path = Path(uri.split("?", 1)[0][len("sqlite:///"):])
    if str(path) == ":memory:" or not path.parent.is_dir():
        return
    import hashlib
    import tempfile
    # The lock lives outside the project (nothing new beside the database in a repository's status).
    name = f"edm2-mlflow-init-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}.lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                 # the others wait here while one migrates
        try:
            from mlflow.tracking import MlflowClient
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _INITIALISED.add(uri)


def ensure_experiment(uri: str, name: str, artifact_dir: str | Path) -> str | None:
    """Make experiment `name` in an sqlite store, its artifacts in the local folder `artifact_dir`, so runs
    log artifacts with or without a tracking server in front of the store. Returns the artifact location
    of an existing experiment that only a server can serve (mlflow-artifacts:...), else None."""
    if not uri.startswith("sqlite:///"):
        return None                                      # a server or database of the user's: its own settings
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, artifact_location=Path(artifact_dir).resolve().as_uri())
        except Exception:                                # made meanwhile by another process
            pass
        exp = client.get_experiment_by_name(name)
    location = exp.artifact_location if exp is not None else ""
    return location if location.startswith("mlflow-artifacts:") else None


def _reachable(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking backend answers, else why not (one line)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                return None if r.status == 200 else f"HTTP {r.status}"
        except Exception as err:                   # refused, timeout, DNS: all mean unreachable
            return f"{err.__class__.__name__}: {err}"
    return None



def runs_table_url(uri: str, experiment: str) -> str | None:
    """The MLflow UI's runs table of `experiment` (MLflow 3 opens on its overview otherwise): on the
    tracking server itself, or on `mlflow ui`'s default address for a local store; None when the store
    or the experiment does not exist (nothing is created by asking)."""
    try:
        exp = client_for(uri, existing=True).get_experiment_by_name(experiment)
    except Exception:                                   # no store yet, a server down: no link
        return None
    if exp is None:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp.experiment_id}/runs"
