"""A training run's files of state (method.md 3): checkpoints written atomically and read back checked
(a refused one is set aside, never silently replaced by a fresh start), and train_summary.json
rebuilt from the run's whole metrics history.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from . import config as C

from .errors import TrainingError
from .io import atomic_torch_save, atomic_write_text, load_torch_file, read_jsonl

CHECKPOINT_FORMAT = "edm2-pipeline/checkpoint/1"

CHECKPOINT_FIELDS = ("nimg", "net", "optimizer", "ema", "run_key", "config")


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
            have, want = _keyed(ckpt["config"]), cfg.key_flat()
            shown = "; ".join(f"{k}: checkpoint {have.get(k)!r}, config {want[k]!r}" for k in sorted(want)
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


def _keyed(stored: dict) -> dict:
    """A stored config's run-key values, dotted (read as today's schema reads it; raw if it no longer validates)."""
    try:
        return C.resolve({k: v for k, v in stored.items() if k != "preset"}, where=None).key_flat()
    except C.ConfigError:
        return C.flatten(stored)


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

