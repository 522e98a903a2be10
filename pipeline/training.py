"""The EDM2 training loop (docs/method.md 2, 3, 6), read top to bottom: `train` -> set up -> resume ->
track -> loop (step, then the hooks after it) -> final checkpoint -> finish. DDP under torchrun (NCCL
on GPUs, gloo on CPU), gradient accumulation, power-function EMA snapshots, atomic checkpoints and
exact resume, MLflow logging.

Determinism: every random draw comes from a named stream of batches.STREAMS seeded by its position
in the run, so a step's result depends only on (seed, nimg), not on the number of processes, the
accumulation split or on where a run was interrupted. Checkpoint files: checkpoints.py.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import config as C
from .batches import rank_batches, stream_seed
from .checkpoints import CHECKPOINT_FORMAT, load_latest_checkpoint, save_checkpoint, write_summary
from .data.encoded import EncodedDataset, Prefetcher
from .devices import COMPILE_BREAK_EVEN, Dist, compile_wanted, init_distributed, maybe_compile
from .edm import edm2_loss, learning_rate, sample_images, sample_sigma
from .errors import TrainingError
from .io import RunLock, atomic_write_text, check_writable, remove_stale_temps
from .networks import build_network
from .phema import PowerFunctionEMA, snapshot_meta, write_snapshots


@dataclass
class TrainHooks:
    """What a caller adds to a training call; every field is optional."""
    stage: str | None = None                  # MLflow tag dvc_stage: train | slurm | sweep
    stop: StopFlag | None = None              # stop requests; None: one listening to SIGTERM/SIGUSR2/SIGINT
    progress: bool = True                     # a progress bar on the main process
    report: Callable | None = None            # report(nimg, metrics) after every snapshot, on every rank (sweeps)
    validate: Callable | None = None          # validate(net) -> metrics["val_loss"] given to report
    max_steps: int | None = None              # end the call early as if stopped (tests simulate interruptions)
    parent_run_id: str | None = None          # the MLflow parent run (a sweep)
    run_name: str | None = None               # the MLflow run's name; None: train-<run key>
    mlflow_params: dict | None = None         # params to log instead of the whole config (a sweep trial's)
    tags: dict | None = None                  # more MLflow tags (a sweep trial's sweep and trial)


@dataclass
class TrainResult:
    nimg: int
    status: str                               # "finished" | "stopped"
    run_dir: Path
    mlflow_run_id: str | None
    final_loss: float | None
    seconds: float
    checkpoint: Path | None


def train(cfg: C.Config, hooks: TrainHooks | None = None, device: torch.device | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg` in cfg.train.run_dir until train.duration_nimg.
    `device` overrides the one init_distributed would choose. The main process holds the run folder's
    lock for the whole call (one writer per run folder)."""
    hooks = hooks or TrainHooks()
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"train.run_dir={run_dir} is a file, not a folder")
    check_writable(run_dir, "train.run_dir")
    world = init_distributed(cfg.train.device, device)
    from .workspace import in_experiment_copy
    # Queued DVC experiments with the same training share its folder: the later one waits, then resumes
    # the finished run (nothing to train); elsewhere a second writer is refused.
    lock = RunLock(run_dir).acquire(wait=in_experiment_copy()) if world.is_main else None
    try:
        return _train_locked(cfg, world, hooks)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Run:
    """One training call's state: what setup builds, each step advances and the hooks read."""
    cfg: C.Config
    world: Dist                               # this process's rank, the world size, the device
    run_dir: Path
    log: Callable                             # print on the main process, nothing elsewhere
    ds: EncodedDataset
    net_args: dict                            # the network's shape (img_resolution, img_channels, label_dim)
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: PowerFunctionEMA | None              # main process only
    batch_rank: int                           # images per process per step
    batch_gpu: int                            # images per forward pass
    t0: float = field(default_factory=time.time)
    nimg: int = 0
    steps: int = 0
    nonfinite: int = 0                        # consecutive steps with a non-finite loss
    seconds_before: float = 0.0               # training time of earlier calls (resumes)
    mlflow_run_id: str | None = None
    ckpt_path: Path | None = None
    logger: object = None
    ddp: object = None
    model: object = None                      # what the loss calls: compiled / DDP-wrapped net
    writer: SnapshotWriter | None = None
    meta: dict | None = None                  # what every snapshot carries (phema.snapshot_meta)
    bar: object = None
    window: dict = field(default_factory=dict)    # losses and images since the last status line


def _train_locked(cfg: C.Config, world: Dist, hooks: TrainHooks) -> TrainResult:
    t0 = time.time()
    stop = hooks.stop or StopFlag().install()
    run = _setup(cfg, world)
    run.t0 = t0
    _resume(run)
    if world.is_main:
        _start_tracking(run, hooks)
    if run.nimg >= cfg.train.duration_nimg:              # finished before: change nothing, say so
        return _already_finished(run)
    _prepare_loop(run, hooks.progress)

    # The loop.
    status, last_loss, last_ckpt = "finished", None, None
    pin = world.device.type == "cuda"
    batches = rank_batches(run.ds, cfg.train, run.nimg, world.rank, run.batch_rank, run.batch_gpu, pin)
    if cfg.train.prefetch_batches:
        batches = Prefetcher(batches, cfg.train.prefetch_batches)
    try:
        while run.nimg < cfg.train.duration_nimg:
            if stop.requested(world) or (hooks.max_steps is not None and run.steps >= hooks.max_steps):
                status = "stopped"
                break
            step_loss, step_mse, lr = _step(run, batches, pin)
            last_loss = step_loss
            last_ckpt = _after_step(run, step_loss, step_mse, lr, hooks) or last_ckpt
    except BaseException:
        if run.writer is not None:                       # a failed write elsewhere must not hide this one
            with contextlib.suppress(Exception):
                run.writer.drain()
        raise
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
    last_ckpt = _checkpoint(run) or last_ckpt
    return _finish(run, status, last_loss, last_ckpt)


# ----------------------------------------------------------------------------------------------
# Before the loop.

def dataset_dir(cfg: C.Config) -> Path:
    return Path(cfg.data.dataset_dir) / "train"


def net_args(cfg: C.Config, ds: EncodedDataset) -> dict:
    label_dim = cfg.network.label_dim if cfg.network.label_dim is not None else \
        (ds.label_dim if cfg.data.use_labels else 0)
    return {"img_resolution": ds.resolution, "img_channels": ds.img_channels, "label_dim": label_dim}


def _setup(cfg: C.Config, world: Dist) -> Run:
    """The dataset, the batch split, the network (seeded: the same on every rank), Adam and the EMA."""
    train_cfg = cfg.train
    run_dir = Path(train_cfg.run_dir)
    log = (lambda *a, **k: print(*a, **k, flush=True)) if world.is_main else (lambda *a, **k: None)
    if world.is_main:
        gone = remove_stale_temps(run_dir, run_dir / "checkpoints", run_dir / "snapshots")
        if gone:
            log(f"note: removed {len(gone)} temp file(s) left by an interrupted write ({gone[0].name} ...)")
    ds = EncodedDataset(dataset_dir(cfg), cfg)
    args = net_args(cfg, ds)
    batch_rank = train_cfg.batch_size // world.world_size
    if train_cfg.batch_size % world.world_size:
        raise TrainingError(f"train.batch_size={train_cfg.batch_size} is not divisible by {world.world_size} processes")
    batch_gpu = min(train_cfg.batch_gpu or batch_rank, batch_rank)
    if batch_rank % batch_gpu:
        raise TrainingError(f"per-process batch {batch_rank} is not a multiple of train.batch_gpu={batch_gpu}")
    torch.manual_seed(stream_seed(train_cfg.seed, "init"))
    net = build_network(cfg, **args).to(world.device).train()
    if train_cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=train_cfg.ref_lr, betas=(train_cfg.beta1, train_cfg.beta2),
                           eps=train_cfg.eps, **({"fused": True} if train_cfg.fused_adam else {"foreach": True}))
    ema = PowerFunctionEMA(net, cfg.ema.stds) if world.is_main else None
    return Run(cfg, world, run_dir, log, ds, args, net, opt, ema, batch_rank, batch_gpu)


def _resume(run: Run) -> None:
    """Network, optimizer, EMA and counters from the latest checkpoint, when there is one."""
    ckpt = load_latest_checkpoint(run.run_dir, run.cfg, run.log)   # every rank reads the shared run folder
    if ckpt is None:
        return
    try:
        run.net.load_state_dict(ckpt["net"])
        run.opt.load_state_dict(ckpt["optimizer"])
        if run.ema is not None:
            run.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise TrainingError(f"checkpoint {ckpt['path']} does not fit this network "
                            f"({str(err).splitlines()[0][:160]})") from None
    run.nimg, run.mlflow_run_id, run.nonfinite = ckpt["nimg"], ckpt.get("mlflow_run_id"), ckpt.get("nonfinite", 0)
    run.seconds_before = ckpt.get("train_seconds", 0.0)
    run.ckpt_path = ckpt["path"]
    if run.nimg < run.cfg.train.duration_nimg:
        run.log(f"resuming from {run.ckpt_path} at nimg={run.nimg}")


def _start_tracking(run: Run, hooks: TrainHooks) -> None:
    """The run folder's config.yaml and the MLflow run (the same one across resumes). Its params: every
    config field, or hooks.mlflow_params (a sweep trial: its searched values and run key; the full
    config is the config.yaml artifact)."""
    from .tracking.logger import RunLogger, run_tags
    cfg, run_dir = run.cfg, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(C.yaml_dump(cfg), run_dir / "config.yaml")
    atomic_write_text(cfg.run_key(), run_dir / "run_key")      # what this folder trains (workspace.keyed_run_dir)
    run.logger = RunLogger(cfg, jsonl=run_dir / "metrics.jsonl")
    id_file = run_dir / "mlflow_run_id"                # reused even when no checkpoint exists yet
    if run.mlflow_run_id is None and id_file.is_file():
        run.mlflow_run_id = id_file.read_text().strip() or None

    def save_id(run_id: str) -> None:                  # before anything is logged: a kill leaves no orphan
        atomic_write_text(run_id, id_file)
    run.mlflow_run_id = run.logger.start(
        run.mlflow_run_id, run_name=hooks.run_name or f"train-{cfg.run_key()[:8]}",
        tags={**run_tags(hooks.stage), "run_key": cfg.run_key(), "run_dir": str(run_dir),
              "processes": str(run.world.world_size), **(hooks.tags or {})},
        params=cfg.flat() if hooks.mlflow_params is None else hooks.mlflow_params,
        parent_run_id=hooks.parent_run_id, on_run_id=save_id)
    run.logger.replay_missing()                        # steps logged while MLflow was unreachable
    run.logger.log_artifact(run_dir / "config.yaml")


def _already_finished(run: Run) -> TrainResult:
    if run.world.is_main:
        summary = write_summary(run.run_dir, run.cfg, "finished", run.nimg, run.seconds_before, run.mlflow_run_id,
                                steps=0, seconds=0.0, keep_existing=True, device=run.world.device,
                                processes=run.world.world_size)
        run.logger.end("FINISHED")
        run.log(f"run {run.run_dir} is already finished at nimg={run.nimg} (train.duration_nimg="
                f"{run.cfg.train.duration_nimg}): nothing to do; final loss {summary['final_loss']}")
    return TrainResult(run.nimg, "finished", run.run_dir, run.mlflow_run_id, None, 0.0, run.ckpt_path)


def _prepare_loop(run: Run, progress: bool) -> None:
    """DDP, compilation, the snapshot writer, the progress bar and the status window."""
    train_cfg, world = run.cfg.train, run.world
    run.ddp = torch.nn.parallel.DistributedDataParallel(run.net) if world.world_size > 1 else None
    # auto decides on the whole run, not what is left: a resumed run computes as the uninterrupted one did
    compiled = compile_wanted(train_cfg.compile, "train", world.device, train_cfg.duration_nimg)
    if compiled and train_cfg.compile == "auto" and world.is_main:
        run.log(f"train.compile=auto: compiling the network (a run of {train_cfg.duration_nimg:,} images >= "
                f"{COMPILE_BREAK_EVEN['train'][world.device.type]:,}, where compiling pays on {world.device.type}; "
                f"train.compile=false turns it off)")
    run.model = maybe_compile(run.ddp or run.net, compiled, run.log, what="training")
    run.writer = SnapshotWriter(train_cfg.async_snapshots) if world.is_main else None
    if progress and world.is_main:
        from tqdm import tqdm
        run.bar = tqdm(total=train_cfg.duration_nimg, initial=run.nimg, unit="img", unit_scale=True,
                       dynamic_ncols=True, desc="train", mininterval=1.0)
    run.meta = snapshot_meta(run.cfg, run.net_args) if world.is_main else None
    run.window = {"loss": 0.0, "weighted_mse": 0.0, "n": 0, "t": time.time(), "nimg": run.nimg}
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)


# ----------------------------------------------------------------------------------------------
# One step and the hooks after it.

def _step(run: Run, batches, pin: bool) -> tuple[float, float, float]:
    """One optimizer step over the global batch starting at image run.nimg (method.md 2, 3): the noise of
    the whole batch from its stream, this rank's micro-batches, gradient accumulation, Adam.
    Returns (loss, weighted_mse, lr), the losses averaged over ranks."""
    cfg, world, train_cfg = run.cfg, run.world, run.cfg.train
    nimg, rounds = run.nimg, run.batch_rank // run.batch_gpu
    noise = torch.Generator(device=world.device).manual_seed(stream_seed(train_cfg.seed, "noise", nimg))
    sigma_all = sample_sigma(train_cfg.batch_size, cfg.loss, noise, world.device)     # the loss's own noise law
    eps_all = torch.randn([train_cfg.batch_size, run.ds.img_channels, run.ds.resolution, run.ds.resolution],
                          generator=noise, device=world.device)
    lr = learning_rate(nimg, train_cfg.batch_size, train_cfg.ref_lr, train_cfg.ref_batches, train_cfg.rampup_nimg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    run.opt.zero_grad(set_to_none=True)
    amp = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=train_cfg.amp == "bf16")
    step_loss = step_mse = 0.0
    for r in range(rounds):
        lo = world.rank * run.batch_rank + r * run.batch_gpu
        torch.manual_seed(stream_seed(train_cfg.seed, "dropout", nimg, world.rank, r))
        key, x, labels = next(batches)
        if key != (nimg, r):
            raise TrainingError(f"batch order broken: expected {(nimg, r)}, got {key}")
        x = x.to(world.device, non_blocking=pin,
                 memory_format=torch.channels_last if train_cfg.channels_last else torch.preserve_format)
        labels = labels.to(world.device, non_blocking=pin) if labels is not None and run.net_args["label_dim"] else None
        if labels is not None and train_cfg.label_dropout > 0:     # method.md 5: the zero label = unconditional
            keep = torch.Generator().manual_seed(stream_seed(train_cfg.seed, "label_dropout", nimg, lo))
            u = torch.rand(labels.shape[0], generator=keep)
            labels = labels * (u >= train_cfg.label_dropout).to(labels.dtype).to(world.device)[:, None]
        sync = run.ddp is None or r == rounds - 1
        no_sync = run.ddp.no_sync() if not sync else contextlib.nullcontext()
        with no_sync, amp:
            micro = slice(lo, lo + run.batch_gpu)
            obj, stats = edm2_loss(run.model, x, labels, cfg.loss, sigma=sigma_all[micro], eps=eps_all[micro])
            (obj * (run.batch_gpu / run.batch_rank)).backward()
        step_loss += stats["loss"].item() / rounds
        step_mse += stats["weighted_mse"].item() / rounds
    for p in run.net.parameters():                       # method.md 3: non-finite gradients are set to zero
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    run.opt.step()
    run.nimg += train_cfg.batch_size
    run.steps += 1
    if world.world_size > 1:                             # loss for logging: mean over ranks
        t = torch.tensor([step_loss, step_mse], device=world.device)
        dist.all_reduce(t)
        step_loss, step_mse = (t / world.world_size).tolist()
    return step_loss, step_mse, lr


def _after_step(run: Run, step_loss: float, step_mse: float, lr: float, hooks: TrainHooks) -> Path | None:
    """The hooks after a step: the non-finite guard, EMA, status lines, snapshots, sample grids, the
    sweep's report, checkpoints. Returns the checkpoint written, if any."""
    cfg, world, train_cfg, nimg = run.cfg, run.world, run.cfg.train, run.nimg
    run.nonfinite = run.nonfinite + 1 if not math.isfinite(step_loss) else 0
    if run.nonfinite >= train_cfg.max_nonfinite_steps:
        if run.logger:
            run.logger.end("FAILED")
        raise TrainingError(f"loss was non-finite for {run.nonfinite} consecutive steps at nimg={nimg} "
                            f"(try a lower train.ref_lr={train_cfg.ref_lr}); the last good checkpoint is kept")
    if world.is_main:
        run.ema.update(run.net, nimg, train_cfg.batch_size)
        if math.isfinite(step_loss):
            run.window["loss"] += step_loss
            run.window["weighted_mse"] += step_mse
            run.window["n"] += 1
        if run.bar is not None:
            run.bar.update(train_cfg.batch_size)
            run.bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if nimg % train_cfg.status_nimg < train_cfg.batch_size or nimg >= train_cfg.duration_nimg:
            _log_window(run.logger, run.window, nimg, lr, world)
        if nimg % cfg.ema.snapshot_nimg == 0:
            run.writer.submit(run.ema.snapshot_payloads(run.run_dir / "snapshots", nimg, run.meta,
                                                        cfg.ema.snapshot_dtype))
        if train_cfg.sample_nimg and nimg % train_cfg.sample_nimg < train_cfg.batch_size:
            _log_samples(run, nimg)
    if hooks.report is not None and nimg % cfg.ema.snapshot_nimg == 0:    # every rank: same loss after all_reduce
        extra = {"val_loss": hooks.validate(run.net)} if hooks.validate is not None else {}
        if extra and run.logger is not None:
            run.logger.log_metrics_at(extra, nimg)
        hooks.report(nimg, {"loss": step_loss, "weighted_mse": step_mse, **extra})
    if nimg % train_cfg.checkpoint_nimg == 0 and nimg < train_cfg.duration_nimg:
        return _checkpoint(run)
    return None


def _log_window(logger, window: dict, nimg: int, lr: float, world: Dist) -> None:
    """One status line of metrics: the means since the last one, speed and peak memory."""
    n = max(window["n"], 1)
    dt = time.time() - window["t"]
    imgs = nimg - window["nimg"]
    metrics = {"loss": window["loss"] / n, "weighted_mse": window["weighted_mse"] / n, "lr": lr,
               "images_per_s": imgs / max(dt, 1e-9), "sec_per_kimg": dt / max(imgs, 1) * 1000}
    if world.device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(world.device) / 2 ** 30
    else:
        import resource
        metrics["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    logger.log_metrics(metrics, step=nimg)
    window.update(loss=0.0, weighted_mse=0.0, n=0, t=time.time(), nimg=nimg)


def _log_samples(run: Run, nimg: int, count: int = 36) -> None:
    """A sample grid from the longest tracked EMA, saved in the run folder and logged to MLflow (a latent
    run's samples decoded by its VAE)."""
    from .data.latents import Decoder
    from .images import save_image_grid
    cfg, device, label_dim = run.cfg, run.world.device, run.net_args["label_dim"]
    sampler = cfg.sampler.model_copy(update={"steps": min(cfg.sampler.steps, 18)})
    probe = build_network(cfg, **run.net_args).to(device)
    probe.load_state_dict(run.ema.emas[-1])
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(count) % label_dim, label_dim).float()
    x = sample_images(probe.eval(), list(range(count)), labels, sampler, device=device)
    decoder = Decoder(cfg.data.model_dump(), cfg.data.vae_path, device, cfg.data.dataset_dir)
    path = save_image_grid(decoder(x), run.run_dir / "samples" / f"samples-{nimg:010d}.png", cols=6)
    run.logger.log_artifact(path, "samples")


# ----------------------------------------------------------------------------------------------
# After the loop.

def _checkpoint(run: Run) -> Path | None:
    """An atomic checkpoint of everything a resume needs (main process; snapshots up to nimg first)."""
    if not run.world.is_main:
        return None
    run.writer.drain()                                   # snapshots up to nimg are on disk before the checkpoint
    if run.nonfinite or not all(torch.isfinite(p).all() for p in run.net.parameters()):
        run.log(f"warning: no checkpoint at nimg={run.nimg}: the weights or the last loss are not finite; "
                f"the last good checkpoint is kept")
        return None
    return save_checkpoint(run.run_dir, {
        "format": CHECKPOINT_FORMAT, "nimg": run.nimg, "net": run.net.state_dict(),
        "optimizer": run.opt.state_dict(), "ema": run.ema.state_dict(), "mlflow_run_id": run.mlflow_run_id,
        "nonfinite": run.nonfinite, "train_seconds": run.seconds_before + time.time() - run.t0,
        "run_key": run.cfg.run_key(), "config": run.cfg.to_dict(), "net_args": run.net_args})


def _finish(run: Run, status: str, last_loss, last_ckpt) -> TrainResult:
    """The final sample grid, train_summary.json, the MLflow run's end and the stop line."""
    if run.bar is not None:
        run.bar.close()
    seconds = time.time() - run.t0
    world, train_cfg = run.world, run.cfg.train
    if world.is_main:
        # the final grid, unless the last step just drew it (sample_nimg dividing the duration)
        if status == "finished" and not (train_cfg.sample_nimg and run.nimg % train_cfg.sample_nimg
                                         < train_cfg.batch_size and run.steps):
            _log_samples(run, run.nimg)
        total = run.seconds_before + seconds                # across every resume of this run
        devices = world.world_size if world.device.type == "cuda" else 0
        summary = write_summary(run.run_dir, run.cfg, status, run.nimg, total, run.mlflow_run_id, run.steps,
                                seconds, device=world.device, processes=world.world_size)
        run.logger.set_tags({"gpus": devices})
        run.logger.log_summary({"train_seconds": total, "gpu_seconds": total * devices,
                                "final_loss": summary["final_loss"]})
        run.logger.end("FINISHED" if status == "finished" else "KILLED")
        fl = summary["final_loss"]                         # the last status window's mean, else the last step's
        loss = (f"loss {round(fl, 4)}" if fl is not None else
                f"last step's loss {round(last_loss, 4)}" if last_loss is not None else "no step taken")
        run.log(f"{status} at nimg={run.nimg}/{train_cfg.duration_nimg}: {loss}, "
                f"{summary['images_per_s_session']} img/s over {run.steps} steps in {seconds:.0f} s; "
                f"run {run.run_dir}, checkpoint {last_ckpt}, MLflow run {run.mlflow_run_id or '(offline)'}")
    return TrainResult(run.nimg, status, run.run_dir, run.mlflow_run_id, last_loss, seconds, last_ckpt)


# ----------------------------------------------------------------------------------------------
# Run control: stop requests and the snapshot writer.

class StopFlag:
    """Stop requests: SIGTERM (`scontrol requeue`, preemption), SIGUSR2 (before a SLURM time limit),
    SIGINT. Every rank stops at the same step."""

    def __init__(self):
        self.signal: int | None = None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:                     # not the main thread (e.g. inside a Ray actor)
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self, world: Dist) -> bool:
        flag = torch.tensor([float(self.signal or 0)], device=world.device)
        if world.world_size > 1:                   # every rank stops at the same step, knowing the signal
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and self.signal is None:
                self.signal = int(flag.item())
        return bool(flag.item() > 0)


class SnapshotWriter:
    """Writes EMA snapshots now, or (async) in one background thread in submission order.

    A failed background write is raised at the next submit or drain, so it cannot go unnoticed;
    drain() before each checkpoint keeps 'checkpoint at nimg N' => 'snapshots up to N on disk'."""

    def __init__(self, background: bool):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer") if background else None
        self._pending: list = []

    def submit(self, items) -> None:
        if self._pool is None:
            write_snapshots(items)
            return
        for f in self._pending:
            if f.done():
                f.result()                          # re-raises a failed write
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(write_snapshots, items))

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
