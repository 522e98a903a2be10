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
    """Create the sweep's storage folder (and its parent, when missing) readable and writable by its owner only.
    Nothing in it is ever unpickled (--resume reads the project's JSON files only), but trial runs,
    checkpoints and MLflow ids are the sweep's own: one writer."""
    for d in (folder.parent, folder):
        if not d.exists():                                   # only folders made here: never an existing one (`/`)
            d.mkdir(parents=True)
            os.chmod(d, 0o700)


POINT = "_point"                      # grid and random search: Tune gets the plan's points as one grid axis
TRIAL = "_trial"                      # inside a point: the trial's stable name (its folder), e.g. t0003


def trial_name(index: int) -> str:
    """The stable name of the plan's trial `index` (grid, random): its folder under trials/ and its row
    in the results; a resumed sweep finds its trials by these names, not by Ray's state."""
    return f"t{index:04d}"


def draw_points(sweep: C.SweepConfig) -> list[dict]:
    """Random search, drawn here from the sweep's seed (numpy): the same file draws the same values,
    another seed others, and --dry-run shows exactly what will run."""
    import math

    import numpy as np
    rng = np.random.default_rng(sweep.seed)
    points = []
    for _ in range(sweep.num_samples):
        point = {}
        for key in sorted(sweep.search):
            a = sweep.search[key]
            if a.choice is not None:
                point[key] = a.choice[int(rng.integers(len(a.choice)))]
            elif a.uniform is not None:
                point[key] = float(rng.uniform(*a.uniform))
            else:
                point[key] = float(math.exp(rng.uniform(math.log(a.loguniform[0]), math.log(a.loguniform[1]))))
        points.append(point)
    return points


def plan(sweep: C.SweepConfig, base: C.Config) -> dict:
    """What a sweep will do, without running it: trials (their values where known in advance), axes,
    EMA lengths, images to train and to generate."""
    import itertools
    if sweep.algorithm == "grid":
        keys = list(sweep.search)
        combos = list(itertools.product(*(sweep.search[k].grid for k in keys))) or [()]
        points = [dict(zip(keys, c)) for c in combos] * sweep.num_samples
    elif sweep.algorithm == "random":
        points = draw_points(sweep)
    else:
        points = [None] * sweep.num_samples                   # Optuna proposes them during the sweep
    n = len(points)
    from .evaluate import grid_points
    points_per_trial = grid_points(base)
    lengths = sorted({p["sigma_rel"] for p in points_per_trial})
    per_trial = len(points_per_trial)
    return {"name": sweep.name, "algorithm": sweep.algorithm, "seed": sweep.seed, "trials": n, "points": points,
            "axes": {k: v.model_dump(exclude_none=True) for k, v in sweep.search.items()},
            "ema_lengths": list(lengths), "images_to_train": n * base.train.duration_nimg,
            "fids": n * per_trial, "images_to_generate": n * per_trial * base.fid.num_images,
            "posthoc": sweep.posthoc.model_dump(mode="json") if sweep.posthoc is not None else None,
            "scheduler": sweep.scheduler.model_dump(), "max_concurrent": sweep.max_concurrent,
            "resources": sweep.resources.model_dump()}


def print_plan(p: dict) -> None:
    print(f"sweep {p['name']}: {p['trials']} trial(s), algorithm {p['algorithm']} (seed {p['seed']}), "
          f"at most {p['max_concurrent']} at once, each {p['resources']}")
    for k, v in p["axes"].items():
        print(f"  axis {k}: {v}")
    print(f"  post-hoc EMA lengths (no retraining): {', '.join(f'{x:g}' for x in p['ema_lengths'])}")
    if p.get("posthoc"):
        ph = p["posthoc"]
        print(f"  post-hoc grid per trial (no retraining): guides {ph['guide']}, guidance {ph['guidance']}"
              + (f", steps {ph['steps']}" if ph["steps"] else ""))
    for i, pt in enumerate(p["points"]):
        print(f"  trial {i + 1}: " + ((", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in pt.items()) or "the base config") if pt is not None
                                            else "drawn by Optuna during the sweep"))
    sched = p["scheduler"]
    print(f"  scheduler: {sched['type']}" + (f" on {sched['metric']}, grace {sched['grace_period_nimg']} images"
                                              if sched["type"] == "asha" else ""))
    asha = " (at most: ASHA may stop trials early)" if sched["type"] == "asha" else ""
    print(f"  images to train: {p['images_to_train']:,}{asha}; FIDs: {p['fids']} "
          f"({p['images_to_generate']:,} images to generate)")


def param_space(sweep: C.SweepConfig, points: list[tuple[str, dict]] | None = None) -> dict:
    """Tune's search space. Grid and random search: exactly the plan's points (`points`: the ones
    still to run, as (name, values)), each carrying its trial name. Optuna: the axes as distributions."""
    from ray import tune
    if sweep.algorithm in ("grid", "random"):
        return {POINT: tune.grid_search([{TRIAL: name, **{axis_name(k): v for k, v in pt.items()}}
                                         for name, pt in points])}
    space = {}
    for key, a in sweep.search.items():
        name = axis_name(key)
        if a.choice is not None:
            space[name] = tune.choice(list(a.choice))
        elif a.uniform is not None:
            space[name] = tune.uniform(*a.uniform)
        else:
            space[name] = tune.loguniform(*a.loguniform)
    return space


def split_config(config: dict, fallback: str) -> tuple[str, dict]:
    """(trial name, {dotted key: value}) from a Tune trial config; Optuna's trials are named by Tune's id."""
    flat = {**(config.get(POINT) or {}), **{k: v for k, v in config.items() if k != POINT}}   # never mutate Tune's
    name = flat.pop(TRIAL, None) or fallback
    return str(name), {axis_key(k): v for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# One trial (runs inside a Ray worker).

def trial_config(base_raw: dict, sweep_raw: dict, params: dict, trial_dir: Path, uri: str, device: str) -> C.Config:
    """The trial's config: the base, the sweep's fixed overrides and `params` ({dotted key: value})."""
    sweep = C.SweepConfig.model_validate(sweep_raw)
    overrides = {**C.sweep_overrides(sweep), **params,
                 "train.run_dir": str(trial_dir / "run"), "tracking.uri": uri,
                 "tracking.experiment": sweep.experiment, "train.device": device}
    return C.resolve(base_raw, overrides)


def run_trial(params: dict, base_raw: dict, sweep_raw: dict, parent_run_id: str | None, uri: str, device: str,
              ref_cache: str, root: str) -> None:
    """Train -> post-hoc EMA fan-out -> FID per EMA length; results reported to Tune and MLflow.

    One training process runs here, in the trial's worker; resources.workers > 1 runs the training
    (and then the fan-out on rank 0) in a Ray Train TorchTrainer whose reports reach Tune."""
    from ray import tune
    _quiet_stop()
    os.chdir(root)                                          # relative paths of the params file
    trial_id, values = split_config(params, tune.get_context().get_trial_id())
    trial_dir = Path(sweep_raw["storage"]).resolve() / sweep_raw["name"] / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(os.getpid()), trial_dir / "worker.pid")   # lets tests (and users) find the worker
    record_node(trial_dir)
    write_trial_state(trial_dir, trial_id=trial_id, params=values, status="running")
    try:
        _run_trial(trial_id, trial_dir, values, base_raw, sweep_raw, parent_run_id, uri, device, ref_cache, root)
    except Exception as err:                                # the trial's own record of why (Tune retries it)
        write_trial_state(trial_dir, status="error", error=f"{err.__class__.__name__}: {str(err)[:300]}")
        raise


def _run_trial(trial_id: str, trial_dir: Path, params: dict, base_raw: dict, sweep_raw: dict,
               parent_run_id: str | None, uri: str, device: str, ref_cache: str, root: str) -> None:
    from ray import tune
    cfg = trial_config(base_raw, sweep_raw, params, trial_dir, uri, device)
    job = {"config": cfg.to_dict(), "trial_id": trial_id, "trial_dir": str(trial_dir), "parent_run_id": parent_run_id,
           "ref_cache": ref_cache, "root": root, "sweep": sweep_raw}
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


TRIAL_STATE = "trial.json"


def write_trial_state(trial_dir: Path, **fields) -> dict:
    """Merge `fields` into the trial's own state file (trial.json: name, values, status, last
    metrics). The results table and --resume read these, never Ray's pickled experiment state."""
    state = {**read_trial_state(trial_dir), **fields}
    atomic_write_text(json.dumps(state, indent=2, default=str), trial_dir / TRIAL_STATE)
    return state


def read_trial_state(trial_dir: Path) -> dict:
    state = _read_json(trial_dir / TRIAL_STATE)
    return state if isinstance(state, dict) else {}


def record_node(trial_dir: Path) -> None:
    """Append this attempt's node (hostname, Ray node IP) to the trial's nodes.jsonl: a retried trial
    shows every node it ran on, the results table and the MLflow run the one it finished on."""
    import socket

    import ray
    entry = {"node": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(trial_dir / "nodes.jsonl", "a") as f:          # one short line per attempt: an atomic append
        f.write(json.dumps(entry) + "\n")


def trial_nodes(trial_dir: Path) -> list[str]:
    """The nodes a trial ran on, one per attempt, in order (from its nodes.jsonl)."""
    try:
        lines = (trial_dir / "nodes.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x)["node"] for x in lines if x.strip()]


def _quiet_stop() -> None:
    """When Tune stops a trial (ASHA, the end of the sweep), Ray's SIGTERM handler raises SystemExit in
    the worker's main thread, wherever it is; inside a finaliser Python prints it as "Exception
    ignored ... SystemExit" with a traceback, which reaches the driver's output. That exit is the
    intended stop: drop exactly that report and keep every other one."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)
    sys.unraisablehook = hook


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

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def on_snapshot(nimg, metrics):
        last.update(metrics)
        if rank0:
            write_trial_state(trial_dir, nimg=nimg, **metrics)
        report({"nimg": nimg, **metrics})

    # A latent run's reference is pixels (for FID): no validation loss on it (run_sweep refuses ASHA on it).
    validate = None if cfg.data.encoder == "vae" else make_validator(
        cfg, C.SweepConfig.model_validate(job["sweep"]).validation, device if device is not None else cfg.train.device)
    res = train(cfg, stage="sweep", progress=False, report=on_snapshot, parent_run_id=job["parent_run_id"],
                run_name=f"trial-{trial_id}", device=device, validate=validate)
    if res.status != "finished":
        raise SweepError(f"trial {trial_id} stopped at nimg={res.nimg} before the end of training")
    multi = dist.is_available() and dist.is_initialized()
    records = fan_out(cfg, res, trial_dir, job["ref_cache"], device) if not multi or dist.get_rank() == 0 else None
    if multi:                                                # rank 0's records to every rank
        box = [records]
        dist.broadcast_object_list(box, src=0)
        records = box[0]
    best = min(records, key=lambda r: r["fid"])
    if rank0:
        write_trial_state(trial_dir, status="finished", nimg=res.nimg, best_fid=best["fid"],
                          best_sigma_rel=best["sigma_rel"])
    report({"nimg": res.nimg, **last, "best_fid": best["fid"], "best_sigma_rel": best["sigma_rel"],
            "best_fid_se": best.get("fid_se"),
            "fids": json.dumps({f"{r['sigma_rel']:.3f}": r["fid"] for r in records}), "done": True})


def fan_out(cfg: C.Config, res, trial_dir: Path, ref_cache: str, device=None) -> list[dict]:
    """Post-hoc EMA fan-out, no retraining: evaluate.evaluate_run reconstructs and measures every EMA
    length (a retry reuses finished records); here the results go to MLflow as child runs of the
    trial's run, with the trial's best FID / EMA length / KID on the trial run itself."""
    from .evaluate import evaluate_run
    from .report import plot_fid_vs_ema
    from .tracking import RunLogger, log_ema_runs
    device = str(device) if device is not None else cfg.train.device     # trial_config set cpu or cuda
    records = evaluate_run(cfg, Path(cfg.train.run_dir) / "snapshots", trial_dir, ref_cache, device)
    logger = RunLogger(cfg, quiet=True)
    nodes = trial_nodes(trial_dir)
    if nodes:
        logger.run_id = res.mlflow_run_id
        logger.set_tags({"node": nodes[-1], "nodes": ",".join(nodes)})
    log_ema_runs(logger, res.mlflow_run_id, records, trial_dir / "samples")
    from .records import computed, is_grid
    from .report import curve_label
    grid = is_grid(records)
    distinct = [{**r, "label": curve_label(r) if grid else ""} for r in computed(records)]
    fig = plot_fid_vs_ema(distinct, trial_dir / "fid_vs_ema.png", f"trial {trial_dir.name}")   # EDM2 fig. 5 curve
    logger.run_id = res.mlflow_run_id
    logger.log_artifact(fig, "figures")
    if grid:                                                 # the post-hoc grid: EMA length x w per guide
        from .report import plot_guidance_grid
        heat = plot_guidance_grid(records, trial_dir / "fid_grid.png", f"trial {trial_dir.name}: FID over EMA "
                                  f"length x guidance, per guide (* the best)")
        if heat is not None:
            logger.log_artifact(heat, "figures")
    best = min(records, key=lambda r: r["fid"])
    logger.log_summary({"best_fid": best["fid"], "best_fid_se": best.get("fid_se"),
                        "best_sigma_rel": best["sigma_rel"], "best_kid": best.get("kid")})
    return records


def make_validator(cfg: C.Config, spec: C.ValidationSpec, device=None):
    """validate(net) -> the fixed validation loss (edm.validation_loss) on the first spec.num_images of
    the FID reference set, the same images, levels and noise for every trial."""
    import torch

    from .data import EncodedDataset
    from .edm import validation_loss
    from .fid import reference_dataset_dir
    ds = EncodedDataset(reference_dataset_dir(cfg))
    n = min(spec.num_images, len(ds))
    from .devices import pick_device
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto", "train.device")
    images, labels = ds.get(list(range(n)), generator=torch.Generator().manual_seed(spec.seed))
    images = images.to(dev)
    label_dim = cfg.network.label_dim if cfg.network.label_dim is not None else \
        (ds.label_dim if cfg.data.use_labels else 0)
    labels = labels.to(dev) if labels is not None and label_dim else None
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(spec.seed + 1)).to(dev)
    return lambda net: validation_loss(net, images, labels, spec.sigmas, eps, cfg.loss.sigma_data)


# ----------------------------------------------------------------------------------------------
# The driver.

@dataclass
class SweepResult:
    table: "object"                                          # pandas DataFrame
    table_path: Path
    parent_run_id: str | None
    best: dict | None
    out_dir: Path


def cpus_per_trial(sweep: C.SweepConfig) -> float:
    """CPUs one trial holds: its training processes, plus the trial's driver when there are several."""
    res = sweep.resources
    return res.cpus * res.workers + (1 if res.workers > 1 else 0)


def _check_resources(sweep: C.SweepConfig, ray) -> tuple[float, str]:
    """GPUs per trial against the cluster: none there -> CPU workers; too few -> clear error."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    want, workers = sweep.resources.gpus, sweep.resources.workers
    if want > gpus > 0:
        raise SweepError(f"resources.gpus={want:g} per trial, but the cluster has {gpus:g} GPUs")
    need = cpus_per_trial(sweep)
    if need > cpus:
        raise SweepError(f"resources.cpus={sweep.resources.cpus:g} x resources.workers={workers} per trial"
                         f"{' + 1 for the trial driver' if workers > 1 else ''}, but the cluster has {cpus:g} CPUs")
    if want > 0 and gpus == 0:
        print(f"sweep: the cluster has no GPUs: running trials on CPU workers (resources.gpus={want:g} ignored)")
        return 0.0, "cpu"
    return want, ("cuda" if want > 0 else "cpu")


def _check_before_start(sweep: C.SweepConfig, exp_dir: Path, reports: Path, resume: bool) -> None:
    """What a real start checks beyond the plan: results of an earlier sweep of the same name."""
    if not resume and ((exp_dir / "sweep_state.json").is_file() or (reports / "results.csv").is_file()):
        raise SweepError(f"sweep {sweep.name!r} already has results ({exp_dir if exp_dir.exists() else reports}): "
                         f"continue it with --resume, or give the sweep file another `name:` to start a new one")
    if resume and not exp_dir.is_dir():
        raise SweepError(f"nothing to resume: no sweep {sweep.name!r} in {exp_dir.parent}")


def check_plan(sweep: C.SweepConfig, storage: Path, reports: Path, address: str | None, num_cpus: int | None,
               trials: int) -> None:
    """Everything that can be checked before Ray starts and before any MLflow run is created (a dry
    run too): output folders creatable, CPUs and GPUs per trial within this machine."""
    from .io import check_writable
    check_writable(storage, "sweep storage")
    check_writable(reports, "sweep reports folder")
    if num_cpus is not None and num_cpus < 1:
        raise SweepError(f"--num-cpus {num_cpus}: must be >= 1")
    if address is None:                                      # a local instance: its CPUs and GPUs are known now
        cpus = num_cpus or os.cpu_count() or 1              # Ray's logical CPUs: more than the cores is allowed
        res = sweep.resources
        per_trial = cpus_per_trial(sweep)
        if per_trial > cpus:
            raise SweepError(f"resources.cpus={res.cpus:g} x resources.workers={res.workers} per trial needs "
                             f"{per_trial:g} CPUs, this machine has {cpus}")
        gpus = _local_gpus()
        if res.gpus > gpus > 0:
            raise SweepError(f"resources.gpus={res.gpus:g} per trial, but this machine has {gpus} GPUs")
        if sweep.max_concurrent * per_trial > cpus and trials > int(cpus // per_trial):
            print(f"sweep: note: max_concurrent={sweep.max_concurrent} trials x {per_trial:g} CPUs each exceeds the "
                  f"{cpus} CPUs here: at most {int(cpus // per_trial)} run at once")


def _local_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:                                        # no usable CUDA: CPU workers
        return 0


def is_loopback(address: str) -> bool:
    """True when a Ray address (host:port, [v6]:port, ray://host:port) names this machine's loopback."""
    import ipaddress
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                                         # a name, or "auto": not known to be loopback


def ray_auth_token_available() -> bool:
    """Where Ray reads a token from: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or (bool(path) and Path(path).is_file()) \
        or (Path.home() / ".ray" / "auth_token").is_file()


def prepare_ray_env(address: str | None) -> None:
    """Before Ray starts: a local instance listens on 127.0.0.1 only, authentication off there; a
    cluster address that is not loopback needs Ray's token authentication (refused otherwise)."""
    if address is None:
        # Ray (2.60) has no bind-address option; its single-machine mode (what it uses on macOS and
        # Windows) makes the GCS, raylet, workers and agents bind 127.0.0.1 instead of every interface.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:                             # already imported in this process
            import ray._private.ray_constants as ray_constants
            ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nothing off this machine can reach it
        return
    if is_loopback(address):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    how = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, a file in RAY_AUTH_TOKEN_PATH or "
           "~/.ray/auth_token) here and for every `ray start`; README: Scaling out")
    if mode == "disabled":
        raise SweepError(f"--address {address} is not loopback, and RAY_AUTH_MODE=disabled: a Ray cluster reachable "
                         f"over the network runs anyone's code without authentication. Use token authentication: {how}")
    if not ray_auth_token_available():
        raise SweepError(f"--address {address}: no Ray authentication token here; {how}")
    os.environ["RAY_AUTH_MODE"] = "token"


def connect_ray(address: str | None, num_cpus: int | None, min_nodes: int = 1, wait_s: float = 120.0):
    """ray.init for a sweep (a local instance, or the cluster at `address`), with the cluster's errors in
    one line; waits up to wait_s for min_nodes alive nodes (a SLURM allocation's workers joining)."""
    import ray
    if ray.is_initialized():
        return ray
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    try:
        ray.init(**kwargs, include_dashboard=False, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise SweepError(f"could not join the Ray cluster at {address}: {first} (is `ray start --head` running "
                         f"there, and is RAY_AUTH_TOKEN the one the cluster was started with?)") from None
    deadline = time.time() + wait_s
    while (alive := sum(n["Alive"] for n in ray.nodes())) < min_nodes and time.time() < deadline:
        time.sleep(1)
    if alive < min_nodes:
        print(f"sweep: only {alive} of {min_nodes} Ray nodes joined within {wait_s:.0f} s; going on with them")
    return ray


def run_sweep(sweep_file: str | Path, address: str | None = None, resume: bool = False,
              reports_dir: str | Path = "reports/sweeps", num_cpus: int | None = None,
              dry_run: bool = False, min_nodes: int = 1) -> SweepResult | dict:
    sweep, base = C.load_sweep(sweep_file)                   # every value checked before Ray starts
    root = Path.cwd()
    storage = (root / sweep.storage).resolve()
    exp_dir = storage / sweep.name
    out_dir = Path(reports_dir) / sweep.name
    the_plan = plan(sweep, base)
    check_plan(sweep, storage, out_dir, address, num_cpus, the_plan["trials"])
    if base.data.encoder == "vae" and sweep.scheduler.type != "none" and sweep.scheduler.metric == "val_loss":
        raise SweepError("scheduler.metric=val_loss is a loss on the reference images, which a latent run keeps as "
                         "pixels (for FID): use scheduler.metric=loss with data.encoder=vae")
    if dry_run:
        print_plan(the_plan)
        return the_plan
    _check_before_start(sweep, exp_dir, out_dir, resume)
    trials_dir = exp_dir / "trials"
    stopped_file = exp_dir / "asha_stopped.json"
    todo, evaluated = remaining_trials(sweep, the_plan, trials_dir, _read_json(stopped_file))
    if resume:
        print(f"sweep: resuming {exp_dir} from its own records: {len(todo) if isinstance(todo, list) else todo} "
              f"trial(s) to run; finished and early-stopped trials are kept (Ray's saved state is not read)")
    if todo:
        prepare_ray_env(address)
        # Ray first: a cluster that cannot be joined (down, wrong token) fails before any work or MLflow run.
        ray = connect_ray(address, num_cpus, min_nodes)

    from .data import ensure_encoded
    from .metrics import check_metrics, references
    from .tracking import RunLogger, run_tags

    make_private(exp_dir)
    uri = sweep_tracking_uri(base)
    base_raw = {k: v for k, v in base.to_dict().items() if k != "preset"}

    # Encoded data (on a fresh clone: encoded now, as the encode stage would) and the reference
    # statistics once, before any trial, in the sweeps' own cache (never a DVC output).
    ensure_encoded(base, log=lambda m: print(f"sweep: {m}"))
    ref_cache = str(storage / "fid-ref")
    check_metrics(base)
    references(base, "cpu", ref_cache)                      # every metric of fid.metrics, read by the trials

    # The MLflow parent run (and experiment) exist before trials start; a resumed sweep reuses it.
    state_file = exp_dir / "sweep_state.json"
    state = _read_json(state_file) if resume else {}
    parent = RunLogger(uri=uri, experiment=sweep.experiment)
    parent_id = parent.start(state.get("parent_run_id"), run_name=f"sweep-{sweep.name}",
                             tags={**run_tags("sweep"), "kind": "sweep", "sweep_file": str(sweep_file)},
                             params={"sweep." + k: v for k, v in C.flatten(sweep.model_dump(mode="json")).items()},
                             on_run_id=lambda rid: atomic_write_text(json.dumps({"parent_run_id": rid}), state_file))
    attempt = int(state.get("attempts", 0)) + 1
    atomic_write_text(json.dumps({"parent_run_id": parent_id, "attempts": attempt}), state_file)


    outcome = "FAILED"
    t0 = time.time()
    watch = PendingWatch(sweep.pending_timeout_s)
    try:
        if todo:
            from ray import tune
            gpus, device = _check_resources(sweep, ray)
            # One process: the trial's worker holds the resources. Several: the TorchTrainer's workers hold
            # them, and the trial's own driver process (it only waits and relays reports) holds one CPU.
            trial_resources = {"cpu": sweep.resources.cpus, "gpu": gpus} if sweep.resources.workers == 1 else {"cpu": 1}
            trainable = tune.with_resources(
                tune.with_parameters(run_trial, base_raw=base_raw, sweep_raw=sweep.model_dump(mode="json"),
                                     parent_run_id=parent_id, uri=uri, device=device, ref_cache=ref_cache,
                                     root=str(root)),
                trial_resources)
            scheduler = None
            if sweep.scheduler.type == "asha":
                # max_t past the end: ASHA ends trials that reach max_t, which would cut the EMA fan-out.
                scheduler = _recording_asha(stopped_file)(
                    time_attr="nimg", metric=sweep.scheduler.metric, mode="min", max_t=base.train.duration_nimg + 1,
                    grace_period=sweep.scheduler.grace_period_nimg, reduction_factor=sweep.scheduler.reduction_factor)
            search_alg = None
            if sweep.algorithm == "optuna":
                search_alg = _optuna(sweep, evaluated)
            tune_config = tune.TuneConfig(num_samples=todo if sweep.algorithm == "optuna" else 1,
                                          scheduler=scheduler, search_alg=search_alg,
                                          max_concurrent_trials=sweep.max_concurrent)
            # Ray's own files go to a fresh folder per attempt; nothing of an earlier attempt is read.
            stopper, hook = watch.tune_hooks()
            run_config = tune.RunConfig(name=f"attempt-{attempt}", storage_path=str(exp_dir / "ray"), verbose=1,
                                        stop=stopper, callbacks=[hook],
                                        failure_config=tune.FailureConfig(max_failures=sweep.max_failures))
            tuner = tune.Tuner(trainable, param_space=param_space(sweep, todo if isinstance(todo, list) else None),
                               tune_config=tune_config, run_config=run_config)
            tuner.fit()
        outcome = None
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        if outcome is not None:                              # no run of this sweep is left RUNNING
            close_trial_runs(trials_dir, uri, {}, default="KILLED" if outcome == "KILLED" else "FAILED")
            parent.end(outcome)

    table = results_table(trials_dir, sweep, _read_json(stopped_file), the_plan)
    close_trial_runs(trials_dir, uri, dict(zip(table["trial_id"], table["status"])) if len(table) else {})
    table_path = write_results(table, out_dir, sweep)
    if watch.stuck:                                          # the table says what ran; then one line
        parent.end("KILLED")
        raise SweepError(watch.stuck + f"; the trials that ran are in {table_path}: `--resume` continues once "
                         f"resources free up")
    best = None
    if len(table) and table["fid"].notna().any():
        best = table.loc[table["fid"].idxmin()].to_dict()
    for f in sorted(out_dir.glob("*")):
        parent.log_artifact(f, "sweep")
    parent.log_metrics({"best_fid": best["fid"], "best_fid_se": best.get("fid_se"), "trials": table["trial_id"].nunique(),
                        "seconds": time.time() - t0} if best else {"trials": 0}, step=0)
    interrupted = table.loc[table["status"] == "interrupted", "trial_id"].nunique() if len(table) else 0
    parent.end("FINISHED" if best and not interrupted else ("KILLED" if interrupted else "FAILED"))
    print_summary(table, best, sweep, table_path)
    return SweepResult(table, table_path, parent_id, best, out_dir)


FINAL = ("finished", "early-stopped")                      # trials a resume does not run again


def trial_status(trial_dir: Path, stopped: dict) -> str:
    """finished (records written), early-stopped (ASHA), error (its last attempt failed), or interrupted
    (running when the sweep ended, or never started)."""
    state = read_trial_state(trial_dir)
    if state.get("status") == "finished" and (trial_dir / "fid_records.json").is_file():
        return "finished"
    if trial_dir.name in stopped:
        return "early-stopped"
    return "error" if state.get("status") == "error" else "interrupted"


def remaining_trials(sweep: C.SweepConfig, the_plan: dict, trials_dir: Path, stopped: dict):
    """What still has to run, from the trials' own records: grid/random: [(name, values)] of the plan's
    trials not finished nor early-stopped (an interrupted one resumes from its checkpoints in its
    folder); Optuna: the number of trials left, and the finished ones' (values, best FID) to tell it."""
    if sweep.algorithm != "optuna":
        return [(trial_name(i), pt) for i, pt in enumerate(the_plan["points"])
                if trial_status(trials_dir / trial_name(i), stopped) not in FINAL], []
    done, evaluated = 0, []
    for t in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
        state, status = read_trial_state(t), trial_status(t, stopped)
        if status in FINAL:
            done += 1
            if status == "finished" and state.get("best_fid") is not None:
                evaluated.append((state.get("params") or {}, state["best_fid"]))
        elif state:                                          # Optuna proposes anew: this one is superseded
            write_trial_state(t, status="superseded")
    return max(sweep.num_samples - done, 0), evaluated


def _optuna(sweep: C.SweepConfig, evaluated: list[tuple[dict, float]]):
    """Optuna/TPE (seeded), told the finished trials of an earlier attempt of this sweep."""
    from ray.tune.search.optuna import OptunaSearch

    class ResumedOptuna(OptunaSearch):
        def set_search_properties(self, metric, mode, config, **spec):
            ok = super().set_search_properties(metric, mode, config, **spec)
            for values, fid in evaluated:
                self.add_evaluated_point({axis_name(k): v for k, v in values.items()}, fid)
            return ok
    return ResumedOptuna(metric="best_fid", mode="min", seed=sweep.seed)


class PendingWatch:
    """When no trial runs and one has waited in PENDING longer than `timeout_s`
    (sweep.pending_timeout_s), name the resources it waits for and what the cluster has free, and
    end the sweep (through Tune's stopper) instead of holding its CPUs for ever."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.stuck, self._since = timeout_s, None, {}

    def check(self, trials, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        pending = [t for t in trials if t.status == "PENDING"]
        if any(t.status == "RUNNING" for t in trials) or not pending:
            self._since = {}
            return None
        self._since = {t.trial_id: self._since.get(t.trial_id, now) for t in pending}
        oldest = min(pending, key=lambda t: self._since[t.trial_id])
        waited = now - self._since[oldest.trial_id]
        if waited > self.timeout_s and self.stuck is None:
            import ray
            want = getattr(oldest.placement_group_factory, "required_resources", {}) or {}
            self.stuck = (f"trial {split_config(oldest.config, oldest.trial_id)[0]} waited {waited:.0f} s in PENDING "
                          f"(sweep.pending_timeout_s={self.timeout_s:g}) for {_resources(want) or 'its resources'}; "
                          f"the cluster has free: {_resources(ray.available_resources()) or 'nothing'}")
            print(f"sweep: {self.stuck}", file=sys.stderr, flush=True)
        return self.stuck

    def tune_hooks(self) -> tuple:
        """(stopper, callback) for tune.RunConfig(stop=..., callbacks=[...])."""
        from ray.tune import Callback
        from ray.tune.stopper import Stopper
        watch = self

        class Hook(Callback):
            def on_step(self, iteration, trials, **info):
                watch.check(trials)

        class Stop(Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                return watch.stuck is not None
        return Stop(), Hook()


def _resources(r: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if not k.startswith(("node:", "object_store")))


def _recording_asha(path: Path):
    """ASHA that also writes which trials it stopped (at what time and value) to `path`, so the
    results tell early-stopped trials from interrupted ones."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and not result.get("done"):
                stopped = _read_json(path)
                stopped[split_config(trial.config, trial.trial_id)[0]] = {"nimg": result.get("nimg"), "metric": self._metric,
                                           "value": result.get(self._metric)}
                atomic_write_text(json.dumps(stopped, indent=2), path)
            return decision
    return RecordingASHA


def _read_json(path: Path) -> dict:
    """A small JSON object from `path` (asha_stopped.json, a trial's train_summary.json), or {} when it
    is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def close_trial_runs(trials_dir: Path, uri: str, status_by_trial: dict, default: str | None = None) -> None:
    """End every trial's MLflow run truthfully: finished -> FINISHED, error -> FAILED, stopped by ASHA
    -> KILLED (tag stop_reason), interrupted -> KILLED (tag stop_reason=interrupted, --resume continues
    it). `default`: the status for runs still RUNNING when the sweep itself failed or was stopped."""
    if not trials_dir.is_dir():
        return
    from .tracking import TrackingError, client_for
    try:
        client = client_for(uri)
    except TrackingError as err:                            # bookkeeping must not hide the results
        print(f"sweep: could not set the trials' MLflow statuses ({err})", file=sys.stderr)
        return
    for t in sorted(trials_dir.iterdir()):
        id_file = t / "run" / "mlflow_run_id"
        if not id_file.is_file():
            continue
        run_id = id_file.read_text().strip()
        try:
            run = client.get_run(run_id)
        except Exception:                                    # unreachable server or unknown id: nothing to close
            continue
        status = status_by_trial.get(t.name)
        if status is None:
            if default is None or run.info.status != "RUNNING":
                continue
            new, reason = default, "sweep-" + default.lower()
        else:
            new, reason = {"finished": ("FINISHED", None), "error": ("FAILED", "error"),
                           "early-stopped": ("KILLED", "asha"), "interrupted": ("KILLED", "interrupted")}[status]
        try:
            if reason:
                client.set_tag(run_id, "stop_reason", reason)
            if run.info.status != new:
                client.set_terminated(run_id, new)
            for child in client.search_runs([run.info.experiment_id],
                                            f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"):
                client.set_terminated(child.info.run_id, "KILLED" if new != "FINISHED" else "FINISHED")
        except Exception as err:                             # bookkeeping must not hide the results
            print(f"sweep: could not set the MLflow status of trial {t.name} ({err.__class__.__name__})",
                  file=sys.stderr)


def results_table(trials_dir: Path, sweep: C.SweepConfig, stopped: dict | None = None, the_plan: dict | None = None):
    """One row per trial x post-hoc point (the FID record fields with their uncertainty and the swept
    values), from each trial's own folder (trial.json, fid_records.json); a trial without results gets
    one row saying why: early-stopped (ASHA), error, or interrupted (a planned trial that never
    started included, with its planned values). `tied_with_best` marks the rows not distinguishable
    from the best (paired bootstrap)."""
    import pandas as pd

    from .records import eval_key, read_records
    from .stats import rank
    stopped = stopped or {}
    planned = {trial_name(i): pt for i, pt in enumerate((the_plan or {}).get("points") or []) if pt is not None}
    names = list(planned) if sweep.algorithm != "optuna" else \
        [t.name for t in sorted(trials_dir.iterdir()) if t.is_dir()] if trials_dir.is_dir() else []
    rows, recs = [], []
    for trial_id in names:
        t = trials_dir / trial_id
        state = read_trial_state(t)
        if state.get("status") == "superseded":
            continue
        params = {**planned.get(trial_id, {}), **(state.get("params") or {})}
        cost = _read_json(t / "run" / "train_summary.json")
        nodes = trial_nodes(t)
        base = {"trial_id": trial_id, **params, "node": nodes[-1] if nodes else None, "nodes": ",".join(nodes) or None,
                "nimg": state.get("nimg"), "final_loss": state.get("loss"), "val_loss": state.get("val_loss"),
                "train_min": round(cost["train_seconds_total"] / 60, 2) if cost.get("train_seconds_total") else None,
                "img_per_s": cost.get("images_per_s")}
        status = trial_status(t, stopped)
        if status == "finished":
            for r in read_records(t / "fid_records.json", "trial records"):
                same_as = (r.get("extra") or {}).get("same_as")
                if not same_as:                              # rank each computation once
                    recs.append(r)
                s = r["sampler"]
                flat = {k: v for k, v in r.items() if k not in ("sampler", "bootstrap", "fid_ci95", "extra")}
                rows.append({**base, "status": "finished", **flat, "fid_lo": r["fid_ci95"][0],
                             "fid_hi": r["fid_ci95"][1], "nfe": s["nfe"], "steps": s["steps"], "churn": s["churn"],
                             "guidance": s["guidance"], "guide": r.get("guide", "none"), "same_as": same_as,
                             "samples": (r.get("extra") or {}).get("samples"),
                             "seeds": f"{r['seeds'][0]}-{r['seeds'][1]}", "eval_key": r.get("eval_key") or eval_key(r)})
        else:
            rows.append({**base, "status": status, "fid": None, "sigma_rel": None,
                         "stop_reason": (f"ASHA at nimg={stopped[trial_id]['nimg']} on {stopped[trial_id]['metric']}"
                                         if status == "early-stopped" else state.get("error"))})
    df = pd.DataFrame(rows)
    if recs:
        rk = rank(recs)
        tied = {recs[i].get("eval_key") or eval_key(recs[i]) for i in rk["tied"]}
        keys = df["same_as"].where(df["same_as"].notna(), df["eval_key"]) if "same_as" in df else df["eval_key"]
        df["tied_with_best"] = keys.map(lambda k: k in tied if isinstance(k, str) else False)
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
        rows = [{"sigma_rel": r["sigma_rel"], "fid": r["fid"], "fid_ci95": [r["fid_lo"], r["fid_hi"]], "label": label(r)}
                for _, r in done.iterrows()]
        plot_fid_vs_ema(rows, out_dir / "fid_vs_ema.png", f"sweep {sweep.name}: FID vs EMA length per trial "
                        f"(bars: 95% bootstrap interval)")
        if swept:
            best = done.loc[done.groupby("trial_id")["fid"].idxmin()]
            no_fid = df[df["fid"].isna()]
            ranges = {k: _searched_range(a) for k, a in sweep.search.items()}
            plot_best_vs_param(best, swept, out_dir / "best_fid_vs_param.png", sweep.name, stopped=no_fid,
                               ranges=ranges)
    grids = trial_grids(done, out_dir / "samples")
    heat = {}
    for tid in (done["trial_id"].unique() if len(done) else []):       # per-trial heat maps of a post-hoc grid
        src = Path(done.loc[done["trial_id"] == tid, "model_file"].iloc[0]).parent.parent / "fid_grid.png"
        if src.is_file():
            import shutil
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            heat[tid] = Path(shutil.copy(src, out_dir / "samples" / f"{tid}-fid_grid.png"))
    write_sweep_report(df, list(sweep.search), out_dir, sweep.name, summary_lines(df, sweep), grids, heat)
    return csv


def _searched_range(axis) -> tuple:
    """(lo, hi) of a numeric axis as searched (not only the values drawn); a text axis: its values."""
    values = list(axis.uniform or axis.loguniform or axis.grid or axis.choice)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return (min(values), max(values))
    return tuple(values)


def trial_grids(done, out: Path) -> dict:
    """Each finished trial's sample grid at its best EMA length, copied beside the sweep report:
    {trial_id: (png path, sigma_rel)}."""
    import shutil
    grids = {}
    if not len(done):
        return grids
    for _, r in done.loc[done.groupby("trial_id")["fid"].idxmin()].iterrows():
        model = Path(r["model_file"])
        name = r.get("samples") if isinstance(r.get("samples"), str) else f"samples-{model.stem}.png"
        src = model.parent.parent / "samples" / name              # evaluate_run's layout: <trial>/samples
        if src.is_file():
            out.mkdir(parents=True, exist_ok=True)
            grids[r["trial_id"]] = (Path(shutil.copy(src, out / f"{r['trial_id']}-{src.name}")), r["sigma_rel"])
    return grids


def summary_lines(df, sweep: C.SweepConfig) -> list[str]:
    """The winner with its uncertainty, what is not distinguishable from it, and edge warnings."""
    from .stats import edge_note
    done = df[df["fid"].notna()] if len(df) else df
    if "same_as" in done:                                   # each computation once
        done = done[done["same_as"].isna()]
    if not len(done):
        return ["no trial finished"]
    best = done.loc[done["fid"].idxmin()]
    swept = ", ".join(f"{k}={best[k]}" for k in sweep.search)
    lines = [f"winner: FID {best['fid']:.2f} +- {best['fid_se']:.2f} (95% {best['fid_lo']:.1f}-{best['fid_hi']:.1f}) "
             f"at EMA sigma_rel {best['sigma_rel']:.3f} ({swept or 'base config'}); trial {best['trial_id']}, "
             f"{int(best['num_images'])} images, NFE {int(best['nfe'])}, {best['feature_net']}"]
    if "tied_with_best" in done:
        tied = done[done["tied_with_best"] & (done["eval_key"] != best["eval_key"])]
        names = [f"trial {r['trial_id']} sigma_rel {r['sigma_rel']:.3f} (FID {r['fid']:.2f})" for _, r in tied.iterrows()]
        lines.append(f"not distinguishable from the winner (paired 95% interval of the difference contains 0): "
                     f"{len(names)} of {len(done) - 1}" + (": " + "; ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                                                         if names else ": none, the winner is resolved"))
    notes = [edge_note(done["sigma_rel"], best["sigma_rel"], "sigma_rel")]
    for key, axis in sweep.search.items():
        lo_hi = axis.uniform or axis.loguniform
        values = axis.grid or axis.choice
        if lo_hi:
            notes.append(edge_note(list(lo_hi), float(best[key]), key, *lo_hi))
        elif values and all(isinstance(v, (int, float)) for v in values):
            notes.append(edge_note(values, float(best[key]), key))
    lines += [f"note: {n}" for n in notes if n]
    return lines


def print_summary(df, best: dict | None, sweep: C.SweepConfig, table_path: Path) -> None:
    status = df.groupby("trial_id")["status"].first() if len(df) else None
    counts = status.value_counts().to_dict() if status is not None else {}
    n_trials = len(status) if status is not None else 0
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"\nsweep {sweep.name}: {n_trials} trials ({parts or 'none'}), {len(df)} rows -> {table_path}")
    for line in summary_lines(df, sweep):
        print(line)
    if counts.get("early-stopped"):
        print(f"{counts['early-stopped']} trial(s) were stopped early by ASHA on {sweep.scheduler.metric}: that is "
              f"final (--resume does not rerun them)")
    if counts.get("interrupted"):
        print(f"{counts['interrupted']} trial(s) were interrupted: the same command with --resume finishes them "
              f"from their checkpoints and keeps the rest")
    if counts.get("error"):
        print(f"{counts['error']} trial(s) failed after {sweep.max_failures} retries: see their error in the Ray "
              f"logs under {sweep.storage}/{sweep.name}")
