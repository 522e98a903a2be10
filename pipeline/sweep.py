"""Ray Tune sweeps over learning rate, noise distribution and EMA length (sweeps/*.yaml).

Each trial trains one configuration with the same library code as the DVC train stage, reports its
loss to Tune at every snapshot (ASHA can stop it early), and at the end fans out the post-hoc EMA
lengths: reconstruction + FID for each, no retraining. MLflow: one parent run per sweep, a child
per trial, a grandchild per EMA length. Results: a pandas table (one row per trial x EMA length)
and figures under reports/sweeps/<name>/.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .io import atomic_write_text
from .errors import PipelineError

AXIS_SEP = "__"                     # Tune flattens nested keys with "/": keep dotted keys flat and safe


class SweepError(PipelineError, ValueError):
    pass


def axis_name(key: str) -> str:
    return key.replace(".", AXIS_SEP)


def axis_key(name: str) -> str:
    return name.replace(AXIS_SEP, ".")


def sweep_tracking_uri(base: C.Config) -> str:
    """The base config's tracking URI; a local sqlite file gets a busy timeout for parallel trials."""
    from .tracking import tracking_uri
    uri = tracking_uri(base)
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        uri += ("&" if "?" in uri else "?") + "timeout=60"
    return uri


def make_private(folder: Path) -> None:
    """Create the sweep's storage folder (and its parent) readable and writable by its owner only:
    Ray's `Tuner.restore` unpickles files in it, so nobody else may place files there."""
    for d in (folder.parent, folder):
        d.mkdir(parents=True, exist_ok=True)
        if d.stat().st_uid == os.getuid():
            os.chmod(d, 0o700)


def check_private(folder: Path) -> None:
    """Refuse to resume from a sweep folder that someone else owns or can write to (anything in it,
    or the folder above it): resuming unpickles Ray's state files, which can run code."""
    import stat

    def why_not(path: Path) -> str | None:
        st = path.lstat()
        if st.st_uid != os.getuid():
            return f"owned by uid {st.st_uid}"
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "writable by others"
        return None

    paths = [folder.parent, folder] + [Path(d) / n for d, dirs, files in os.walk(folder) for n in dirs + files]
    for path in paths:
        why = why_not(path)
        if why:
            raise SweepError(f"refusing to resume: {path} is {why}; --resume unpickles Ray's files in {folder}, "
                             f"so it must be private to you (chmod -R go-w, or start under a new sweep name)")


def param_space(sweep: C.SweepConfig) -> dict:
    from ray import tune
    space = {}
    for key, a in sweep.search.items():
        name = axis_name(key)
        if a.grid is not None:
            space[name] = tune.grid_search(list(a.grid))
        elif a.choice is not None:
            space[name] = tune.choice(list(a.choice))
        elif a.uniform is not None:
            space[name] = tune.uniform(*a.uniform)
        else:
            space[name] = tune.loguniform(*a.loguniform)
    return space


# ----------------------------------------------------------------------------------------------
# One trial (runs inside a Ray worker).

def trial_config(base_raw: dict, sweep_raw: dict, params: dict, trial_dir: Path, uri: str, device: str) -> C.Config:
    sweep = C.SweepConfig.model_validate(sweep_raw)
    overrides = {**sweep.overrides, **{axis_key(k): v for k, v in params.items()},
                 "train.run_dir": str(trial_dir / "run"), "tracking.uri": uri,
                 "tracking.experiment": sweep.experiment, "train.device": device}
    if sweep.ema_lengths:
        overrides["ema.targets"] = list(sweep.ema_lengths)
    return C.resolve(base_raw, overrides)


def run_trial(params: dict, base_raw: dict, sweep_raw: dict, parent_run_id: str | None, uri: str, device: str,
              ref_cache: str, root: str) -> None:
    """Train -> post-hoc EMA fan-out -> FID per EMA length; results reported to Tune and MLflow.

    One training process runs here, in the trial's worker; resources.workers > 1 runs the training
    (and then the fan-out on rank 0) in a Ray Train TorchTrainer whose reports reach Tune."""
    from ray import tune
    os.chdir(root)                                          # relative paths of the params file
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(sweep_raw["storage"]).resolve() / sweep_raw["name"] / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(os.getpid()), trial_dir / "worker.pid")   # lets tests (and users) find the worker
    cfg = trial_config(base_raw, sweep_raw, params, trial_dir, uri, device)
    job = {"config": cfg.to_dict(), "trial_id": trial_id, "trial_dir": str(trial_dir), "parent_run_id": parent_run_id,
           "ref_cache": ref_cache, "root": root}
    res = C.SweepConfig.model_validate(sweep_raw).resources
    if res.workers == 1:
        trial_body(job, tune.report)
        return
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    use_gpu = device == "cuda"
    trainer = TorchTrainer(
        train_worker, train_loop_config=job, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus / res.workers} if use_gpu else {})}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=str(trial_dir / "ray-train"),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=sweep_raw["max_failures"])))
    trainer.fit()


def train_worker(job: dict) -> None:
    """One Ray Train worker of a multi-process trial: DDP training, then rank 0's fan-out."""
    import ray.train
    import ray.train.torch
    os.chdir(job["root"])
    trial_body(job, ray.train.report, device=ray.train.torch.get_device())


def trial_body(job: dict, report, device=None) -> None:
    """Train with a report at every snapshot, then on rank 0 the post-hoc EMA fan-out; every rank
    reports the final result (Ray Train wants the same number of reports from every worker)."""
    import torch.distributed as dist

    from .training import train
    cfg = C.resolve(job["config"])
    trial_id, trial_dir = job["trial_id"], Path(job["trial_dir"])
    last = {}

    def on_snapshot(nimg, metrics):
        last.update(metrics)
        report({"nimg": nimg, **metrics})

    res = train(cfg, stage="sweep", progress=False, report=on_snapshot, parent_run_id=job["parent_run_id"],
                run_name=f"trial-{trial_id}", device=device)
    if res.status != "finished":
        raise SweepError(f"trial {trial_id} stopped at nimg={res.nimg} before the end of training")
    multi = dist.is_available() and dist.is_initialized()
    records = fan_out(cfg, res, trial_dir, job["ref_cache"], device) if not multi or dist.get_rank() == 0 else None
    if multi:                                                # rank 0's records to every rank
        box = [records]
        dist.broadcast_object_list(box, src=0)
        records = box[0]
    best = min(records, key=lambda r: r["fid"])
    report({"nimg": res.nimg, **last, "best_fid": best["fid"], "best_sigma_rel": best["sigma_rel"],
            "fids": json.dumps({f"{r['sigma_rel']:.3f}": r["fid"] for r in records}), "done": True})


def fan_out(cfg: C.Config, res, trial_dir: Path, ref_cache: str, device=None) -> list[dict]:
    """Post-hoc EMA fan-out, no retraining: one reconstruction and one FID per EMA length, logged as
    grandchild MLflow runs under the trial's run. A retry after the FIDs were done reuses them."""
    from .data import EncodedDataset
    from .fid import evaluate_models, load_feature_net, reference_dataset_dir, reference_stats
    from .phema import reconstruct
    from .report import plot_fid_vs_ema
    from .tracking import RunLogger, log_ema_runs
    device = str(device) if device is not None else cfg.train.device     # trial_config set cpu or cuda
    ema_dir = trial_dir / "ema"
    reconstruct(Path(cfg.train.run_dir) / "snapshots", cfg.ema.targets, out_dir=ema_dir)
    records_file = trial_dir / "fid_records.json"
    if records_file.is_file():
        records = json.loads(records_file.read_text())
    else:
        feat = load_feature_net(cfg.fid.feature_net, device)
        ref = reference_stats(EncodedDataset(reference_dataset_dir(cfg)), feat, cfg.fid.ref_num_images, ref_cache,
                              cfg.fid.batch_size, progress=False)
        files = [ema_dir / t["file"] for t in json.loads((ema_dir / "reconstruct.json").read_text())["targets"]]
        records = [r.to_dict() for r in evaluate_models(files, cfg, ref, feat, trial_dir / "samples", device,
                                                         progress=False)]
        atomic_write_text(C.json_dump(records), records_file)
    logger = RunLogger(cfg, quiet=True)
    log_ema_runs(logger, res.mlflow_run_id, records, trial_dir / "samples")
    fig = plot_fid_vs_ema(records, trial_dir / "fid_vs_ema.png", f"trial {trial_dir.name}")   # EDM2 fig. 5 curve
    logger.run_id = res.mlflow_run_id
    logger.log_artifact(fig, "figures")
    return records


# ----------------------------------------------------------------------------------------------
# The driver.

@dataclass
class SweepResult:
    table: "object"                                          # pandas DataFrame
    table_path: Path
    parent_run_id: str | None
    best: dict | None
    out_dir: Path


def _check_resources(sweep: C.SweepConfig, ray) -> tuple[float, str]:
    """GPUs per trial against the cluster: none there -> CPU workers; too few -> clear error."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    want, workers = sweep.resources.gpus, sweep.resources.workers
    if want > gpus > 0:
        raise SweepError(f"resources.gpus={want:g} per trial, but the cluster has {gpus:g} GPUs")
    need = sweep.resources.cpus * workers + (1 if workers > 1 else 0)      # + the trial's driver process
    if need > cpus:
        raise SweepError(f"resources.cpus={sweep.resources.cpus:g} x resources.workers={workers} per trial"
                         f"{' + 1 for the trial driver' if workers > 1 else ''}, but the cluster has {cpus:g} CPUs")
    if want > 0 and gpus == 0:
        print(f"sweep: the cluster has no GPUs: running trials on CPU workers (resources.gpus={want:g} ignored)")
        return 0.0, "cpu"
    return want, ("cuda" if want > 0 else "cpu")


def run_sweep(sweep_file: str | Path, address: str | None = None, resume: bool = False,
              reports_dir: str | Path = "reports/sweeps", num_cpus: int | None = None) -> SweepResult:
    sweep, base = C.load_sweep(sweep_file)                   # every value checked before Ray starts
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .data import EncodedDataset
    from .fid import load_feature_net, reference_dataset_dir, reference_stats
    from .tracking import RunLogger, run_tags

    root = Path.cwd()
    storage = (root / sweep.storage).resolve()
    exp_dir = storage / sweep.name
    if resume and exp_dir.exists():
        check_private(exp_dir)                             # before Ray unpickles anything in it
    make_private(exp_dir)
    uri = sweep_tracking_uri(base)
    base_raw = {k: v for k, v in base.to_dict().items() if k != "preset"}

    # Reference statistics once, before any trial (trials read the cache).
    ref_cache = str(root / "data" / "fid-ref")
    feat = load_feature_net(base.fid.feature_net)
    reference_stats(EncodedDataset(reference_dataset_dir(base)), feat, base.fid.ref_num_images, ref_cache,
                    base.fid.batch_size)

    # The MLflow parent run (and experiment) exist before trials start; a resumed sweep reuses it.
    state_file = exp_dir / "sweep_state.json"
    state = json.loads(state_file.read_text()) if (resume and state_file.is_file()) else {}
    parent = RunLogger(uri=uri, experiment=sweep.experiment)
    parent_id = parent.start(state.get("parent_run_id"), run_name=f"sweep-{sweep.name}",
                             tags={**run_tags("sweep"), "kind": "sweep", "sweep_file": str(sweep_file)},
                             params={"sweep." + k: v for k, v in C.flatten(sweep.model_dump(mode="json")).items()})
    atomic_write_text(json.dumps({"parent_run_id": parent_id}), state_file)

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=True, configure_logging=False)
    gpus, device = _check_resources(sweep, ray)

    # One process: the trial's worker holds the resources. Several: the TorchTrainer's workers hold
    # them, and the trial's own driver process (it only waits and relays reports) holds one CPU.
    trial_resources = {"cpu": sweep.resources.cpus, "gpu": gpus} if sweep.resources.workers == 1 else {"cpu": 1}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=base_raw, sweep_raw=sweep.model_dump(mode="json"),
                             parent_run_id=parent_id, uri=uri, device=device, ref_cache=ref_cache, root=str(root)),
        trial_resources)
    scheduler = None
    if sweep.scheduler.type == "asha":
        # max_t past the end: ASHA ends trials that reach max_t, which would cut the EMA fan-out.
        scheduler = ASHAScheduler(time_attr="nimg", metric=sweep.scheduler.metric, mode="min",
                                  max_t=base.train.duration_nimg + 1, grace_period=sweep.scheduler.grace_period_nimg,
                                  reduction_factor=sweep.scheduler.reduction_factor)
    search_alg = None
    if sweep.algorithm == "random":                          # the sweep's seed fixes the draws
        from ray.tune.search.basic_variant import BasicVariantGenerator
        search_alg = BasicVariantGenerator(random_state=sweep.seed)
    if sweep.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(metric="best_fid", mode="min", seed=sweep.seed)
    tune_config = tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler, search_alg=search_alg,
                                  max_concurrent_trials=sweep.max_concurrent)
    run_config = tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=1,
                                failure_config=tune.FailureConfig(max_failures=sweep.max_failures))
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        print(f"sweep: resuming {exp_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(sweep), tune_config=tune_config, run_config=run_config)
    t0 = time.time()
    grid = tuner.fit()

    out_dir = Path(reports_dir) / sweep.name
    table = results_table(grid, exp_dir / "trials", sweep)
    table_path = write_results(table, out_dir, sweep)
    best = None
    if len(table) and table["fid"].notna().any():
        best = table.loc[table["fid"].idxmin()].to_dict()
    for f in sorted(out_dir.glob("*")):
        parent.log_artifact(f, "sweep")
    parent.log_metrics({"best_fid": best["fid"], "trials": table["trial_id"].nunique(),
                        "seconds": time.time() - t0} if best else {"trials": 0}, step=0)
    parent.end("FINISHED" if best else "FAILED")
    print_summary(table, best, sweep, table_path)
    unfinished = table.loc[table["status"] != "finished", "trial_id"].nunique() if len(table) else 0
    if unfinished:                   # Tune cannot tell us which were interrupted (all read TERMINATED)
        print(f"{unfinished} of {len(grid)} trials did not finish (stopped early, failed or interrupted); "
              f"if the sweep was interrupted, the same command with --resume finishes them and keeps the rest")
    return SweepResult(table, table_path, parent_id, best, out_dir)


def results_table(grid, trials_dir: Path, sweep: C.SweepConfig):
    """One row per trial x EMA length (the FID record fields and the swept values); trials that ended
    early (ASHA) or failed get one row with their status and no FID."""
    import pandas as pd
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        params = {axis_key(k): v for k, v in (result.config or {}).items()}
        recs_file = trials_dir / str(trial_id) / "fid_records.json"
        base = {"trial_id": trial_id, **params, "nimg": (result.metrics or {}).get("nimg"),
                "final_loss": (result.metrics or {}).get("loss")}
        if recs_file.is_file():
            for r in json.loads(recs_file.read_text()):
                s = r.pop("sampler")
                rows.append({**base, "status": "finished", **r, "nfe": s["nfe"], "steps": s["steps"],
                             "churn": s["churn"], "seeds": f"{r['seeds'][0]}-{r['seeds'][1]}"})
        else:
            rows.append({**base, "status": "error" if result.error else "early-stopped", "fid": None,
                         "sigma_rel": None})
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["fid", "trial_id"], na_position="last").reset_index(drop=True)
    return df


def write_results(df, out_dir: Path, sweep: C.SweepConfig) -> Path:
    from .report import plot_best_vs_param, plot_fid_vs_ema, write_sweep_report
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "results.csv"
    atomic_write_text(df.to_csv(index=False), csv)
    try:
        flat = df.copy()
        for c in flat.columns:                               # parquet needs one type per column
            if flat[c].map(lambda v: isinstance(v, (list, dict))).any():
                flat[c] = flat[c].map(json.dumps)
        flat.to_parquet(out_dir / "results.parquet", index=False)
    except ImportError as err:                               # pyarrow missing: CSV is enough
        print(f"sweep: no parquet file ({err})", file=sys.stderr)
    done = df[df["fid"].notna()] if len(df) else df
    if len(done):
        swept = list(sweep.search)
        label = (lambda r: ", ".join(f"{k.split('.')[-1]}={r[k]:.4g}" if isinstance(r[k], float) else
                                     f"{k.split('.')[-1]}={r[k]}" for k in swept)) if swept else (lambda r: r["trial_id"])
        rows = [{"sigma_rel": r["sigma_rel"], "fid": r["fid"], "label": label(r)} for _, r in done.iterrows()]
        plot_fid_vs_ema(rows, out_dir / "fid_vs_ema.png", f"sweep {sweep.name}: FID vs EMA length per trial")
        if swept:
            best = done.loc[done.groupby("trial_id")["fid"].idxmin()]
            plot_best_vs_param(best, swept, out_dir / "best_fid_vs_param.png", sweep.name)
    write_sweep_report(df, list(sweep.search), out_dir, sweep.name)
    return csv


def print_summary(df, best: dict | None, sweep: C.SweepConfig, table_path: Path) -> None:
    n_trials = df["trial_id"].nunique() if len(df) else 0
    stopped = int((df.groupby("trial_id")["status"].first() != "finished").sum()) if len(df) else 0
    print(f"\nsweep {sweep.name}: {n_trials} trials ({stopped} stopped early or failed), {len(df)} rows -> {table_path}")
    if best:
        swept = ", ".join(f"{k}={best[k]}" for k in sweep.search)
        print(f"winner: FID {best['fid']:.3f} at EMA sigma_rel {best['sigma_rel']:.3f} ({swept or 'base config'}); "
              f"trial {best['trial_id']}, {best['num_images']} images, NFE {best['nfe']}, {best['feature_net']}")
