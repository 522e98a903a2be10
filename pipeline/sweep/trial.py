"""One trial, inside a Ray worker: train with a report at every snapshot (a scheduler may stop it),
then the post-hoc EMA fan-out (reconstruction + metrics per EMA length, no retraining), reported to
Tune and logged to MLflow as children of the trial's run.

The worker receives a typed `TrialSpec` (the base config and the sweep, validated once by the
driver) plus Tune's values for this trial; its own state lives in trials/<name>/trial.json, which the
results table and --resume read (never Ray's pickled state).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as C
from ..io import atomic_write_text
from ..errors import SweepError
from .schema import SweepConfig, ValidationSpec, sweep_overrides, wants_validation
from .space import split_config
from .trial_state import read_trial_state, record_node, trial_nodes, write_trial_state

_WORKER_TRIALS = [0]            # trials this process has run (Ray reuses a worker: only the first pays the start)


def process_started_at() -> float | None:
    """This process's start (epoch seconds) from /proc; None where there is no /proc."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])    # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep shares, built once by the driver."""
    base: C.Config                      # the base config with the sweep's fixed overrides
    sweep: SweepConfig
    parent_run_id: str | None           # the sweep's MLflow run
    uri: str                            # MLflow tracking URI
    device: str                         # cpu | cuda (the cluster's answer to resources.gpus)
    ref_cache: str                      # the sweep's reference-statistics cache
    root: str                           # the project folder (relative paths of the params)
    figures: bool = True                # per-trial figures (schema.wants_trial_figures)
    # What a trial runs, "module:function" of (job, report): trial_body here; the sweep-scale benchmark
    # puts a stub behind the same orchestration (Tune, trial records, MLflow runs, table, report).
    body: str = "pipeline.sweep.trial:trial_body"
    created_at: float | None = None     # when the driver started the trials (epoch seconds): "worker_start"

    def trial_dir(self, trial_id: str) -> Path:
        return Path(self.sweep.storage if Path(self.sweep.storage).is_absolute()
                    else Path(self.root) / self.sweep.storage).resolve() / self.sweep.name / "trials" / trial_id

    def config(self, values: dict, trial_dir: Path) -> C.Config:
        """The trial's config: the base, the sweep's fixed overrides and `values` ({dotted key: value})."""
        overrides = {**sweep_overrides(self.sweep), **values, "train.run_dir": str(trial_dir / "run"),
                     "tracking.uri": self.uri, "tracking.experiment": self.sweep.experiment,
                     "train.device": self.device}
        return C.resolve({k: v for k, v in self.base.to_dict().items() if k != "preset"}, overrides)


def run_trial(params: dict, spec: TrialSpec) -> None:
    """Tune's trainable: train -> post-hoc EMA fan-out -> metrics per EMA length.

    One training process runs here, in the trial's worker; resources.workers > 1 runs the training
    (and then the fan-out on rank 0) in a Ray Train TorchTrainer whose reports reach Tune."""
    from ray import tune
    _quiet_stop()
    entered = time.time()
    # A fresh worker's start (process start or, for a worker Ray started ahead, the trials' start, to here:
    # deserialising the trainable, the stack's imports), 0 for a worker Ray reuses.
    born = max(process_started_at() or entered, spec.created_at or 0.0)
    worker_start = max(entered - born, 0.0) if _WORKER_TRIALS[0] == 0 else 0.0
    _WORKER_TRIALS[0] += 1
    os.chdir(spec.root)                                      # relative paths of the params file
    trial_id, values = split_config(params, tune.get_context().get_trial_id())
    trial_dir = spec.trial_dir(trial_id)
    trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(os.getpid()), trial_dir / "worker.pid")   # lets tests (and users) find the worker
    record_node(trial_dir)
    # started_at / updated_at / ended_at (epoch seconds): the sweep report's trial timeline.
    write_trial_state(trial_dir, trial_id=trial_id, params=values, status="running", started_at=entered,
                      phases={"worker_start": round(worker_start, 3)})
    try:
        _run(trial_id, trial_dir, values, spec.config(values, trial_dir), spec)
    except Exception as err:                                 # the trial's own record of why (Tune retries it)
        write_trial_state(trial_dir, status="error", error=f"{err.__class__.__name__}: {str(err)[:300]}",
                          ended_at=time.time())
        raise
    write_trial_state(trial_dir, ended_at=time.time())


def _run(trial_id: str, trial_dir: Path, values: dict, cfg: C.Config, spec: TrialSpec) -> None:
    from ray import tune
    job = {"config": cfg, "trial_id": trial_id, "trial_dir": str(trial_dir), "spec": spec, "values": values}
    res = spec.sweep.resources
    if res.workers == 1:
        body(spec)(job, tune.report)
        return
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    use_gpu = spec.device == "cuda"
    trainer = TorchTrainer(
        train_worker, train_loop_config=job, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus / res.workers} if use_gpu else {})}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=str(trial_dir / "ray-train"),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=spec.sweep.max_failures)))
    trainer.fit()


def body(spec: TrialSpec):
    import importlib
    module, name = spec.body.split(":")
    return getattr(importlib.import_module(module), name)


def train_worker(job: dict) -> None:
    """One Ray Train worker of a multi-process trial: DDP training, then rank 0's fan-out."""
    import ray.train
    import ray.train.torch
    os.chdir(job["spec"].root)
    trial_body(job, ray.train.report, device=ray.train.torch.get_device())


def trial_body(job: dict, report, device=None) -> None:
    """Train with a report at every snapshot, then on rank 0 the post-hoc EMA fan-out; every rank
    reports the final result (Ray Train wants the same number of reports from every worker). Where the
    trial's time went is recorded in trial.json ("phases", seconds: results.PHASES)."""
    t0 = time.perf_counter()
    import torch.distributed as dist

    from ..tracking.store import seconds_spent
    from ..training import TrainHooks, train
    cfg, spec = job["config"], job["spec"]
    trial_id, trial_dir = job["trial_id"], Path(job["trial_dir"])
    from ..devices import use_given_cpus
    os.environ["EDM2_TRIAL_CPUS"] = str(max(1, int(spec.sweep.resources.cpus)))   # Ray's CPUs for this process
    use_given_cpus()
    phases = {"worker_start": time.perf_counter() - t0 if _WORKER_TRIALS[0] <= 1 else 0.0, "validation": 0.0}
    last = {}
    multi = dist.is_available() and dist.is_initialized()
    rank0 = not multi or dist.get_rank() == 0

    def on_snapshot(nimg, metrics):
        last.update(metrics)
        if rank0:
            write_trial_state(trial_dir, nimg=nimg, updated_at=time.time(), **metrics)
        report({"nimg": nimg, **metrics})

    # Only when used (a scheduler ranks by it, or validation.enabled); never on a latent run, whose reference
    # is pixels (for FID): the driver refuses a val_loss scheduler there.
    validate = None if cfg.data.encoder == "vae" or not wants_validation(spec.sweep) else make_validator(
        cfg, spec.sweep.validation, device if device is not None else cfg.train.device)
    if validate is not None:
        validate = _timed(validate, phases, "validation")
    # MLflow params: what the sweep varies and the run key, not ~100 fields with paths (config.yaml has them all).
    logged = {**job.get("values", {}), "run_key": cfg.run_key()}
    t_train, tracked = time.perf_counter(), seconds_spent()
    hooks = TrainHooks(stage="sweep", progress=False, report=on_snapshot, validate=validate,
                       parent_run_id=spec.parent_run_id, run_name=f"trial-{trial_id}", mlflow_params=logged,
                       tags={"sweep": spec.sweep.name, "trial": trial_id})
    res = train(cfg, hooks, device=device)
    phases["tracking"] = seconds_spent() - tracked
    phases["training"] = time.perf_counter() - t_train - phases["tracking"] - phases["validation"]
    if res.status != "finished":
        raise SweepError(f"trial {trial_id} stopped at nimg={res.nimg} before the end of training")
    records = fan_out(cfg, res, trial_dir, spec.ref_cache, device, figures=spec.figures, phases=phases) \
        if rank0 else None
    if multi:                                                # rank 0's records to every rank
        box = [records]
        dist.broadcast_object_list(box, src=0)
        records = box[0]
    best = min(records, key=lambda r: r["fid"])
    if rank0:
        prior = read_trial_state(trial_dir).get("phases") or {}
        phases["worker_start"] += prior.get("worker_start", 0.0)
        # ended_at before the final report: Tune may end the function as soon as it reports done.
        write_trial_state(trial_dir, status="finished", nimg=res.nimg, best_fid=best["fid"],
                          best_sigma_rel=best["sigma_rel"], phases={k: round(v, 3) for k, v in phases.items()},
                          ended_at=time.time())
    report({"nimg": res.nimg, **last, "best_fid": best["fid"], "best_sigma_rel": best["sigma_rel"],
            "best_fid_se": best.get("fid_se"),
            "fids": json.dumps({f"{r['sigma_rel']:.3f}": r["fid"] for r in records}), "done": True})


def _timed(fn, phases: dict, name: str):
    """fn, adding its wall time to phases[name]."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t0
    return wrapped


def fan_out(cfg: C.Config, res, trial_dir: Path, ref_cache: str, device=None, figures: bool = True,
            phases: dict | None = None) -> list[dict]:
    """Post-hoc EMA fan-out, no retraining: evaluate.evaluate_run reconstructs and measures every EMA
    length (a retry reuses finished records); here the results go to MLflow as child runs of the
    trial's run, with the trial's best FID / EMA length / KID on the trial run itself. figures=False
    skips the per-trial figures (large sweeps: the sweep report draws the best trials). `phases`, when
    given, gets the seconds of evaluation, figures and tracking (MLflow) added."""
    from ..evaluate import evaluate_run
    from ..tracking.logger import RunLogger, log_ema_runs
    from ..tracking.store import seconds_spent
    phases = {} if phases is None else phases
    device = str(device) if device is not None else cfg.train.device     # TrialSpec.config set cpu or cuda
    t0 = time.perf_counter()
    records = evaluate_run(cfg, Path(cfg.train.run_dir) / "snapshots", trial_dir, ref_cache, device)
    phases["evaluation"] = phases.get("evaluation", 0.0) + time.perf_counter() - t0
    tracked = seconds_spent()
    logger = RunLogger(cfg, quiet=True)
    nodes = trial_nodes(trial_dir)
    if nodes:
        logger.run_id = res.mlflow_run_id
        logger.set_tags({"node": nodes[-1], "nodes": ",".join(nodes)})
    log_ema_runs(logger, res.mlflow_run_id, records, trial_dir / "samples")
    logger.run_id = res.mlflow_run_id
    if figures:
        t1, t1_tracked = time.perf_counter(), seconds_spent()
        _trial_figures(logger, records, trial_dir)
        phases["figures"] = phases.get("figures", 0.0) + time.perf_counter() - t1 - (seconds_spent() - t1_tracked)
    best = min(records, key=lambda r: r["fid"])
    logger.log_summary({"best_fid": best["fid"], "best_fid_se": best.get("fid_se"),
                        "best_sigma_rel": best["sigma_rel"], "best_kid": best.get("kid")})
    phases["tracking"] = phases.get("tracking", 0.0) + seconds_spent() - tracked
    return records


def _trial_figures(logger, records: list[dict], trial_dir: Path) -> None:
    from ..records import computed, is_grid
    from ..figures import curve_label, plot_fid_vs_ema, plot_guidance_grid
    grid = is_grid(records)
    distinct = [{**r, "label": curve_label(r) if grid else ""} for r in computed(records)]
    fig = plot_fid_vs_ema(distinct, trial_dir / "fid_vs_ema.png", f"trial {trial_dir.name}")   # EDM2 fig. 5 curve
    logger.log_artifact(fig, "figures")
    if grid:                                                 # the post-hoc grid: EMA length x w per guide
        heat = plot_guidance_grid(records, trial_dir / "fid_grid.png", f"trial {trial_dir.name}: FID over EMA "
                                  f"length x guidance, per guide (* the best)")
        if heat is not None:
            logger.log_artifact(heat, "figures")


def make_validator(cfg: C.Config, spec: ValidationSpec, device=None):
    """validate(net) -> the fixed validation loss (edm.validation_loss) on the first spec.num_images of
    the FID reference set, the same images, levels and noise for every trial."""
    import torch

    from ..data.encoded import EncodedDataset
    from ..devices import pick_device
    from ..edm import validation_loss
    from ..fid import reference_dataset_dir
    ds = EncodedDataset(reference_dataset_dir(cfg))
    n = min(spec.num_images, len(ds))
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto", "train.device")
    images, labels = ds.get(list(range(n)), generator=torch.Generator().manual_seed(spec.seed))
    images = images.to(dev)
    label_dim = cfg.network.label_dim if cfg.network.label_dim is not None else \
        (ds.label_dim if cfg.data.use_labels else 0)
    labels = labels.to(dev) if labels is not None and label_dim else None
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(spec.seed + 1)).to(dev)
    return lambda net: validation_loss(net, images, labels, spec.sigmas, eps, cfg.loss.sigma_data)


# ----------------------------------------------------------------------------------------------


def _quiet_stop() -> None:
    """When Tune stops a trial (a scheduler, the end of the sweep), Ray's SIGTERM handler raises
    SystemExit in the worker's main thread, wherever it is; inside a finaliser Python prints it as
    "Exception ignored ... SystemExit" with a traceback, which reaches the driver's output. That exit is
    the intended stop: drop exactly that report and keep every other one. Installed once per process: a
    reused worker (reuse_actors) runs many trials."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_stop", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)
    hook.quiet_stop = True
    sys.unraisablehook = hook
