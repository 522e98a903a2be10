"""The features of one evaluation set, computed in shards of finished files (docs/scaling.md, "Evaluation at
scale"): images are generated and turned into features batch by batch (never all in memory), each shard
of `metrics.shard_images` images is written atomically once whole (plain .npz arrays, no pickles), a rerun
reads the shards that exist and computes only the missing ones, and under torchrun shard i belongs to
rank i mod world: every rank samples a disjoint slice of the seeds, rank 0 reads them all.

A shard folder is named by the computation key: a hash of everything the features depend on (the model
and guide files' contents, the sampler record, the decoder, the feature networks, the seeds, the shard
size), so a changed model, sampler or metric never reuses a shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .fid import FIDError
from .io import atomic_write, atomic_write_text

GRID_IMAGES = 64                                  # the sample grid: the set's first images
_DIGESTS: dict = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's contents (cached per process by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def computation_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shard_ranges(num_images: int, shard_images: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_images, num_images)) for lo in range(0, num_images, shard_images)]


def _shard_path(folder: Path, lo: int, hi: int) -> Path:
    return folder / f"shard-{lo:09d}-{hi:09d}.npz"


def _read_shard(path: Path, names: Sequence[str], lo: int, hi: int) -> dict | None:
    """A finished shard's arrays, or None when it is missing, damaged or not of these features."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception:                                 # a damaged file: computed again
        return None
    for n in names:
        f = out.get(f"feat_{n}")
        if f is None or f.ndim != 2 or len(f) != hi - lo or not np.isfinite(f).all():
            return None
    return out


def set_features(folder: str | Path, num_images: int, shard_images: int, batches: Callable[[int, int], Iterator],
                 extract: dict[str, Callable[[np.ndarray], np.ndarray]], rank: int = 0, world: int = 1,
                 progress: bool = False, desc: str = "", barrier: Callable[[], None] | None = None
                 ) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:
    """Features {name: num_images x D float64} of one image set and its first GRID_IMAGES images (rank 0;
    the other ranks get (None, None)). `batches(lo, hi)` yields (seeds, uint8 images) for images lo..hi-1;
    `extract[name](images)` gives that feature network's features of a batch. Shards this rank owns and
    that are not on disk are computed and written; then all ranks meet (`barrier`) and rank 0 reads every
    shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(num_images, shard_images)
    mine = [(lo, hi) for i, (lo, hi) in enumerate(ranges) if i % world == rank]
    todo = [(lo, hi) for lo, hi in mine if _read_shard(_shard_path(folder, lo, hi), list(extract), lo, hi) is None]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        done = num_images - sum(hi - lo for lo, hi in todo) if world == 1 else 0
        bar = tqdm(total=sum(hi - lo for lo, hi in todo) + done, initial=done, unit="img", mininterval=2.0,
                   desc=f"{desc}{' (resumed)' if done else ''}")
    for lo, hi in todo:
        feats: dict[str, list] = {n: [] for n in extract}
        grid = []
        for _, images in batches(lo, hi):
            for n, fn in extract.items():
                feats[n].append(np.asarray(fn(images), dtype=np.float32))
            if lo + sum(len(g) for g in grid) < GRID_IMAGES:
                grid.append(images)
            if bar is not None:
                bar.update(len(images))
        arrays = {f"feat_{n}": np.concatenate(v) for n, v in feats.items()}
        if lo < GRID_IMAGES:                           # only the images the grid shows are kept
            arrays["grid"] = np.concatenate(grid)[:GRID_IMAGES - lo]
        atomic_write(_shard_path(folder, lo, hi), lambda f: np.savez(f, **arrays))
    if bar is not None:
        bar.close()
    if barrier is not None and world > 1:
        barrier()
    if rank != 0:
        return None, None
    out: dict[str, list] = {n: [] for n in extract}
    grid = []
    for lo, hi in ranges:
        z = _read_shard(_shard_path(folder, lo, hi), list(extract), lo, hi)
        if z is None:
            raise FIDError(f"{_shard_path(folder, lo, hi)}: a feature shard is missing or damaged after every rank "
                           f"finished (another process wrote into {folder}?); rerun to compute it again")
        for n in extract:
            out[n].append(z[f"feat_{n}"])
        if "grid" in z:
            grid.append(z["grid"])
    return ({n: np.concatenate(v).astype(np.float64) for n, v in out.items()},
            np.concatenate(grid) if grid else None)


def write_key_file(folder: Path, parts: dict) -> None:
    """What a shard folder holds, in words (never read back to decide anything: the name is the key)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(parts, indent=2, sort_keys=True, default=str), folder / "computation.json")


def eval_ranks(device_choice: str, field: str):
    """(rank, world, device, barrier, reduce) of an evaluation or reference process: one process, or a
    torchrun/srun rank in its process group (gloo on CPUs, NCCL on GPUs, each rank on cuda:LOCAL_RANK).
    reduce(array, op="sum"|"max") joins a float64 array over the ranks."""
    from .devices import pick_device
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, str(pick_device(device_choice, field)), (lambda: None), None
    import torch
    import torch.distributed as dist

    from .devices import init_distributed
    d = init_distributed(device_choice, field=field)

    def reduce(a, op: str = "sum"):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().numpy()
    return d.rank, d.world_size, str(d.device), dist.barrier, reduce
