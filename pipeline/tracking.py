"""Run identity and MLflow tracking helpers."""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import PipelineError
from .io import append_line, read_jsonl

# Seconds this process spent talking to MLflow (client creation + every call through RunLogger._call):
# a sweep trial records its share (trial.json "phases"), so the sweep's own overhead is visible.
_SPENT = [0.0]


def seconds_spent() -> float:
    return _SPENT[0]


class TrackingError(PipelineError):
    """The tracking URI cannot work at all (unknown scheme, a database that cannot be created)."""


@functools.lru_cache(maxsize=None)
def git_revision(cwd: str | None = None) -> str:
    """The project's git revision (with '-dirty' when the tree has changes), or 'unknown'."""
    cwd = cwd or str(Path.cwd())
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


# ----------------------------------------------------------------------------------------------
# MLflow: tracking URI, experiments, runs with explicit ids (resumable, nestable), failure-tolerant.


def tracking_uri(cfg=None) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the project folder. A relative
    sqlite path is the project's too, also from DVC's experiment copies (workspace.py): queued
    experiments log to the same store as `dvc repro`."""
    from .workspace import shared_path
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


class RunLogger:
    """One MLflow run, logged through explicit run ids so it can be resumed (same id after a
    requeue) and nested (parent id tag). Every metric also goes to a local JSONL file. If MLflow is
    unreachable or fails, the logger says so once and carries on with the JSONL file only.
    A step at or below the last step already logged is skipped, so a resumed run never logs a
    step twice."""

    def __init__(self, cfg=None, uri: str | None = None, experiment: str | None = None, enabled: bool = True,
                 jsonl: str | Path | None = None, quiet: bool = False):
        self.uri = uri or tracking_uri(cfg)
        self.experiment = experiment or (cfg.tracking.experiment if cfg is not None else "edm2")
        self.enabled = enabled and (cfg.tracking.enabled if cfg is not None else True)
        self.jsonl = Path(jsonl) if jsonl else None
        self.quiet = quiet
        self.client = None
        self.run_id: str | None = None
        self.last_step_jsonl = -1                  # one watermark per sink: a kill between the two
        self.last_step_mlflow = -1                 # writes must not drop the step from either
        self.offline_reason: str | None = None
        if self.enabled:
            t0 = time.perf_counter()
            self._connect()
            _SPENT[0] += time.perf_counter() - t0

    def _connect(self) -> None:
        """The MLflow client, or offline (said once) when the server does not answer."""
        check_uri(self.uri)
        bound_requests()
        why = _reachable(self.uri)
        if why:
            self._go_offline(f"tracking server {self.uri} is unreachable ({why})")
        else:
            from mlflow.tracking import MlflowClient
            try:
                init_store(self.uri)
                self.client = MlflowClient(self.uri)
            except Exception as err:           # e.g. a file store MLflow 3 refuses, a missing DB driver
                raise TrackingError(f"tracking URI {self.uri!r} cannot be used: "
                                    f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else err!r}") from None

    # --- failure handling ---------------------------------------------------------------------
    def _go_offline(self, reason: str) -> None:
        if self.offline_reason is None:
            self.offline_reason = reason
            if not self.quiet:
                where = f"; metrics continue in {self.jsonl}" if self.jsonl else ""
                print(f"warning: MLflow logging off: {reason}{where}", file=sys.stderr, flush=True)
        self.client = None

    def _call(self, what: str, fn, *args, **kwargs):
        if self.client is None:
            return None
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as err:                   # any backend failure: keep training, say it once
            self._go_offline(f"{what} failed ({err.__class__.__name__}: {str(err)[:200]})")
            return None
        finally:
            _SPENT[0] += time.perf_counter() - t0

    # --- runs -----------------------------------------------------------------------------------
    def experiment_id(self) -> str | None:
        def get_or_create():
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(self.experiment)
            except Exception:                      # created meanwhile by a parallel writer
                return self.client.get_experiment_by_name(self.experiment).experiment_id
        return self._call("experiment", get_or_create)

    def start(self, run_id: str | None = None, run_name: str | None = None, tags: dict | None = None,
              params: dict | None = None, parent_run_id: str | None = None, on_run_id=None) -> str | None:
        """Resume `run_id` if given (and it exists), else create a run. Returns the run id.

        on_run_id(run_id) is called as soon as a new run exists, before anything is logged to it (the
        caller saves the id, so a kill right after cannot leave an orphan run). Params the run does
        not have yet are logged, so a run resumed after such a kill gets them too."""
        self._jsonl_rows = []
        if self.jsonl is not None:
            self._jsonl_rows, notes = read_jsonl(self.jsonl, repair=True)   # a torn last line is dropped
            for note in notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
            self.last_step_jsonl = max([r.get("step", -1) for r in self._jsonl_rows] + [-1])
        if self.client is None:
            self.run_id = run_id
            return run_id
        run = None
        if run_id:
            run = self._call("resume run", self.client.get_run, run_id)
            if run is not None:
                self.run_id = run_id
                self._call("resume run", self.client.update_run, run_id, status="RUNNING")
                hist = self._call("metric history", self.client.get_metric_history, run_id, "loss") or []
                self._mlflow_steps = {m.step for m in hist}
                self.last_step_mlflow = max(self._mlflow_steps | {-1})
        if run is None:
            exp_id = self.experiment_id()
            if exp_id is None:
                return None
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self._call("create run", self.client.create_run, exp_id, run_name=run_name, tags=all_tags)
            if run is None:
                return None
            self.run_id = run.info.run_id
            self._mlflow_steps = set()
            if on_run_id is not None:
                on_run_id(self.run_id)
        if params:
            have = run.data.params if run.data is not None else {}
            self.log_params({k: v for k, v in params.items() if k not in have})
        return self.run_id

    def replay_missing(self) -> int:
        """Log the metrics-file steps that MLflow lacks (logged while it was unreachable), once each,
        in step order. Returns how many steps were replayed."""
        if not (self.client and self.run_id and self.jsonl is not None):
            return 0
        from mlflow.entities import Metric
        have = getattr(self, "_mlflow_steps", set())
        todo = [r for r in getattr(self, "_jsonl_rows", []) if r.get("step") is not None and r["step"] not in have]
        for r in sorted(todo, key=lambda r: r["step"]):
            ts = int(float(r.get("time", time.time())) * 1000)
            metrics = [Metric(k, float(v), ts, int(r["step"])) for k, v in r.items()
                       if k not in ("step", "time") and isinstance(v, (int, float))]
            if self._call("replay metrics", self.client.log_batch, self.run_id, metrics=metrics) is None \
                    and self.client is None:
                return 0
            have.add(r["step"])
        self._mlflow_steps = have
        self.last_step_mlflow = max(have | {self.last_step_mlflow})
        if todo and not self.quiet:
            print(f"note: replayed {len(todo)} logged step(s) into MLflow run {self.run_id} "
                  f"(they were written while it was unreachable)", file=sys.stderr, flush=True)
        return len(todo)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):        # MLflow's batch limit
            self._call("log params", self.client.log_batch, self.run_id, params=items[i:i + 100]) \
                if self.client and self.run_id else None

    def set_tags(self, tags: dict) -> None:
        if self.client and self.run_id:
            for k, v in tags.items():
                self._call("set tag", self.client.set_tag, self.run_id, k, str(v))

    def log_metrics(self, metrics: dict, step: int) -> bool:
        """Log once per step and sink: a step at or below a sink's last logged one is skipped there."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        wrote = False
        if self.jsonl is not None and step > self.last_step_jsonl:
            append_line(self.jsonl, json.dumps({"step": step, "time": time.time(), **clean}))   # all or nothing
            self.last_step_jsonl, wrote = step, True
        if self.client and self.run_id and step > self.last_step_mlflow:
            from mlflow.entities import Metric
            self.last_step_mlflow, wrote = step, True
            ts = int(time.time() * 1000)
            self._call("log metrics", self.client.log_batch, self.run_id,
                       metrics=[Metric(k, v, ts, step) for k, v in clean.items()])
        return wrote

    def log_metrics_at(self, metrics: dict, step: int) -> None:
        """Extra metrics at a step already logged (e.g. a validation loss): MLflow only, no watermark."""
        if self.client and self.run_id:
            from mlflow.entities import Metric
            ts = int(time.time() * 1000)
            self._call("log metrics", self.client.log_batch, self.run_id,
                       metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None])

    def log_summary(self, metrics: dict) -> None:
        """Run-level numbers (cost, final values), logged at step 0 and replaced on each call."""
        if self.client and self.run_id:
            from mlflow.entities import Metric
            ts = int(time.time() * 1000)
            self._call("log summary", self.client.log_batch, self.run_id,
                       metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client and self.run_id:
            self._call("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.client and self.run_id:
            self._call("end run", self.client.set_terminated, self.run_id, status)


def log_ema_run(logger, parent_run_id: str | None, record: dict, grid: Path | None = None) -> str | None:
    """A child run of a training run for one evaluation (EMA length x settings), keyed by the whole
    record (`eval_key`): the same evaluation again (a retry) reuses its run, other settings (sampler,
    image count, seeds, reference, feature net) get a new one beside it."""
    if logger.client is None or parent_run_id is None:
        return None
    from .records import eval_key, record_metrics, to_row
    key = record.get("eval_key") or eval_key(record)
    tag = f"{record['sigma_rel']:.3f}"
    exp_id = logger.experiment_id()
    found = logger._call("search runs", logger.client.search_runs, [exp_id],
                         f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.eval_key = '{key}'")
    if found:
        return found[0].info.run_id
    child = RunLogger(uri=logger.uri, experiment=logger.experiment, quiet=True)
    s = record["sampler"]
    guide = record.get("guide", "none")
    guided = s["guidance"] != 1.0 and guide != "none"
    extra = record.get("extra") or {}
    run_id = child.start(run_name=f"ema-{tag}-nfe{s['nfe']}-n{record['num_images']}"
                                  + (f"-w{s['guidance']:g}-{guide.replace(' ', '-')}" if guided else "")
                                  + (f"-t{record.get('nimg')}" if extra.get("nimg_axis") else ""),
                         parent_run_id=parent_run_id,
                         tags={"ema_sigma_rel": tag, "kind": "ema", "eval_key": key, "feature_net": record["feature_net"],
                               "reference": record["reference"], "model_file": record["model_file"],
                               **({"same_as": extra["same_as"]} if extra.get("same_as") else {})},
                         params={"sigma_rel": record["sigma_rel"], "guide": guide, "num_images": record["num_images"],
                                 "ref_num_images": record["ref_num_images"], "nfe": s["nfe"], "steps": s["steps"],
                                 "churn": s["churn"], "guidance": s["guidance"], "nimg": record.get("nimg"),
                                 "seeds": f"{record['seeds'][0]}-{record['seeds'][1]}",
                                 "bootstrap_resamples": (record.get("bootstrap") or {}).get("resamples")})
    row = to_row(record)                                     # every metric: <name>, _se, _lo, _hi
    metrics = {k: row[k] for name in record_metrics(record) for k in (name, f"{name}_se", f"{name}_lo", f"{name}_hi")
               if isinstance(row.get(k), (int, float))}
    metrics["kid_std"] = record.get("kid_std")                # its name in earlier runs
    child.log_metrics(metrics, step=int(record.get("nimg") or 0))
    if grid is not None and grid.is_file():
        child.log_artifact(grid, "samples")
    child.end()
    return run_id


def log_ema_runs(logger, parent_run_id: str | None, records, samples_dir: Path | None = None) -> list:
    """One grandchild run per FID record (EMA length) under a training run, with its sample grid."""
    out = []
    for r in records:
        name = (r.get("extra") or {}).get("samples") or f"samples-{Path(r['model_file']).stem}.png"
        grid = Path(samples_dir) / name if samples_dir else None
        out.append(log_ema_run(logger, parent_run_id, r, grid))
    return out


def attach(cfg, run_id: str | None, quiet: bool = True) -> "RunLogger":
    """A logger on an existing run, for adding artifacts or child runs without reopening it."""
    logger = RunLogger(cfg, quiet=quiet)
    logger.run_id = run_id
    return logger


def run_tags(stage: str | None = None) -> dict:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tags = {"git_revision": git_revision(), "host": socket.gethostname(), "device": device}
    if stage:
        tags["dvc_stage"] = stage
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    from .backends import job_env
    env = job_env()
    if env.scheduler and env.job_id:                        # e.g. slurm_job_id
        tags[f"{env.scheduler}_job_id"] = env.job_id
    return tags


# ----------------------------------------------------------------------------------------------
# Reading results back: MLflow -> pandas.

def load_runs(experiment: str, uri: str | None = None, sweep: str | None = None):
    """One row per (training run or trial) x post-hoc point, from MLflow: the run's swept/config
    params, the EMA length, guide and guidance weight, its FID and FID record fields, and the cost
    (seconds, GPU-seconds). A training run without evaluations yet has one row (no FID, its final loss).

    `sweep`: a sweep name (parent run `sweep-<name>`) or a parent run id to restrict to one sweep.
    """
    import pandas as pd
    client = client_for(uri or tracking_uri(), existing=True)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as err:                        # a database that is not MLflow's, a server error
        raise TrackingError(f"tracking URI {client.tracking_uri!r}: {err.__class__.__name__}: "
                            f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}") from None
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}")
    runs = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    by_id = {r.info.run_id: r for r in runs}
    sweep_ids = None
    if sweep:
        sweep_ids = {r.info.run_id for r in runs if r.info.run_id == sweep or r.info.run_name == f"sweep-{sweep}"}
        if not sweep_ids:
            raise TrackingError(f"no sweep {sweep!r} in experiment {experiment!r}")
    rows = []
    for r in runs:
        if r.data.tags.get("kind") != "ema":
            continue
        train = by_id.get(r.data.tags.get("mlflow.parentRunId"))
        if train is None:
            continue
        parent_id = train.data.tags.get("mlflow.parentRunId")
        if sweep_ids is not None and parent_id not in sweep_ids:
            continue
        parent = by_id.get(parent_id)
        seconds = train.data.metrics.get("train_seconds")
        gpus = float(train.data.tags.get("gpus", "0") or 0)
        row = {"sweep": parent.info.run_name if parent else None, "run_id": train.info.run_id,
               "run_name": train.info.run_name, "status": train.info.status,
               "sigma_rel": float(r.data.params.get("sigma_rel", "nan")),
               "guide": r.data.params.get("guide", "none"), "guidance": float(r.data.params.get("guidance", 1.0)),
               "same_as": r.data.tags.get("same_as"), "fid": None, "fid_se": None, "kid": None,
               **r.data.metrics,                                  # every metric the record had: fid, kid, precision ...
               "num_images": int(r.data.params.get("num_images", 0)), "nfe": int(r.data.params.get("nfe", 0)),
               "ref_num_images": int(r.data.params.get("ref_num_images", 0)), "seeds": r.data.params.get("seeds"),
               "feature_net": r.data.tags.get("feature_net"), "reference": r.data.tags.get("reference"),
               "train_seconds": seconds, "gpu_seconds": seconds * gpus if seconds is not None else None}
        row.update({f"param.{k}": _parse(v) for k, v in train.data.params.items()})
        rows.append(row)
    evaluated = {row["run_id"] for row in rows}
    for train in runs:                                 # trainings without evaluations (e.g. a SLURM job): one row each
        tags = train.data.tags
        if "run_key" not in tags or tags.get("kind") in ("ema", "sweep") or train.info.run_id in evaluated:
            continue
        parent_id = tags.get("mlflow.parentRunId")
        if sweep_ids is not None and parent_id not in sweep_ids:
            continue
        parent = by_id.get(parent_id)
        seconds = train.data.metrics.get("train_seconds")
        row = {"sweep": parent.info.run_name if parent else None, "run_id": train.info.run_id,
               "run_name": train.info.run_name, "status": train.info.status, "fid": None,
               "final_loss": train.data.metrics.get("final_loss"), "train_seconds": seconds,
               "gpu_seconds": seconds * float(tags.get("gpus", "0") or 0) if seconds is not None else None,
               "evaluated": False}
        row.update({f"param.{k}": _parse(v) for k, v in train.data.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        params = [c for c in df.columns if c.startswith("param.")]
        varying = [c for c in params if df[c].astype(str).nunique() > 1 and not c.endswith("run_dir")]
        df = df.drop(columns=[c for c in params if c not in varying])     # keep what differs between runs
        order = [c for c in ("fid", "run_name", "sigma_rel") if c in df.columns]   # trainings alone have no sigma_rel
        df = df.sort_values(order).reset_index(drop=True)
    return df


def _parse(v: str):
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v
