"""One MLflow run as the pipeline writes it: identity (explicit run ids, so a resumed job continues
its run), params, tags and metrics, failure-tolerant (an unreachable store queues the metrics in the
run folder and replays them later), and the nested EMA-reconstruction runs under a training.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..io import append_line, read_jsonl
from ..provenance import git_revision
from .store import _SPENT, TrackingError, _reachable, bound_requests, check_uri, init_store, tracking_uri


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
    from ..records import eval_key, record_metrics, to_row
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
    if child.client is not None:                               # the whole record: `pipeline compare <run id>`
        child._call("log record", child.client.log_dict, run_id, {**record, "eval_key": key}, "record.json")
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


def training_run_name(cfg, origin: str, params_path=None, limit: int = 3) -> str:
    """What a training run is, at a glance in MLflow's runs table: where it ran (dvc, slurm, local), the
    DVC experiment or the preset, the training values that differ from the committed params file (up to
    `limit`), and the short run key, e.g. 'dvc-train exp-1a2b3 ref_lr=0.005 dd90f998'."""
    from ..config import resolve
    parts = [f"{origin}-train"]
    if os.environ.get("DVC_EXP_NAME"):
        parts.append(os.environ["DVC_EXP_NAME"])
    elif cfg.preset:
        parts.append(cfg.preset)
    if params_path is not None:
        from ..cli import committed_params
        raw = committed_params(params_path)
        try:
            before = resolve(raw, where=None).key_flat() if raw is not None else None
        except Exception:                                   # an older or invalid committed file: no comparison
            before = None
        if before is not None:
            now = cfg.key_flat()
            changed = [k for k in sorted(now) if now[k] != before.get(k)]
            parts += [f"{k.rsplit('.', 1)[-1]}={now[k]}" for k in changed[:limit]]
            if len(changed) > limit:
                parts.append(f"+{len(changed) - limit}")
    parts.append(cfg.run_key()[:8])
    return " ".join(parts)


def run_tags(stage: str | None = None) -> dict:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tags = {"git_revision": git_revision(), "host": socket.gethostname(), "device": device}
    if stage:
        tags["dvc_stage"] = stage
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    from ..backends import job_env
    env = job_env()
    if env.scheduler and env.job_id:                        # e.g. slurm_job_id
        tags[f"{env.scheduler}_job_id"] = env.job_id
    return tags

