"""Figures and tables (matplotlib, pandas). Figures are written locally as PNG so they render offline."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_ema_reconstruction(summary: dict, path: str | Path, max_targets: int = 4) -> Path:
    """Target EMA profiles against their reconstruction from the snapshots (one panel per target).

    Short EMAs are hard: their profile is a narrow spike at the end of training that the snapshot
    profiles (all at least as wide as the tracked ones) can only approximate with large,
    alternating-sign coefficients; the figure shows the misfit and the coefficient size.
    """
    from .phema import profile, sigma_rel_to_gamma
    plt = _plt()
    T = summary["target_nimg"]
    snaps = summary["snapshots"]
    t_in = np.array([s["nimg"] for s in snaps], dtype=np.float64)
    g_in = np.array([sigma_rel_to_gamma(s["sigma_rel"]) for s in snaps])
    targets = sorted(summary["targets"], key=lambda t: t["sigma_rel"])
    if len(targets) > max_targets:                       # the shortest, the longest and some between
        idx = np.unique(np.linspace(0, len(targets) - 1, max_targets).round().astype(int))
        targets = [targets[i] for i in idx]
    tau = np.linspace(0, T, 2000)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
    for ax, tgt in zip(axes[0], targets):
        q = profile(tau, T, sigma_rel_to_gamma(tgt["sigma_rel"]))
        X = np.asarray(tgt["coefficients"])
        rec = sum(X[i] * profile(tau, t_in[i], g_in[i]) for i in range(len(X)))
        ax.plot(tau / 1e3, q * T, color="black", lw=2, label="target")
        ax.plot(tau / 1e3, rec * T, color="tab:orange", lw=1.2, ls="--", label="reconstruction")
        ax.set_title(f"sigma_rel {tgt['sigma_rel']:.3f}: error {tgt['rel_error']:.3f}, "
                     f"max|X| {tgt['max_abs_coef']:.1f}", fontsize=9)
        ax.set_xlabel("training time (k images)")
    axes[0][0].set_ylabel("weight x T")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Post-hoc EMA from {len(snaps)} snapshots at T = {T} images", fontsize=10)
    return _save(fig, path)


def save_image_grid(images: np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """N x H x W x C uint8 images -> one PNG grid."""
    from PIL import Image
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def plot_fid_vs_ema(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """FID against EMA length (EDM2 figure 5 style), the best sigma_rel marked. rows: sigma_rel, fid
    and optionally 'label' (one curve per label)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("label", ""), []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["sigma_rel"])
        x, y = [r["sigma_rel"] for r in rs], [r["fid"] for r in rs]
        line, = ax.plot(x, y, marker="o", ms=4, label=label or None)
        b = int(np.argmin(y))
        ax.plot([x[b]], [y[b]], marker="*", ms=14, color=line.get_color(), mec="black")
        ax.annotate(f"{y[b]:.2f} @ {x[b]:.3f}", (x[b], y[b]), textcoords="offset points", xytext=(6, 8), fontsize=8)
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend(fontsize=7)
    return _save(fig, path)
