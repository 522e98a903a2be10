"""The EDM2 training loop (docs/method.md 2, 3, 6): DDP under torchrun (NCCL on GPUs, gloo on CPU), gradient
accumulation, power-function EMA snapshots, atomic checkpoints and exact resume, MLflow logging.

Determinism: the data order is a permutation per epoch seeded by (seed, epoch), and the noise levels
and noise of a step are drawn for the whole global batch from a generator seeded by (seed, nimg);
each rank and micro-batch takes its slice. A step's result therefore depends only on (seed, nimg),
not on the number of processes, the accumulation split or on where a run was interrupted.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from . import config as C
from .data.encoded import EncodedDataset, Prefetcher
from .edm import edm2_loss, learning_rate, sample_images, sample_sigma
from .io import (RunLock, atomic_torch_save, atomic_write_text, load_torch_file, read_jsonl,
                 remove_stale_temps)
from .devices import Dist, init_distributed  # noqa: F401 (the training loop's ranks)
from .networks import COMPILE_BREAK_EVEN, build_network, compile_wanted, maybe_compile
from .phema import PowerFunctionEMA, snapshot_meta, write_snapshots
from .errors import PipelineError

CHECKPOINT_FORMAT = "edm2-pipeline/checkpoint/1"
CHECKPOINT_FIELDS = ("nimg", "net", "optimizer", "ema", "run_key", "config")


class TrainingError(PipelineError, RuntimeError):
    pass


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, nimg) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def batch_indices(nimg: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of the global batch that starts at image `nimg` of the endless stream made
    of one permutation per epoch, seeded by (seed, epoch)."""
    out = np.empty(batch_size, dtype=np.int64)
    pos, filled = nimg, 0
    while filled < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 1, epoch))).numpy()
        take = min(batch_size - filled, n - offset)
        out[filled:filled + take] = perm[offset:offset + take]
        filled, pos = filled + take, pos + take
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def checkpoint_name(nimg: int) -> str:
    return f"checkpoint-{int(nimg):010d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("checkpoint-*.pt"))


def load_latest_checkpoint(run_dir: Path, cfg: C.Config, log=print) -> dict | None:
    """The newest valid checkpoint. One that fails validation (truncated, corrupt, crafted: holding
    anything but tensors and plain values, which is refused without being loaded, or non-finite
    weights) is skipped with one line for the previous valid one, and then renamed `<name>.refused`
    (kept for inspection, never read again). A checkpoint of another configuration is refused, naming the
    fields that differ; when checkpoints exist but none is valid, training does not silently start over."""
    from .io import UnsafeFileError
    paths = list_checkpoints(run_dir)
    problems = []
    for path in reversed(paths):
        try:
            ckpt = load_torch_file(path, what="checkpoint", error=TrainingError)
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
                raise TrainingError(f"checkpoint {path} has an unknown format")
            missing = [k for k in CHECKPOINT_FIELDS if k not in ckpt]
            if missing:
                raise TrainingError(f"checkpoint {path} lacks {', '.join(missing)}")
            if not isinstance(ckpt["nimg"], int) or isinstance(ckpt["nimg"], bool) or ckpt["nimg"] < 0 \
                    or not isinstance(ckpt["net"], dict) or not isinstance(ckpt["config"], dict):
                raise TrainingError(f"checkpoint {path} is malformed (nimg, net or config of the wrong type)")
            _check_finite_state(path, ckpt)
        except (TrainingError, UnsafeFileError) as err:
            log(f"warning: {err}; falling back to the previous checkpoint")
            problems.append((path, str(err)))
            continue
        if ckpt["run_key"] != cfg.run_key():
            have, want = C.flatten(ckpt["config"]), C.flatten(cfg.to_dict())
            keyed = C.flatten(C.key_values(cfg))
            shown = "; ".join(f"{k}: checkpoint {have.get(k)!r}, config {want[k]!r}" for k in sorted(keyed)
                              if have.get(k) != want[k])
            raise TrainingError(f"{path} was written by a different configuration ({shown or 'run key differs'}). "
                                f"Use another train.run_dir, or remove {run_dir} to start over.")
        for bad, _ in problems:                      # a valid one exists: the refused newer ones go aside
            _set_aside(bad, log)
        return {**ckpt, "path": path}
    if paths:
        raise TrainingError(f"none of the {len(paths)} checkpoint(s) in {run_dir / 'checkpoints'} is valid "
                            f"({problems[0][1]}); move the folder aside to start over")
    return None


def _check_finite_state(path: Path, ckpt: dict) -> None:
    """Network, EMA and optimizer tensors all finite (a checkpoint is never written otherwise)."""
    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                raise TrainingError(f"checkpoint {path}: {where} holds non-finite values")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
    for part in ("net", "ema", "optimizer"):
        walk(ckpt.get(part), part)


def _set_aside(path: Path, log) -> None:
    """Rename a refused checkpoint out of the checkpoint list (it is kept, never read again)."""
    try:
        os.replace(path, path.with_name(path.name + ".refused"))
        log(f"note: {path.name} renamed to {path.name}.refused")
    except OSError:
        pass


def save_checkpoint(run_dir: Path, state: dict, keep: int = 2) -> Path:
    path = atomic_torch_save(state, run_dir / "checkpoints" / checkpoint_name(state["nimg"]))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# Stop requests (SIGTERM from `scontrol requeue` / preemption, SIGUSR2 before a SLURM time limit).

class StopFlag:
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

    def requested(self, d: Dist) -> bool:
        flag = torch.tensor([float(self.signal or 0)], device=d.device)
        if d.world_size > 1:                       # every rank stops at the same step, knowing the signal
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and self.signal is None:
                self.signal = int(flag.item())
        return bool(flag.item() > 0)


# ----------------------------------------------------------------------------------------------
# The loop.

@dataclass
class TrainResult:
    nimg: int
    status: str                                   # "finished" | "stopped"
    run_dir: Path
    mlflow_run_id: str | None
    final_loss: float | None
    seconds: float
    checkpoint: Path | None


def dataset_dir(cfg: C.Config) -> Path:
    return Path(cfg.data.dataset_dir) / "train"


def net_args(cfg: C.Config, ds: EncodedDataset) -> dict:
    label_dim = cfg.network.label_dim if cfg.network.label_dim is not None else \
        (ds.label_dim if cfg.data.use_labels else 0)
    return {"img_resolution": ds.resolution, "img_channels": ds.img_channels, "label_dim": label_dim}


def train(cfg: C.Config, stage: str | None = None, stop: StopFlag | None = None, progress: bool = True,
          report=None, max_steps: int | None = None, parent_run_id: str | None = None,
          run_name: str | None = None, device: torch.device | None = None, validate=None,
          mlflow_params: dict | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg` in cfg.train.run_dir until duration_nimg.

    report(nimg, metrics) is called on every rank after every snapshot (sweeps use it; Ray Train
    wants every worker to report), with validate(net) as metrics["val_loss"] when given; max_steps ends the call early as if stopped (tests use it to
    simulate interruptions); device overrides the device init_distributed would choose.
    The main process holds the run folder's lock for the whole call (one writer per run folder).
    """
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"train.run_dir={run_dir} is a file, not a folder")
    from .io import check_writable
    check_writable(run_dir, "train.run_dir")
    d = init_distributed(cfg.train.device, device)
    from .workspace import in_experiment_copy
    # Queued DVC experiments with the same training share its folder: the later one waits, then resumes
    # the finished run (nothing to train); elsewhere a second writer is refused.
    lock = RunLock(run_dir).acquire(wait=in_experiment_copy()) if d.is_main else None
    try:
        return _train_locked(cfg, d, stage, stop, progress, report, max_steps, parent_run_id, run_name, validate,
                             mlflow_params)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Session:
    """One training call's state: what setup builds, the step advances and the hooks read."""
    cfg: C.Config
    d: Dist
    run_dir: Path
    log: object
    ds: EncodedDataset
    args: dict                                    # the network's shape (img_resolution, img_channels, label_dim)
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: PowerFunctionEMA | None                  # main process only
    batch_rank: int                               # images per process per step
    batch_gpu: int                                # images per forward pass
    t0: float = field(default_factory=time.time)
    nimg: int = 0
    steps: int = 0
    nonfinite: int = 0                            # consecutive steps with a non-finite loss
    seconds_before: float = 0.0                   # training time of earlier calls (resumes)
    mlflow_run_id: str | None = None
    ckpt_path: Path | None = None
    logger: object = None
    ddp: object = None
    model: object = None                          # what the loss calls: compiled / DDP-wrapped net
    writer: object = None
    meta: dict | None = None
    bar: object = None
    window: dict = field(default_factory=dict)    # losses and images since the last status line


def _train_locked(cfg: C.Config, d: Dist, stage, stop, progress, report, max_steps, parent_run_id,
                  run_name, validate, mlflow_params=None) -> TrainResult:
    t0 = time.time()
    stop = stop or StopFlag().install()
    s = _setup(cfg, d)
    s.t0 = t0
    _resume(s)
    if d.is_main:
        _start_tracking(s, stage, parent_run_id, run_name, mlflow_params)
    if s.nimg >= cfg.train.duration_nimg:              # finished before: change nothing, say so
        return _already_finished(s)
    _prepare_loop(s, progress)
    status, last_loss, last_ckpt = "finished", None, None
    pin = d.device.type == "cuda"
    batches = rank_batches(s.ds, cfg.train, s.nimg, d.rank, s.batch_rank, s.batch_gpu, pin)
    if cfg.train.prefetch_batches:
        batches = Prefetcher(batches, cfg.train.prefetch_batches)
    try:
        while s.nimg < cfg.train.duration_nimg:
            if stop.requested(d) or (max_steps is not None and s.steps >= max_steps):
                status = "stopped"
                break
            step_loss, step_mse, lr = _step(s, batches, pin)
            last_loss = step_loss
            last_ckpt = _after_step(s, step_loss, step_mse, lr, report, validate) or last_ckpt
    except BaseException:
        if s.writer is not None:                       # a failed write elsewhere must not hide this one
            try:
                s.writer.drain()
            except Exception:
                pass
        raise
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
    last_ckpt = _checkpoint(s) or last_ckpt
    return _finish(s, status, last_loss, last_ckpt)


def _setup(cfg: C.Config, d: Dist) -> Session:
    """The dataset, the batch split, the network (seeded: the same on every rank), Adam and the EMA."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    log = (lambda *a, **k: print(*a, **k, flush=True)) if d.is_main else (lambda *a, **k: None)
    if d.is_main:
        gone = remove_stale_temps(run_dir, run_dir / "checkpoints", run_dir / "snapshots")
        if gone:
            log(f"note: removed {len(gone)} temp file(s) left by an interrupted write ({gone[0].name} ...)")
    ds = EncodedDataset(dataset_dir(cfg), cfg)
    args = net_args(cfg, ds)
    batch_rank = tc.batch_size // d.world_size
    if tc.batch_size % d.world_size:
        raise TrainingError(f"train.batch_size={tc.batch_size} is not divisible by {d.world_size} processes")
    batch_gpu = min(tc.batch_gpu or batch_rank, batch_rank)
    if batch_rank % batch_gpu:
        raise TrainingError(f"per-process batch {batch_rank} is not a multiple of train.batch_gpu={batch_gpu}")
    torch.manual_seed(_seed(tc.seed, 2))           # network initialisation: same on every rank
    net = build_network(cfg, **args).to(d.device).train()
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=tc.ref_lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                           **({"fused": True} if tc.fused_adam else {"foreach": True}))
    ema = PowerFunctionEMA(net, cfg.ema.stds) if d.is_main else None
    return Session(cfg, d, run_dir, log, ds, args, net, opt, ema, batch_rank, batch_gpu)


def _resume(s: Session) -> None:
    """Network, optimizer, EMA and counters from the latest checkpoint, when there is one."""
    ckpt = load_latest_checkpoint(s.run_dir, s.cfg, s.log)   # every rank reads it from the shared run folder
    if ckpt is None:
        return
    try:
        s.net.load_state_dict(ckpt["net"])
        s.opt.load_state_dict(ckpt["optimizer"])
        if s.ema is not None:
            s.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise TrainingError(f"checkpoint {ckpt['path']} does not fit this network "
                            f"({str(err).splitlines()[0][:160]})") from None
    s.nimg, s.mlflow_run_id, s.nonfinite = ckpt["nimg"], ckpt.get("mlflow_run_id"), ckpt.get("nonfinite", 0)
    s.seconds_before = ckpt.get("train_seconds", 0.0)
    s.ckpt_path = ckpt["path"]
    if s.nimg < s.cfg.train.duration_nimg:
        s.log(f"resuming from {s.ckpt_path} at nimg={s.nimg}")


def _start_tracking(s: Session, stage, parent_run_id, run_name, mlflow_params=None) -> None:
    """The run folder's config.yaml and the MLflow run (the same one across resumes). Its params: every
    config field, or `mlflow_params` (a sweep trial: its searched values and run key; the full config is
    the config.yaml artifact)."""
    from .tracking.logger import RunLogger, run_tags
    cfg, run_dir = s.cfg, s.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(C.yaml_dump(cfg), run_dir / "config.yaml")
    atomic_write_text(cfg.run_key(), run_dir / "run_key")      # what this folder trains (workspace.keyed_run_dir)
    s.logger = RunLogger(cfg, jsonl=run_dir / "metrics.jsonl")
    id_file = run_dir / "mlflow_run_id"                # reused even when no checkpoint exists yet
    if s.mlflow_run_id is None and id_file.is_file():
        s.mlflow_run_id = id_file.read_text().strip() or None

    def save_id(run_id: str) -> None:                  # before anything is logged: a kill leaves no orphan
        atomic_write_text(run_id, id_file)
    s.mlflow_run_id = s.logger.start(s.mlflow_run_id, run_name=run_name or f"train-{cfg.run_key()[:8]}",
                                     tags={**run_tags(stage), "run_key": cfg.run_key(), "run_dir": str(run_dir),
                                           "processes": str(s.d.world_size)},
                                     params=cfg.flat() if mlflow_params is None else mlflow_params,
                                     parent_run_id=parent_run_id, on_run_id=save_id)
    s.logger.replay_missing()                          # steps logged while MLflow was unreachable
    s.logger.log_artifact(run_dir / "config.yaml")


def _already_finished(s: Session) -> TrainResult:
    if s.d.is_main:
        summary = write_summary(s.run_dir, s.cfg, "finished", s.nimg, s.seconds_before, s.mlflow_run_id, steps=0,
                                seconds=0.0, keep_existing=True, device=s.d.device, processes=s.d.world_size)
        s.logger.end("FINISHED")
        s.log(f"run {s.run_dir} is already finished at nimg={s.nimg} (train.duration_nimg="
              f"{s.cfg.train.duration_nimg}): nothing to do; final loss {summary['final_loss']}")
    return TrainResult(s.nimg, "finished", s.run_dir, s.mlflow_run_id, None, 0.0, s.ckpt_path)


def _prepare_loop(s: Session, progress: bool) -> None:
    """DDP, compilation, the snapshot writer, the progress bar and the status window."""
    tc, d = s.cfg.train, s.d
    s.ddp = torch.nn.parallel.DistributedDataParallel(s.net) if d.world_size > 1 else None
    # auto decides on the whole run, not what is left: a resumed run computes as the uninterrupted one did
    compiled = compile_wanted(tc.compile, "train", d.device, tc.duration_nimg)
    if compiled and tc.compile == "auto" and d.is_main:
        s.log(f"train.compile=auto: compiling the network (a run of {tc.duration_nimg:,} images >= "
              f"{COMPILE_BREAK_EVEN['train'][d.device.type]:,}, where compiling pays on {d.device.type}; "
              f"train.compile=false turns it off)")
    s.model = maybe_compile(s.ddp or s.net, compiled, s.log, what="training")
    s.writer = SnapshotWriter(tc.async_snapshots) if d.is_main else None
    if progress and d.is_main:
        from tqdm import tqdm
        s.bar = tqdm(total=tc.duration_nimg, initial=s.nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                     desc="train", mininterval=1.0)
    s.meta = snapshot_meta(s.cfg, s.args) if d.is_main else None
    s.window = {"loss": 0.0, "weighted_mse": 0.0, "n": 0, "t": time.time(), "nimg": s.nimg}
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)


def _step(s: Session, batches, pin: bool) -> tuple[float, float, float]:
    """One optimizer step over the global batch starting at image s.nimg (method.md 2, 3): the noise of
    the whole batch from (seed, nimg), this rank's micro-batches, gradient accumulation, Adam.
    Returns (loss, weighted_mse, lr), the losses averaged over ranks."""
    cfg, d, tc = s.cfg, s.d, s.cfg.train
    nimg, rounds = s.nimg, s.batch_rank // s.batch_gpu
    gen = torch.Generator(device=d.device).manual_seed(_seed(tc.seed, 3, nimg))   # on the device: cheap
    sigma_all = sample_sigma(tc.batch_size, cfg.loss, gen, d.device)     # the loss's own noise law
    eps_all = torch.randn([tc.batch_size, s.ds.img_channels, s.ds.resolution, s.ds.resolution], generator=gen,
                          device=d.device)
    lr = learning_rate(nimg, tc.batch_size, tc.ref_lr, tc.ref_batches, tc.rampup_nimg)
    for g in s.opt.param_groups:
        g["lr"] = lr
    s.opt.zero_grad(set_to_none=True)
    amp = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=tc.amp == "bf16")
    step_loss = step_mse = 0.0
    for r in range(rounds):
        lo = d.rank * s.batch_rank + r * s.batch_gpu
        sl = slice(lo, lo + s.batch_gpu)
        torch.manual_seed(_seed(tc.seed, 4, nimg, d.rank, r))      # dropout masks
        key, x, labels = next(batches)
        if key != (nimg, r):
            raise TrainingError(f"batch order broken: expected {(nimg, r)}, got {key}")
        x = x.to(d.device, non_blocking=pin,
                 memory_format=torch.channels_last if tc.channels_last else torch.preserve_format)
        labels = labels.to(d.device, non_blocking=pin) if labels is not None and s.args["label_dim"] else None
        if labels is not None and tc.label_dropout > 0:     # method.md 5: the zero label = unconditional
            u = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(_seed(tc.seed, 6, nimg, lo)))
            labels = labels * (u >= tc.label_dropout).to(labels.dtype).to(d.device)[:, None]
        sync = s.ddp is None or r == rounds - 1
        ctx = s.ddp.no_sync() if (s.ddp is not None and not sync) else _nullcontext()
        with ctx, amp:
            obj, stats = edm2_loss(s.model, x, labels, cfg.loss, sigma=sigma_all[sl], eps=eps_all[sl])
            (obj * (s.batch_gpu / s.batch_rank)).backward()
        step_loss += stats["loss"].item() / rounds
        step_mse += stats["weighted_mse"].item() / rounds
    for p in s.net.parameters():                       # method.md 3: non-finite gradients are set to zero
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    s.opt.step()
    s.nimg += tc.batch_size
    s.steps += 1
    if d.world_size > 1:                               # loss for logging: mean over ranks
        t = torch.tensor([step_loss, step_mse], device=d.device)
        dist.all_reduce(t)
        step_loss, step_mse = (t / d.world_size).tolist()
    return step_loss, step_mse, lr


def _after_step(s: Session, step_loss: float, step_mse: float, lr: float, report, validate) -> Path | None:
    """The hooks after a step: the non-finite guard, EMA, status lines, snapshots, sample grids, the
    sweep's report, checkpoints. Returns the checkpoint written, if any."""
    cfg, d, tc, nimg = s.cfg, s.d, s.cfg.train, s.nimg
    s.nonfinite = s.nonfinite + 1 if not math.isfinite(step_loss) else 0
    if s.nonfinite >= tc.max_nonfinite_steps:
        if s.logger:
            s.logger.end("FAILED")
        raise TrainingError(f"loss was non-finite for {s.nonfinite} consecutive steps at nimg={nimg} "
                            f"(try a lower train.ref_lr={tc.ref_lr}); the last good checkpoint is kept")
    if d.is_main:
        s.ema.update(s.net, nimg, tc.batch_size)
        if math.isfinite(step_loss):
            s.window["loss"] += step_loss
            s.window["weighted_mse"] += step_mse
            s.window["n"] += 1
        if s.bar is not None:
            s.bar.update(tc.batch_size)
            s.bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if nimg % tc.status_nimg < tc.batch_size or nimg >= tc.duration_nimg:
            _log_window(s.logger, s.window, nimg, lr, d)
        if nimg % cfg.ema.snapshot_nimg == 0:
            s.writer.submit(s.ema.snapshot_payloads(s.run_dir / "snapshots", nimg, s.meta, cfg.ema.snapshot_dtype))
        if tc.sample_nimg and nimg % tc.sample_nimg < tc.batch_size:
            _log_samples(s.net, s.ema, cfg, s.args, s.run_dir, nimg, s.logger, d)
    if report is not None and nimg % cfg.ema.snapshot_nimg == 0:    # every rank: same loss after all_reduce
        extra = {"val_loss": validate(s.net)} if validate is not None else {}
        if extra and s.logger is not None:
            s.logger.log_metrics_at(extra, nimg)
        report(nimg, {"loss": step_loss, "weighted_mse": step_mse, **extra})
    if nimg % tc.checkpoint_nimg == 0 and nimg < tc.duration_nimg:
        return _checkpoint(s)
    return None


def _checkpoint(s: Session) -> Path | None:
    """An atomic checkpoint of everything a resume needs (main process; snapshots up to nimg first)."""
    if not s.d.is_main:
        return None
    s.writer.drain()                                   # snapshots up to nimg are on disk before the checkpoint
    if s.nonfinite or not all(torch.isfinite(p).all() for p in s.net.parameters()):
        s.log(f"warning: no checkpoint at nimg={s.nimg}: the weights or the last loss are not finite; "
              f"the last good checkpoint is kept")
        return None
    return save_checkpoint(s.run_dir, {"format": CHECKPOINT_FORMAT, "nimg": s.nimg, "net": s.net.state_dict(),
                                       "optimizer": s.opt.state_dict(), "ema": s.ema.state_dict(),
                                       "mlflow_run_id": s.mlflow_run_id, "nonfinite": s.nonfinite,
                                       "train_seconds": s.seconds_before + time.time() - s.t0,
                                       "run_key": s.cfg.run_key(), "config": s.cfg.to_dict(), "net_args": s.args})


def _finish(s: Session, status: str, last_loss, last_ckpt) -> TrainResult:
    """The final sample grid, train_summary.json, the MLflow run's end and the stop line."""
    if s.bar is not None:
        s.bar.close()
    seconds = time.time() - s.t0
    d, tc = s.d, s.cfg.train
    if d.is_main:
        # the final grid, unless the last step just drew it (sample_nimg dividing the duration)
        if status == "finished" and not (tc.sample_nimg and s.nimg % tc.sample_nimg < tc.batch_size and s.steps):
            _log_samples(s.net, s.ema, s.cfg, s.args, s.run_dir, s.nimg, s.logger, d)
        total = s.seconds_before + seconds                # across every resume of this run
        devices = d.world_size if d.device.type == "cuda" else 0
        summary = write_summary(s.run_dir, s.cfg, status, s.nimg, total, s.mlflow_run_id, s.steps, seconds,
                                device=d.device, processes=d.world_size)
        s.logger.set_tags({"gpus": devices})
        s.logger.log_summary({"train_seconds": total, "gpu_seconds": total * devices,
                              "final_loss": summary["final_loss"]})
        s.logger.end("FINISHED" if status == "finished" else "KILLED")
        fl = summary["final_loss"]                         # the last status window's mean, else the last step's
        loss = (f"loss {round(fl, 4)}" if fl is not None else
                f"last step's loss {round(last_loss, 4)}" if last_loss is not None else "no step taken")
        s.log(f"{status} at nimg={s.nimg}/{tc.duration_nimg}: {loss}, "
              f"{summary['images_per_s_session']} img/s over {s.steps} steps in {seconds:.0f} s; run {s.run_dir}, "
              f"checkpoint {last_ckpt}, MLflow run {s.mlflow_run_id or '(offline)'}")
    return TrainResult(s.nimg, status, s.run_dir, s.mlflow_run_id, last_loss, seconds, last_ckpt)


def write_summary(run_dir: Path, cfg: C.Config, status: str, nimg: int, train_seconds_total: float,
                  mlflow_run_id: str | None, steps: int, seconds: float, keep_existing: bool = False,
                  device: torch.device | None = None, processes: int = 1) -> dict:
    """train_summary.json, computed from the run's whole metrics history (never from this call alone,
    so a rerun or a resume after a kill keeps the final loss and the speed). keep_existing: leave a
    complete summary as it is (a finished run rerun changes nothing)."""
    from .provenance import git_revision
    path = run_dir / "train_summary.json"
    if keep_existing and path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and old.get("final_loss") is not None and old.get("nimg") == nimg:
                return old
        except (OSError, ValueError):
            pass                                      # unreadable: rebuilt below
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    rows = sorted((r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= nimg),
                  key=lambda r: r["step"])
    final = next((r for r in reversed(rows) if r.get("loss") is not None and math.isfinite(r["loss"])), None)
    summary = {"status": status, "nimg": nimg, "final_loss": final["loss"] if final else None,
               "final_loss_nimg": final["step"] if final else None,
               "final_weighted_mse": final.get("weighted_mse") if final else None,
               "train_seconds_total": round(train_seconds_total, 1),
               "images_per_s": round(nimg / train_seconds_total, 1) if train_seconds_total > 0 else None,
               "seconds": round(seconds, 1),
               "images_per_s_session": round(steps * cfg.train.batch_size / max(seconds, 1e-9), 1) if steps else None,
               "run_dir": str(run_dir), "mlflow_run_id": mlflow_run_id, "run_key": cfg.run_key(),
               # how it was made, for the report's header (MLflow has the same as tags)
               "device": _device_name(device), "processes": processes, "git_revision": git_revision(),
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(C.json_dump(summary), path)
    return summary


def _device_name(device: torch.device | None) -> str:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def rank_batches(ds: EncodedDataset, tc: C.TrainConfig, nimg: int, rank: int, batch_rank: int, batch_gpu: int,
                 pin: bool = False) -> Iterator[tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]]:
    """This rank's batches from image `nimg` on, in training order: ((nimg, round), x, labels).

    Everything is a function of (seed, nimg, rank, round), so a resumed run, any prefetch depth and
    any number of processes see the same images with the same augmentation noise."""
    rounds = batch_rank // batch_gpu
    while nimg < tc.duration_nimg:
        idx_all = batch_indices(nimg, tc.batch_size, len(ds), tc.seed)
        for r in range(rounds):
            lo = rank * batch_rank + r * batch_gpu
            x, labels = ds.get(idx_all[lo:lo + batch_gpu], generator=torch.Generator().manual_seed(_seed(tc.seed, 5, nimg, lo)))
            if pin:                                 # page-locked: the copy to the GPU runs asynchronously
                x = x.pin_memory()
                labels = labels.pin_memory() if labels is not None else None
            yield (nimg, r), x, labels
        nimg += tc.batch_size


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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _log_window(logger, window: dict, nimg: int, lr: float, d: Dist) -> None:
    n = max(window["n"], 1)
    dt = time.time() - window["t"]
    imgs = nimg - window["nimg"]
    metrics = {"loss": window["loss"] / n, "weighted_mse": window["weighted_mse"] / n, "lr": lr,
               "images_per_s": imgs / max(dt, 1e-9), "sec_per_kimg": dt / max(imgs, 1) * 1000}
    if d.device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2 ** 30
    else:
        import resource
        metrics["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    logger.log_metrics(metrics, step=nimg)
    window.update(loss=0.0, weighted_mse=0.0, n=0, t=time.time(), nimg=nimg)


def _log_samples(net, ema, cfg, args, run_dir: Path, nimg: int, logger, d: Dist, count: int = 36) -> None:
    """A sample grid from the longest tracked EMA, saved in the run folder and logged to MLflow (a latent
    run's samples decoded by its VAE)."""
    from .data.latents import Decoder
    from .images import save_image_grid
    sampler = cfg.sampler.model_copy(update={"steps": min(cfg.sampler.steps, 18)})
    probe = build_network(cfg, **args).to(d.device)
    probe.load_state_dict(ema.emas[-1])
    labels = None
    if args["label_dim"]:
        labels = torch.nn.functional.one_hot(torch.arange(count) % args["label_dim"], args["label_dim"]).float()
    x = sample_images(probe.eval(), list(range(count)), labels, sampler, device=d.device)
    decoder = Decoder(cfg.data.model_dump(), cfg.data.vae_path, d.device, cfg.data.dataset_dir)
    path = save_image_grid(decoder(x), run_dir / "samples" / f"samples-{nimg:010d}.png", cols=6)
    logger.log_artifact(path, "samples")
