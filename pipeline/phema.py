"""Power-function EMA (method.md 6; EDM2 sec. 3.1, app. C): the mathematics, and the tracking during
training that writes the snapshots.

Training tracks a few EMA profiles and writes them as low-precision snapshots at a fixed interval in
images. Afterwards any EMA length sigma_rel can be reconstructed as a linear combination of the
snapshots (the weights: solve_weights here; applying them to the files: reconstruction.py; reading
the files: snapshots.py): EMA length costs no retraining.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import SIGMA_REL_MAX
from .errors import PipelineError
from .io import save_safetensors

SNAPSHOT_FORMAT = "edm2-pipeline/phema-snapshot/1"

SNAPSHOT_RE = re.compile(r"^phema-(\d{10})-(\d\.\d{3})\.safetensors$")


class PHEMAError(PipelineError, ValueError):
    """Bad input to post-hoc EMA: the message says what and where; nothing was written."""


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
    from .provenance import git_revision
    return {"config": cfg.to_dict(), "net_args": net_args or {}, "model_key": cfg.run_key(),
            "snapshot_nimg": cfg.ema.snapshot_nimg, "git": git_revision()}


def snapshot_name(nimg: int, sigma_rel: float) -> str:
    return f"phema-{int(nimg):010d}-{sigma_rel:.3f}.safetensors"


def _to_disk(v: torch.Tensor, dtype: str) -> torch.Tensor:
    return v.to("cpu", getattr(torch, dtype) if v.is_floating_point() else v.dtype, copy=True)


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

