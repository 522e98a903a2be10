"""The figures of the reports (matplotlib, Agg: written as PNG so they render offline): post-hoc EMA
profiles, FID against EMA length, the guidance grid, training curves, a sweep's best FID against a
swept value and its trial timeline.
"""
from __future__ import annotations
from pathlib import Path
from typing import Sequence
import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path, bbox: bool = False) -> Path:
    """bbox: crop to the drawn content (figures with a shared colour bar or a raised title, which
    tight_layout cannot arrange)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bbox:
        fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.25)   # a margin: nothing touches the frame
    else:
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
    snaps = summary["snapshots"]
    t_in = np.array([s["nimg"] for s in snaps], dtype=np.float64)
    g_in = np.array([sigma_rel_to_gamma(s["sigma_rel"]) for s in snaps])
    targets = sorted(summary["targets"], key=lambda t: (-t.get("nimg", summary["target_nimg"]), t["sigma_rel"]))
    if len(targets) > max_targets:                       # the shortest, the longest and some between
        idx = np.unique(np.linspace(0, len(targets) - 1, max_targets).round().astype(int))
        targets = [targets[i] for i in idx]
    T_last = max(t.get("nimg", summary["target_nimg"]) for t in targets)
    tau = np.linspace(0, T_last, 2000)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
    for ax, tgt in zip(axes[0], targets):
        T = tgt.get("nimg", summary["target_nimg"])
        q = profile(tau, T, sigma_rel_to_gamma(tgt["sigma_rel"]))
        X = np.asarray(tgt["coefficients"])
        rec = sum(X[i] * profile(tau, t_in[i], g_in[i]) for i in range(len(X)))
        ax.plot(tau / 1e3, q * T, color="black", lw=2, label="target")
        ax.plot(tau / 1e3, rec * T, color="tab:orange", lw=1.2, ls="--", label="reconstruction")
        ax.set_title(f"sigma_rel {tgt['sigma_rel']:.3f}{f' at {T} img' if T != T_last else ''}: error {tgt['rel_error']:.3f}, "
                     f"max|X| {tgt['max_abs_coef']:.1f}", fontsize=9)
        ax.set_xlabel("training time (k images)")
    axes[0][0].set_ylabel("weight x T")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Post-hoc EMA from {len(snaps)} snapshots at T = {T_last} images", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, bbox=True)                  # long panel titles: crop to what is drawn, never cut


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
        if all(r.get("fid_ci95") for r in rs):          # 95 % bootstrap interval as error bars
            err = np.array([[r["fid"] - r["fid_ci95"][0], r["fid_ci95"][1] - r["fid"]] for r in rs]).T.clip(0)
            handle = ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=label or None)
            line = handle.lines[0]
        else:
            line, = ax.plot(x, y, marker="o", ms=4, label=label or None)
            handle = line
        b = int(np.argmin(y))
        ax.plot([x[b]], [y[b]], marker="*", ms=14, color=line.get_color(), mec="black")
        if len(groups) == 1:                  # one curve: the best beside its star
            ax.annotate(f"{y[b]:.2f} @ {x[b]:.3f}", (x[b], y[b]), textcoords="offset points", xytext=(6, 8), fontsize=8)
        else:                                 # several: in the legend, where labels cannot overlap
            handle.set_label(f"{label}: best {y[b]:.1f} @ {x[b]:.3f}")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0) if len(groups) > 1 \
            else ax.legend(fontsize=7)
    if len(groups) > 1:
        fig.set_size_inches(8.5, 3.8)
    return _save(fig, path)


def curve_label(r: dict) -> str:
    """One FID-vs-EMA curve per (guide, w, steps) of a post-hoc grid."""
    parts = []
    if r["sampler"]["guidance"] != 1.0 and r.get("guide", "none") != "none":
        parts.append(f"w {r['sampler']['guidance']:g}, {r['guide']}")
    if (r.get("extra") or {}).get("steps_axis"):
        parts.append(f"{r['sampler']['steps']} steps")
    if (r.get("extra") or {}).get("nimg_axis"):                  # EDM2's figure: one curve per training length
        parts.append(f"{r['nimg']:,} images")
    return "; ".join(parts) or "unguided"


def plot_guidance_grid(records: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """FID over EMA length x guidance weight, one heat map per guide (small multiples, shared colour
    scale; each cell FID +- SE, the best starred); w = 1 is the unguided model in every panel."""
    plt = _plt()
    recs = [r for r in records if r.get("sigma_rel") is not None]
    guides = sorted({r.get("guide", "none") for r in recs if r.get("guide", "none") != "none"})
    if not guides:
        return None
    unguided = {r["sigma_rel"]: r for r in recs if r["sampler"]["guidance"] == 1.0 or r.get("guide", "none") == "none"}
    sig = sorted({r["sigma_rel"] for r in recs})
    ws = sorted({r["sampler"]["guidance"] for r in recs} | {1.0})
    lo, hi = min(r["fid"] for r in recs), max(r["fid"] for r in recs)
    best = min(recs, key=lambda r: r["fid"])
    fig, axes = plt.subplots(1, len(guides), figsize=(max(3.2 * len(guides), 5), 0.5 * len(ws) + 2.2), squeeze=False)
    for ax, g in zip(axes[0], guides):
        cell = {}
        for r in recs:
            if r.get("guide") == g:
                cell[(r["sigma_rel"], r["sampler"]["guidance"])] = r
        for s, r in unguided.items():
            cell.setdefault((s, 1.0), r)
        Z = np.full((len(ws), len(sig)), np.nan)
        for (s, w), r in cell.items():
            Z[ws.index(w), sig.index(s)] = r["fid"]
        im = ax.imshow(Z, origin="lower", aspect="auto", cmap="viridis_r", vmin=lo, vmax=hi)
        for (s, w), r in cell.items():
            star = " *" if r["fid"] == best["fid"] else ""
            se = f"\n+-{r['fid_se']:.1f}" if r.get("fid_se") is not None else ""
            ax.text(sig.index(s), ws.index(w), f"{r['fid']:.1f}{star}{se}", ha="center", va="center", fontsize=7,
                    color="white" if r["fid"] > (lo + hi) / 2 else "black")
        ax.set_xticks(range(len(sig)), [f"{s:.3f}" for s in sig], rotation=30)
        ax.set_yticks(range(len(ws)), [f"{w:g}" for w in ws])
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_title(f"guide: {g}", fontsize=9)
    axes[0][0].set_ylabel("guidance weight w (1 = unguided)")
    fig.colorbar(im, ax=axes[0].tolist(), label="FID (lower is better)", shrink=0.9)
    fig.suptitle(title or "FID over EMA length x guidance, per guide (* the best)", fontsize=10, y=1.06)
    return _save(fig, path, bbox=True)


def plot_training_curves(rows: Sequence[dict], path: str | Path) -> Path | None:
    """Loss, weighted MSE and learning rate against images seen."""
    if not rows:
        return None
    plt = _plt()
    x = np.array([r["step"] for r in rows], dtype=np.float64) / 1e3
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    mk = {"marker": "o", "markersize": 4} if len(rows) <= 30 else {}     # few points: each one visible
    a.plot(x, [r.get("loss") for r in rows], label="loss (with u(sigma))", **mk)
    a.plot(x, [r.get("weighted_mse") for r in rows], label="weighted MSE", **mk)
    if len(rows) == 1:                                   # a line needs two points: say why there is none
        for ax in (a, b):
            ax.text(0.5, 0.05, "one logged point (train.status_nimg >= the images trained)", transform=ax.transAxes,
                    ha="center", fontsize=7, color="#555")
    a.set_xlabel("k images seen")
    a.set_title("training loss", fontsize=9)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.plot(x, [r.get("lr") for r in rows], color="tab:green", **mk)
    b.set_xlabel("k images seen")
    b.set_title("learning rate", fontsize=9)
    b.grid(alpha=0.3)
    return _save(fig, path)


def plot_best_vs_param(best, keys: Sequence[str], path: str | Path, name: str = "", stopped=None,
                       ranges: dict | None = None) -> Path:
    """Best FID of each trial against each swept parameter (one panel per parameter); winner starred.
    `stopped`: trials without a FID (stopped early by a scheduler, failed), drawn in their own row of
    panels against the loss they were ranked by (never on the FID axis); `ranges`: the searched
    interval of a numeric axis, drawn as the panel's extent (shaded), not just the span of the values."""
    import pandas as pd
    plt = _plt()
    stopped = stopped if stopped is not None and len(stopped) else None
    nrows = 2 if stopped is not None else 1
    fig, axes = plt.subplots(nrows, len(keys), figsize=(max(4 * len(keys), 6), 3.4 * nrows), squeeze=False)
    w = best["fid"].idxmin()
    ranges = ranges or {}
    for col, key in enumerate(keys):
        ax = axes[0][col]
        # A trial without a value for the axis (interrupted before it recorded one) is not drawn on it.
        raw = best[key] if key in best else pd.Series([None] * len(best), index=best.index)
        raw_s = (stopped[key] if key in stopped else pd.Series([None] * len(stopped), index=stopped.index)) \
            if stopped is not None else None
        x = pd.to_numeric(raw, errors="coerce")
        xs = pd.to_numeric(raw_s, errors="coerce") if raw_s is not None else None
        categorical = bool((raw.notna() & x.isna()).any()) or \
            (xs is not None and bool((raw_s.notna() & xs.isna()).any()))
        if categorical:                          # a text-valued axis (e.g. loss.noise): one column per value
            text = lambda col: col.map(lambda v: None if pd.isna(v) else str(v))
            values = [v for v in list(text(raw)) + (list(text(raw_s)) if raw_s is not None else []) if v is not None]
            cats = sorted(set(values) | {str(v) for v in ranges.get(key, ())})
            index = {c: float(i) for i, c in enumerate(cats)}
            x = text(raw).map(index).astype(float)
            if raw_s is not None:
                xs = text(raw_s).map(index).astype(float)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        if {"fid_lo", "fid_hi"} <= set(best.columns):      # 95 % interval of each trial's best FID
            err = np.array([best["fid"] - best["fid_lo"], best["fid_hi"] - best["fid"]]).clip(0)
            ax.errorbar(x, best["fid"], yerr=err, fmt="o", color="tab:blue", capsize=3)
        else:
            ax.scatter(x, best["fid"], color="tab:blue")
        ax.scatter([x[w]], [best["fid"][w]], marker="*", s=200, color="gold", edgecolor="black", zorder=3)
        lo_hi = ranges.get(key) if not categorical else None
        seen = [*x.dropna(), *(lo_hi or ()), *(xs.dropna() if xs is not None else ())] or [0.0]
        lo, hi = min(seen), max(seen)
        if not categorical and lo > 0 and hi / lo > 20:
            ax.set_xscale("log")
        if lo_hi and not categorical:            # the searched range, not only the values drawn
            ax.axvspan(lo_hi[0], lo_hi[1], color="tab:blue", alpha=0.06, lw=0)
            pad = (hi / lo) ** 0.05 if ax.get_xscale() == "log" else None
            ax.set_xlim(*(lo / pad, hi * pad) if pad else (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)))
        ax.tick_params(axis="x", labelrotation=30)         # long numbers must not run into each other
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if stopped is not None:                  # no FID: their own panel, with the loss they were ranked by
            _stopped_panel(axes[1][col], ax, stopped, xs, key, categorical)
    axes[0][0].set_ylabel("best FID over EMA lengths")
    import textwrap                              # the title within the figure's width, never clipped
    title = (f"sweep {name}: best FID per trial (shaded: the searched range)"
             + ("; below: trials without a FID" if stopped is not None else ""))
    fig.suptitle("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 11))), fontsize=10)
    fig.tight_layout()
    return _save(fig, path, bbox=True)


def _stopped_panel(ax, above, stopped, xs, key: str, categorical: bool) -> None:
    """Trials stopped early (or failed) against the loss at their last report (val_loss when they had
    one, else the training loss), on the same x axis as the FID panel above."""
    import pandas as pd
    metric = "val_loss" if "val_loss" in stopped and stopped["val_loss"].notna().any() else "final_loss"
    y = pd.to_numeric(stopped[metric], errors="coerce") if metric in stopped else pd.Series([np.nan] * len(stopped))
    ax.scatter(xs, y.fillna(np.nanmin(y) if y.notna().any() else 0), marker="x", color="tab:red",
               label=f"stopped early / failed ({len(stopped)})")
    ax.set_xscale(above.get_xscale())
    ax.set_xlim(above.get_xlim())
    if categorical:
        ax.set_xticks(above.get_xticks(), [tk.get_text() for tk in above.get_xticklabels()])
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} at the stop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_trial_timeline(spans, max_concurrent: int, path: str | Path, name: str = "") -> Path:
    """One bar per trial from its start to its end (its last report when it has no end), coloured by
    status, and the number of trials running over time against max_concurrent: an asynchronous sweep
    keeps max_concurrent trials running while trials remain."""
    import pandas as pd
    plt = _plt()
    spans = spans[spans["start"].notna()].copy()
    t0 = spans["start"].min()
    spans["s"] = spans["start"] - t0
    spans["e"] = pd.to_numeric(spans["end"], errors="coerce").fillna(spans["start"]) - t0
    spans = spans.sort_values("s").reset_index(drop=True)
    colors = {"finished": "tab:blue", "early-stopped": "tab:orange", "error": "tab:red", "interrupted": "tab:gray"}
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 2 + 0.18 * len(spans) + 1.6), sharex=True,
                                 gridspec_kw={"height_ratios": [max(len(spans), 4), 4]})
    for i, r in spans.iterrows():
        ax.barh(i, max(r["e"] - r["s"], 0.5), left=r["s"], color=colors.get(r["status"], "tab:gray"), height=0.8)
    ax.set_yticks(range(len(spans)), spans["trial_id"], fontsize=6 if len(spans) > 40 else 8)
    ax.invert_yaxis()
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=st) for st, c in colors.items() if (spans["status"] == st).any()],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    edges = sorted(set(spans["s"]) | set(spans["e"]))
    running = [int(((spans["s"] <= t) & (spans["e"] > t)).sum()) for t in edges]
    bx.step(edges, running, where="post", color="black")
    bx.axhline(max_concurrent, color="tab:green", ls="--", lw=1, label=f"max_concurrent={max_concurrent}")
    bx.set_ylabel("running")
    bx.set_xlabel("seconds since the first trial started")
    bx.legend(fontsize=7)
    busy = _busy_fraction(edges, running, max_concurrent, spans)
    fig.suptitle(f"sweep {name}: trial timeline ({len(spans)} trials; {busy:.0%} of the time until the last "
                 f"trial started, {max_concurrent} ran at once)", fontsize=10)
    return _save(fig, path, bbox=True)                      # the legend sits outside the axes


def _busy_fraction(edges, running, max_concurrent: int, spans) -> float:
    """Share of the time from the first start to the last start with max_concurrent trials running
    (trials remained to start all that time, so an asynchronous sweep keeps this near 1)."""
    last_start = spans["s"].max()
    full = total = 0.0
    for a, b, n in zip(edges, edges[1:], running):
        if a >= last_start:
            break
        dt = min(b, last_start) - a
        total += dt
        full += dt if n >= max_concurrent else 0.0
    return full / total if total > 0 else 1.0

