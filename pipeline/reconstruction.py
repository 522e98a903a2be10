"""Post-hoc EMA reconstruction (method.md 6; EDM2 app. C.3): the weights that turn a run's snapshots
into any EMA length (phema.solve_weights), applied to the snapshot files a group at a time with
reads ahead, so a model of any size streams through a bounded amount of memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io import atomic_write_text, save_safetensors
from .phema import PHEMAError, check_sigma_rel, sigma_rel_to_gamma, solve_weights
from .snapshots import (RECONSTRUCTION_FORMAT, SnapshotInfo, _read_header, _read_snapshot_header, check_consistent,
                        refuse_legacy, scan_snapshots, sources_digest)


def reconstruct(snapshot_dir: str | Path, targets: Sequence[float | tuple[int, float]], target_nimg: int | None = None,
                out_dir: str | Path | None = None, batch_targets: int = 8, progress: bool = False,
                check: bool = True, group: int | None = None) -> dict:
    """Reconstruct EMA profiles `targets` from the snapshots: a sigma_rel (at time `target_nimg`,
    default the last snapshot) or a (nimg, sigma_rel) pair (an earlier training time, e.g. an
    autoguidance guide). A target at time T uses only the snapshots up to T (method.md 6).

    Streams over the snapshots once per batch of targets, whatever their times: memory holds the
    accumulators of one batch (targets x one float32 model) plus a few MiB of read buffers. Writes one
    safetensors model per target (`ema-<T:010d>-<sigma_rel:.3f>.safetensors`) and `reconstruct.json`
    to out_dir, skipping targets already reconstructed from the same snapshots. Returns the summary.
    """
    if not targets:
        raise PHEMAError("no targets given")
    if int(batch_targets) < 1:
        raise PHEMAError(f"batch_targets={batch_targets}: must be >= 1 (targets reconstructed per pass)")
    infos = scan_snapshots(snapshot_dir)
    nimgs = sorted({s.nimg for s in infos})
    T_default = nimgs[-1] if target_nimg is None else int(target_nimg)
    pairs = [(int(t[0]), check_sigma_rel(float(t[1]), f"targets[{i}]")) if isinstance(t, (tuple, list))
             else (T_default, check_sigma_rel(float(t), f"targets[{i}]")) for i, t in enumerate(targets)]
    for T, _ in pairs:
        if T not in nimgs:
            raise PHEMAError(f"target time nimg={T} has no snapshot; snapshots exist at nimg "
                             f"{nimgs[0]} .. {nimgs[-1]} ({len(nimgs)} times)")
    used = [s for s in infos if 0 < s.nimg <= max(T for T, _ in pairs)]
    meta = check_consistent(used) if check else {}

    # One least-squares solve per target time over the snapshots up to it; zero weight after it.
    g_in = [sigma_rel_to_gamma(s.sigma_rel) for s in used]
    X = np.zeros((len(used), len(pairs)))
    rel_error, max_abs_coef, warnings, digests = np.zeros(len(pairs)), np.zeros(len(pairs)), [], {}
    for T in sorted({T for T, _ in pairs}):
        rows = [i for i, s in enumerate(used) if s.nimg <= T]
        cols = [j for j, (t, _) in enumerate(pairs) if t == T]
        sol = solve_weights([used[i].nimg for i in rows], [g_in[i] for i in rows], [T] * len(cols),
                            [sigma_rel_to_gamma(pairs[j][1]) for j in cols])
        X[np.ix_(rows, cols)] = sol.X
        rel_error[cols], max_abs_coef[cols] = sol.rel_error, sol.max_abs_coef
        warnings += sol.warnings
        digests[T] = sources_digest([used[i] for i in rows], T)

    out = Path(out_dir) if out_dir is not None else None
    todo = list(range(len(pairs)))
    skipped = []
    if out is not None:
        from .io import check_writable
        check_writable(out, "output folder")          # before any reading: fail in a second, not after the pass
        out.mkdir(parents=True, exist_ok=True)
        refuse_legacy(out, "output folder")
        todo = [j for j in todo if not _up_to_date(out / reconstruction_name(*pairs[j]), digests[pairs[j][0]])]
        skipped = [j for j in range(len(pairs)) if j not in todo]

    keep = {k: v for k, v in meta.items() if k not in ("format", "nimg", "sigma_rel", "gamma", "dtype")}
    for start in range(0, len(todo), batch_targets):
        batch = todo[start:start + batch_targets]
        acc = stream_combine(used, X[:, batch], progress=progress, group=group)
        for col, j in enumerate(batch):
            T, sigma_rel = pairs[j]
            if out is not None:
                info = {"format": RECONSTRUCTION_FORMAT, "sigma_rel": sigma_rel, "nimg": T,
                        "gamma": sigma_rel_to_gamma(sigma_rel), "sources_digest": digests[T],
                        "coefficients": [float(x) for x, s in zip(X[:, j], used) if s.nimg <= T],
                        "rel_error": float(rel_error[j]), "sources": [s.path.name for s in used if s.nimg <= T],
                        **keep}
                save_safetensors(acc.state(col), info, out / reconstruction_name(T, sigma_rel))
        del acc

    summary = {
        "snapshot_dir": str(snapshot_dir), "target_nimg": T_default, "sources_digest": digests.get(T_default),
        "snapshots": [{"file": s.path.name, "nimg": s.nimg, "sigma_rel": s.sigma_rel} for s in used],
        "targets": [{"sigma_rel": t, "nimg": T, "file": reconstruction_name(T, t), "rel_error": float(rel_error[j]),
                     "max_abs_coef": float(max_abs_coef[j]), "coefficients": X[:, j].tolist(),
                     "skipped": j in skipped} for j, (T, t) in enumerate(pairs)],
        "warnings": warnings,
    }
    if out is not None:
        atomic_write_text(json.dumps(summary, indent=2), out / "reconstruct.json")
    return summary


def reconstruction_name(nimg: int, sigma_rel: float) -> str:
    return f"ema-{int(nimg):010d}-{sigma_rel:.3f}.safetensors"


def _up_to_date(path: Path, digest: str) -> bool:
    """An existing output made from the same snapshots (its header says so; nothing else is read).
    A file that is not a readable reconstruction is rebuilt (and replaced atomically)."""
    if not path.is_file():
        return False
    try:
        _, meta = _read_header(path, "reconstructed model", RECONSTRUCTION_FORMAT)
    except PHEMAError:
        return False
    return meta.get("sources_digest") == digest


def stream_combine(infos: Sequence[SnapshotInfo], X: np.ndarray, progress: bool = False,
                   group: int | None = None, chunk_elems: int = 1 << 16,
                   read_ahead_bytes: int = 8 << 20) -> Combined:
    """sum_i X_ij theta_i for each column j, reading each snapshot once, accumulating in float32.

    Snapshots are combined `group` at a time, chunk by chunk, as one small matrix product
    acc[:, chunk] += X[group, :]^T @ theta[group, chunk]: the accumulators are read and written once
    per group instead of once per snapshot, which is what bounds the speed on a CPU.

    Each chunk is read with pread(2) at the byte range the safetensors header gives (_SnapshotFile),
    with the next `read_ahead_bytes` of every snapshot requested ahead (disk reads overlap the
    arithmetic) and the whole next group prefetched within a memory budget: nothing of a snapshot
    stays in this process. Memory: the accumulators (one float32 model per column) and a
    group x chunk_elems scratch.
    """
    n_snap, n_cols = X.shape
    first = _SnapshotFile(infos[0])                    # its header sets the layout
    group = group or DEFAULT_GROUP
    Xt = torch.from_numpy(np.ascontiguousarray(X.T, dtype=np.float32))
    acc = {k: torch.zeros(n_cols, numel, dtype=torch.float32)                # key -> [columns, numel]
           for k, (_, numel, dtype, _) in first.spans.items() if dtype.is_floating_point}
    other = {k: first.read_whole(k) for k, (_, _, dtype, _) in first.spans.items() if not dtype.is_floating_point}
    shapes = {k: torch.Size(v[3]) for k, v in first.spans.items()}
    buf = torch.empty(group, chunk_elems, dtype=torch.float32)
    raw = torch.empty(group, chunk_elems * 8, dtype=torch.uint8)    # file bytes of a chunk (up to 8 B/elem)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_snap, desc=f"reconstruct {n_cols} target(s)", unit="snapshot")
    budget = _read_ahead_budget()
    for g0 in range(0, n_snap, group):
        g1 = min(g0 + group, n_snap)
        files = [first if i == 0 else _SnapshotFile(infos[i]) for i in range(g0, g1)]
        _prefetch_files(infos[g1:g1 + group], budget)  # the next group comes in while this one computes
        weights = Xt[:, g0:g1].contiguous()
        for k, a in acc.items():
            for f in files:
                f.check(k, a.shape[1])
            ahead = max(chunk_elems, read_ahead_bytes // files[0].element_size(k))
            for c in range(0, a.shape[1], chunk_elems):
                n = min(chunk_elems, a.shape[1] - c)
                if c % ahead < chunk_elems:            # keep one to two windows requested ahead
                    for f in files:
                        f.will_need(k, c if c == 0 else c + ahead, c + 2 * ahead)
                for r, f in enumerate(files):
                    f.read_into(k, c, n, buf[r, :n], raw[r])   # -> float32, in cache
                if not bool(torch.isfinite(buf[:g1 - g0, :n]).all()):   # a NaN would spread into every target
                    r = int((~torch.isfinite(buf[:g1 - g0, :n])).any(dim=1).nonzero()[0])
                    raise PHEMAError(f"snapshot {files[r].path}: tensor {k!r} holds non-finite values (NaN or inf); "
                                     f"refused (a diverged run or a damaged file): remove it, or reconstruct at an "
                                     f"earlier --target-nimg")
                a[:, c:c + n].addmm_(weights, buf[:g1 - g0, :n])
        for f in files:
            f.close()
        if bar is not None:
            bar.update(g1 - g0)
    if bar is not None:
        bar.close()
    return Combined(acc, other, shapes)

DEFAULT_GROUP = 16                                     # snapshots combined at a time


def default_group(info: SnapshotInfo) -> int:
    """Snapshots combined at a time by default (benchmarks report it)."""
    return DEFAULT_GROUP


class _SnapshotFile:
    """One snapshot's tensors, read chunk by chunk with pread(2) at the byte ranges its safetensors
    header gives (no memory map, no page faults, nothing of the file kept in the process)."""

    def __init__(self, info: SnapshotInfo):
        self.path = info.path
        self.spans, _ = _read_snapshot_header(info)    # key -> (byte offset, numel, dtype, shape)
        self.fd = os.open(info.path, os.O_RDONLY)

    def check(self, key: str, numel: int) -> None:
        have = self.spans[key][1] if key in self.spans else None
        if have != numel:
            raise PHEMAError(f"{self.path}: tensor {key!r} is missing or has another size than in the "
                             f"first snapshot (mismatched snapshots)")

    def element_size(self, key: str) -> int:
        return self.spans[key][2].itemsize

    def will_need(self, key: str, lo: int, hi: int) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        off, numel, dtype, _ = self.spans[key]
        lo, hi = min(lo, numel), min(hi, numel)
        if hi > lo:
            os.posix_fadvise(self.fd, off + lo * dtype.itemsize, (hi - lo) * dtype.itemsize,
                             os.POSIX_FADV_WILLNEED)

    def _pread(self, view: memoryview, offset: int, key: str) -> None:
        got = 0
        while got < len(view):                         # pread may return short
            r = os.preadv(self.fd, [view[got:]], offset + got)
            if r == 0:
                raise PHEMAError(f"{self.path}: file ends inside tensor {key!r} (truncated snapshot)")
            got += r

    def read_into(self, key: str, c: int, n: int, out: torch.Tensor, raw: torch.Tensor) -> None:
        off, _, dtype, _ = self.spans[key]
        nbytes = n * dtype.itemsize
        self._pread(memoryview(raw[:nbytes].numpy()), off + c * dtype.itemsize, key)
        out.copy_(raw[:nbytes].view(dtype))

    def read_whole(self, key: str) -> torch.Tensor:
        off, numel, dtype, shape = self.spans[key]
        raw = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        self._pread(memoryview(raw.numpy()), off, key)
        return raw.view(dtype).reshape(shape).clone()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None


@dataclass
class Combined:
    """The accumulators of stream_combine: key -> [columns, numel] float32, plus integer buffers."""
    acc: dict
    other: dict
    shapes: dict

    def state(self, j: int) -> dict:
        """Column j as a plain state dict of its own tensors (one model: saving it holds one extra)."""
        return {k: self.other[k] if k in self.other else self.acc[k][j].view(shape).clone()
                for k, shape in self.shapes.items()}


def _prefetch_files(infos: Sequence[SnapshotInfo], budget: int) -> None:
    """Ask the kernel to start reading whole files into the page cache (returns at once), as many as
    fit in `budget` bytes: more than the page cache holds would be read twice."""
    if not hasattr(os, "posix_fadvise"):
        return
    for info in infos:
        size = info.path.stat().st_size
        if size > budget:
            return
        budget -= size
        fd = os.open(info.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _read_ahead_budget() -> int:
    """A quarter of the available memory (Linux's MemAvailable), else 1 GiB."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 4
    except (OSError, StopIteration, ValueError):
        return 1 << 30

