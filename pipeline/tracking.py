"""Run identity and MLflow tracking helpers."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path


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

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def tracking_uri(cfg=None) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the project folder."""
    uri = (cfg.tracking.uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
        self.last_step = -1
        self.offline_reason: str | None = None
        if self.enabled:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            why = _reachable(self.uri)
            if why:
                self._go_offline(f"tracking server {self.uri} is unreachable ({why})")
            else:
                from mlflow.tracking import MlflowClient
                self.client = MlflowClient(self.uri)

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
        try:
            return fn(*args, **kwargs)
        except Exception as err:                   # any backend failure: keep training, say it once
            self._go_offline(f"{what} failed ({err.__class__.__name__}: {str(err)[:200]})")
            return None

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
              params: dict | None = None, parent_run_id: str | None = None) -> str | None:
        """Resume `run_id` if given (and it exists), else create a run. Returns the run id."""
        if self.jsonl is not None and self.jsonl.is_file():
            self.last_step = max([json.loads(l).get("step", -1) for l in self.jsonl.read_text().splitlines()
                                  if l.strip()] + [-1])
        if self.client is None:
            self.run_id = run_id
            return run_id
        if run_id:
            run = self._call("resume run", self.client.get_run, run_id)
            if run is not None:
                self.run_id = run_id
                self._call("resume run", self.client.update_run, run_id, status="RUNNING")
                hist = self._call("metric history", self.client.get_metric_history, run_id, "loss") or []
                self.last_step = max([m.step for m in hist] + [self.last_step])
                return run_id
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
        if params:
            self.log_params(params)
        return self.run_id

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
        """Log once per step: a step at or below the last logged one is skipped (resume)."""
        if step <= self.last_step:
            return False
        self.last_step = step
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.client and self.run_id:
            from mlflow.entities import Metric
            ts = int(time.time() * 1000)
            self._call("log metrics", self.client.log_batch, self.run_id,
                       metrics=[Metric(k, v, ts, step) for k, v in clean.items()])
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client and self.run_id:
            self._call("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.client and self.run_id:
            self._call("end run", self.client.set_terminated, self.run_id, status)


def run_tags(stage: str | None = None) -> dict:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tags = {"git_revision": git_revision(), "host": socket.gethostname(), "device": device}
    if stage:
        tags["dvc_stage"] = stage
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
