"""Power-function EMA tracking and post-hoc EMA reconstruction (method.md 6; EDM2 sec. 3.1, app. C).

Training tracks a few EMA profiles and writes them as low-precision snapshots at a fixed interval in
images. Afterwards any EMA length sigma_rel can be reconstructed as a linear combination of the
snapshots: EMA length costs no retraining.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import SIGMA_REL_MAX
from .io import atomic_write_text, load_safetensors, read_safetensors_header, save_safetensors
from .errors import PipelineError

SNAPSHOT_FORMAT = "edm2-pipeline/phema-snapshot/1"
RECONSTRUCTION_FORMAT = "edm2-pipeline/phema-reconstruction/1"
SNAPSHOT_RE = re.compile(r"^phema-(\d{10})-(\d\.\d{3})\.safetensors$")
LEGACY_RE = re.compile(r"^(phema|ema)-\d{10}-\d\.\d{3}\.pt$")     # pickled files of earlier versions
CONVERT_HINT = "python -m pipeline convert --trust {path}"


class PHEMAError(PipelineError, ValueError):
    """Bad input to post-hoc EMA: the message says what and where; nothing was written."""


# ----------------------------------------------------------------------------------------------
# sigma_rel <-> gamma (eq. 123).

def check_sigma_rel(sigma_rel: float, what: str = "sigma_rel") -> float:
    if not (0.0 < sigma_rel < SIGMA_REL_MAX):
        raise PHEMAError(f"{what}={sigma_rel}: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f})")
    return float(sigma_rel)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma = largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0."""
    check_sigma_rel(sigma_rel)
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-8].real.max())


# ----------------------------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """Tracks one power-function EMA per sigma_rel of a model's parameters (float32 copies).

    `update(net, nimg, batch_nimg)` after each optimizer step (or every k steps with batch_nimg the
    images since the last update): beta = (1 - dt / t)^(gamma + 1), ema = beta ema + (1 - beta) theta.
    Counting in images makes the profile right for any batch size and update interval (method.md 6).
    """

    def __init__(self, net: torch.nn.Module, stds: Sequence[float]):
        self.stds = [check_sigma_rel(s, f"ema.stds[{i}]") for i, s in enumerate(stds)]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.stds]
        self.emas = [{k: v.detach().to(torch.float32).clone() for k, v in net.state_dict().items()}
                     for _ in self.stds]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, nimg: int, batch_nimg: int) -> None:
        if nimg <= 0 or batch_nimg <= 0 or batch_nimg > nimg:
            raise ValueError(f"EMA update needs 0 < batch_nimg <= nimg (got batch_nimg={batch_nimg}, nimg={nimg})")
        state = net.state_dict()
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1.0 - batch_nimg / nimg) ** (gamma + 1)
            for k, v in state.items():
                if v.is_floating_point():
                    ema[k].lerp_(v.detach().to(torch.float32), 1.0 - beta)
                else:
                    ema[k].copy_(v)

    def state_dict(self) -> dict:
        return {"stds": self.stds, "emas": self.emas}

    def load_state_dict(self, state: dict) -> None:
        if [round(s, 6) for s in state["stds"]] != [round(s, 6) for s in self.stds]:
            raise PHEMAError(f"checkpoint tracks sigma_rel {state['stds']}, config asks for {self.stds}")
        self.emas = [{k: v.to(torch.float32).clone() for k, v in e.items()} for e in state["emas"]]

    def snapshot_payloads(self, snapshot_dir: str | Path, nimg: int, meta: dict | None = None,
                          dtype: str = "float16") -> list[tuple[Path, dict, dict]]:
        """(path, tensors, metadata) per profile, with tensors copied to the CPU in the disk dtype: the
        copies no longer change with training, so they may be written later (train.async_snapshots)."""
        out = []
        for std, gamma, ema in zip(self.stds, self.gammas, self.emas):
            info = {"format": SNAPSHOT_FORMAT, "nimg": int(nimg), "sigma_rel": std, "gamma": gamma, "dtype": dtype,
                    **(meta or {})}
            out.append((Path(snapshot_dir) / snapshot_name(nimg, std), {k: _to_disk(v, dtype) for k, v in ema.items()},
                        info))
        return out

    def save_snapshots(self, snapshot_dir: str | Path, nimg: int, meta: dict | None = None,
                       dtype: str = "float16") -> list[Path]:
        """One safetensors file per profile, `phema-<nimg:010d>-<sigma_rel:.3f>.safetensors`, atomically."""
        return write_snapshots(self.snapshot_payloads(snapshot_dir, nimg, meta, dtype))


def write_snapshots(items: Sequence[tuple[Path, dict, dict]]) -> list[Path]:
    return [save_safetensors(tensors, info, path) for path, tensors, info in items]


def snapshot_meta(cfg, net_args: dict | None = None) -> dict:
    """What every snapshot carries: the resolved config, the network's build arguments, the run key
    (snapshots with different keys never mix) and the snapshot interval (to detect missing files)."""
    from .tracking import git_revision
    return {"config": cfg.to_dict(), "net_args": net_args or {}, "model_key": cfg.run_key(),
            "snapshot_nimg": cfg.ema.snapshot_nimg, "git": git_revision()}


def snapshot_name(nimg: int, sigma_rel: float) -> str:
    return f"phema-{int(nimg):010d}-{sigma_rel:.3f}.safetensors"


def _to_disk(v: torch.Tensor, dtype: str) -> torch.Tensor:
    return v.to("cpu", getattr(torch, dtype) if v.is_floating_point() else v.dtype, copy=True)


# ----------------------------------------------------------------------------------------------
# Profiles and their inner products.

def profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """p_t(tau) = (gamma + 1) / t * (tau / t)^gamma on [0, t], 0 after."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.where((tau >= 0) & (tau <= t), (gamma + 1) / t * np.clip(tau / t, 0, None) ** gamma, 0.0)


def p_dot_p(t_a, g_a, t_b, g_b):
    """<p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) * r (method.md 6)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio = t_a / t_b
    r = np.where(t_a < t_b, ratio ** g_b, (1.0 / ratio) ** g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * r


@dataclass
class Solution:
    """Coefficients X (snapshots x targets), columns summing to 1, and per-target diagnostics."""
    X: np.ndarray
    rel_error: np.ndarray           # ||sum_i X_ij p_i - q_j|| / ||q_j||
    max_abs_coef: np.ndarray
    warnings: list[str] = field(default_factory=list)


def solve_weights(t_in: Sequence[float], g_in: Sequence[float], t_out: Sequence[float],
                  g_out: Sequence[float]) -> Solution:
    """X = solve(A, B) with A_ik = <p_i, p_k>, B_ij = <p_i, q_j>; columns scaled to sum to 1."""
    t_in, g_in = np.asarray(t_in, np.float64), np.asarray(g_in, np.float64)
    t_out, g_out = np.asarray(t_out, np.float64), np.asarray(g_out, np.float64)
    A = p_dot_p(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    B = p_dot_p(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    try:
        X = np.linalg.solve(A, B)
    except np.linalg.LinAlgError:                    # duplicate profiles: least squares instead
        X = np.linalg.lstsq(A, B, rcond=None)[0]
    X = X / X.sum(axis=0, keepdims=True)
    qq = p_dot_p(t_out, g_out, t_out, g_out)
    err2 = np.einsum("ij,ik,kj->j", X, A, X) - 2 * np.einsum("ij,ij->j", X, B) + qq
    rel = np.sqrt(np.clip(err2, 0, None) / qq)
    max_abs = np.abs(X).max(axis=0)
    warnings = []
    for j in range(X.shape[1]):
        if rel[j] > 0.05 or max_abs[j] > 50:
            hint = ("shorter than the tracked profiles: needs denser snapshots" if g_out[j] > g_in.max()
                    else "longer than the tracked profiles: only approximated by their sum")
            warnings.append(f"target sigma_rel={gamma_to_sigma_rel(g_out[j]):.3f} is ill-conditioned: profile error "
                            f"{rel[j]:.3f}, largest |coefficient| {max_abs[j]:.1f} ({hint})")
    return Solution(X, rel, max_abs, warnings)


# ----------------------------------------------------------------------------------------------
# Snapshot directories.

@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    nimg: int
    sigma_rel: float
    size: int


def scan_snapshots(snapshot_dir: str | Path) -> list[SnapshotInfo]:
    """Snapshots in a directory, ordered by (nimg, sigma_rel); checks that the set is complete."""
    d = Path(snapshot_dir)
    if not d.is_dir():
        raise PHEMAError(f"snapshot directory {d} does not exist")
    refuse_legacy(d, "snapshot directory")
    infos = []
    for p in sorted(d.iterdir()):
        m = SNAPSHOT_RE.match(p.name)
        if m:
            infos.append(SnapshotInfo(p, int(m.group(1)), float(m.group(2)), p.stat().st_size))
    if not infos:
        raise PHEMAError(f"snapshot directory {d} holds no snapshots (phema-<nimg>-<sigma_rel>.safetensors)")
    infos.sort(key=lambda s: (s.nimg, s.sigma_rel))
    stds = sorted({s.sigma_rel for s in infos})
    by_nimg: dict[int, set] = {}
    for s in infos:
        by_nimg.setdefault(s.nimg, set()).add(s.sigma_rel)
    for nimg, have in sorted(by_nimg.items()):
        missing = [f"{x:.3f}" for x in stds if x not in have]
        if missing:
            raise PHEMAError(f"{d}: snapshot(s) missing at nimg={nimg} for sigma_rel {', '.join(missing)} "
                             f"(expected {snapshot_name(nimg, float(missing[0]))})")
    return infos


def refuse_legacy(folder: Path, what: str) -> None:
    """Pickled `.pt` snapshots and models of earlier versions can run code when loaded: never read
    them; name the conversion command (which needs an explicit --trust)."""
    old = sorted(p.name for p in folder.iterdir() if LEGACY_RE.match(p.name))
    if old:
        raise PHEMAError(f"{what} {folder} holds {len(old)} pickled .pt file(s) of an earlier version (e.g. {old[0]}), "
                         f"which are not loaded because a pickle can run code; if you trust where they come from, "
                         f"convert them with `{CONVERT_HINT.format(path=folder)}`")


def _read_header(path: Path, what: str, fmt: str) -> tuple[dict, dict]:
    spans, meta = read_safetensors_header(path, what, PHEMAError)
    if meta.get("format") != fmt:
        raise PHEMAError(f"{path}: not a {what} of this pipeline (format {meta.get('format')!r})")
    check_header_values(meta, path)
    floats = {k: v for k, v in spans.items() if not v[2].is_floating_point}
    if floats:
        k, (_, _, dtype, _) = next(iter(floats.items()))
        raise PHEMAError(f"{path}: tensor {k!r} is stored as {str(dtype).replace('torch.', '')}; a {what} holds "
                         f"floating-point tensors only (a relabelled or damaged header)")
    declared = meta.get("dtype")
    if declared is not None:
        wrong = [k for k, v in spans.items() if str(v[2]) != f"torch.{declared}"]
        if wrong:
            raise PHEMAError(f"{path}: tensor {wrong[0]!r} is stored as {str(spans[wrong[0]][2]).replace('torch.', '')}, "
                             f"the header says {declared}")
    return spans, meta


def check_header_values(meta: dict, path) -> None:
    """A header's own values typed and in range: nimg a whole number > 0, sigma_rel a number in
    (0, sqrt(1/12)), config and net_args mappings (what they describe: network_of_header)."""
    nimg, sigma_rel = meta.get("nimg"), meta.get("sigma_rel")
    if isinstance(nimg, bool) or not isinstance(nimg, int) or nimg <= 0:
        raise PHEMAError(f"{path}: header nimg={nimg!r:.40} is not a whole number of images > 0")
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise PHEMAError(f"{path}: header sigma_rel={sigma_rel!r:.40} is not a number in (0, {SIGMA_REL_MAX:.4f})")
    for k in ("config", "net_args"):
        if k in meta and not isinstance(meta[k], dict):
            raise PHEMAError(f"{path}: header {k} is a {type(meta[k]).__name__}, not a mapping (a damaged header)")


def _read_snapshot_header(info: SnapshotInfo) -> tuple[dict, dict]:
    spans, meta = _read_header(info.path, "post-hoc EMA snapshot", SNAPSHOT_FORMAT)
    if meta.get("nimg") != info.nimg or abs(float(meta.get("sigma_rel", -1)) - info.sigma_rel) > 5e-4:
        raise PHEMAError(f"{info.path}: file name says nimg={info.nimg} sigma_rel={info.sigma_rel}, "
                         f"contents say nimg={meta.get('nimg')} sigma_rel={meta.get('sigma_rel')}")
    return spans, meta


NET_ARG_RANGES = {"img_resolution": 1, "img_channels": 1, "label_dim": 0}   # build argument -> its minimum


def network_of_header(meta: dict, path, error: type[Exception] = PHEMAError):
    """(config, build arguments, {tensor: (shape, dtype)}) of the network a header describes, sized and
    checked without allocating it (networks.network_shapes); a header that describes none is refused."""
    from .config import ConfigError, resolve
    from .networks import NetworkSizeError, network_shapes
    args, raw = meta.get("net_args"), meta.get("config")
    if not isinstance(args, dict) or not args:
        raise error(f"{path}: carries no network build arguments (not written by the training stage)")
    if not isinstance(raw, dict):
        raise error(f"{path}: its header's config is not a mapping ({str(raw)[:40]!r}): not a model of this "
                    f"pipeline, or a damaged header")
    if set(args) != set(NET_ARG_RANGES) or any(isinstance(v, bool) or not isinstance(v, int) or v < NET_ARG_RANGES[k]
                                               for k, v in args.items()):
        raise error(f"{path}: its header's net_args {str(args)[:120]} are not whole numbers for "
                    f"{', '.join(NET_ARG_RANGES)}")
    try:
        cfg = resolve({k: v for k, v in raw.items() if k != "preset"})
        shapes = network_shapes(cfg, **args)
    except ConfigError as err:
        raise error(f"{path}: its header's config is invalid ({str(err).splitlines()[0]})") from None
    except NetworkSizeError as err:
        raise error(f"{path}: {err}") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise error(f"{path}: its header's net_args {args} do not build a network ({str(err)[:120]})") from None
    return cfg, args, shapes


def check_consistent(infos: Sequence[SnapshotInfo]) -> dict:
    """All snapshots must come from one run configuration, and hold the network their header describes;
    returns the first one's metadata. Reads only each file's safetensors header (no tensor data)."""
    from .networks import check_state
    first_meta, first_key, shapes, first_path = None, None, None, None
    for info in infos:
        spans, meta = _read_snapshot_header(info)
        key = meta.get("model_key")
        layout = {k: (tuple(v[3]), v[2]) for k, v in spans.items()}
        if first_meta is None:
            first_meta, first_key, shapes, first_path = meta, key, layout, info.path
            if meta.get("net_args"):           # what the header claims, against what the file holds
                check_state(network_of_header(meta, info.path)[2], layout, str(info.path), PHEMAError)
        elif key != first_key:
            raise PHEMAError(f"mixed configurations: {info.path.name} has model_key {key}, "
                             f"{first_path.name} has {first_key}; keep one run's snapshots per directory")
        elif layout != shapes:
            raise PHEMAError(f"mixed configurations: {info.path.name} and {first_path.name} hold "
                             f"different parameter shapes or types")
    interval = (first_meta or {}).get("snapshot_nimg")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0):
        raise PHEMAError(f"{first_path}: header snapshot_nimg={interval!r:.40} is not a whole number > 0")
    if interval:
        nimgs = sorted({s.nimg for s in infos})
        expected = list(range(interval, nimgs[-1] + 1, interval))
        missing = [n for n in expected if n not in nimgs]
        if missing:
            raise PHEMAError(f"snapshots missing for nimg {', '.join(map(str, missing[:5]))}"
                             f"{' ...' if len(missing) > 5 else ''} (interval {interval} images)")
    return first_meta or {}


def sources_digest(infos: Sequence[SnapshotInfo], target_nimg: int) -> str:
    h = hashlib.sha256(f"T={target_nimg}".encode())
    for s in infos:
        h.update(f"{s.path.name}:{s.size}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reconstruction.

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


def check_reconstruction(path: str | Path) -> dict:
    """A reconstructed model's metadata from its header alone (cheap: check inputs before compute)."""
    path = Path(path)
    if LEGACY_RE.match(path.name):
        raise PHEMAError(f"{path} is a pickled .pt model of an earlier version, not loaded because a pickle can run "
                         f"code; if you trust it, convert it with `{CONVERT_HINT.format(path=path)}`")
    return _read_header(path, "reconstructed model", RECONSTRUCTION_FORMAT)[1]


def load_reconstruction(path: str | Path) -> dict:
    """A reconstructed model: {'state': tensors, **metadata}; anything but this pipeline's
    safetensors reconstruction (a pickled .pt included) is refused without being loaded, and so is
    one whose tensors are not the network its header describes (checked before reading them)."""
    return load_checked_reconstruction(path)[0]


def load_checked_reconstruction(path: str | Path, error: type[Exception] = PHEMAError):
    """(load_reconstruction's dict, (config, build arguments) of the network its header describes, or None
    for a header without net_args): the header's network is sized and checked against the tensors once."""
    from .networks import check_state
    meta = check_reconstruction(path)
    network = None
    if meta.get("net_args"):
        spans, _ = read_safetensors_header(path, "reconstructed model", PHEMAError)
        cfg, args, shapes = network_of_header(meta, path, error)
        check_state(shapes, {k: (v[3], v[2]) for k, v in spans.items()}, str(path), PHEMAError)
        network = (cfg, args)
    state, meta = load_safetensors(path, "reconstructed model", PHEMAError)
    return {**meta, "state": state}, network


def convert_legacy(paths: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Pickled `.pt` snapshots and reconstructions of earlier versions -> safetensors beside them.

    Read with torch.load(weights_only=True) (a file holding other objects is still refused); each
    original is renamed to `<name>.orig`, so the folder is accepted afterwards."""
    from .io import files_in, load_torch_file
    files = files_in(paths, lambda f: bool(LEGACY_RE.match(f.name)), PHEMAError,
                     "pickled snapshots or models (phema-*.pt, ema-*.pt)")
    done = []
    for src in files:
        data = load_torch_file(src, "pickled file", PHEMAError)
        if not isinstance(data, dict) or data.get("format") not in (SNAPSHOT_FORMAT, RECONSTRUCTION_FORMAT) \
                or not isinstance(data.get("state"), dict):
            raise PHEMAError(f"{src}: not a snapshot or reconstructed model of this pipeline")
        state = data.pop("state")
        dst = src.with_suffix(".safetensors")
        save_safetensors(state, data, dst)
        os.replace(src, src.with_name(src.name + ".orig"))
        done.append((src, dst))
    return done
