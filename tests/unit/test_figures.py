"""Figures leave a margin: no title clipped at the sides, no panel touching the frame (a clipped or
touching element reaches the image's outermost pixels)."""
import numpy as np
import pandas as pd
from PIL import Image


def _border_is_blank(path, px: int = 6) -> bool:
    a = np.asarray(Image.open(path).convert("L"))
    edges = np.concatenate([a[:px].ravel(), a[-px:].ravel(), a[:, :px].ravel(), a[:, -px:].ravel()])
    return bool((edges > 245).all())


def test_ema_profiles_and_sweep_figure_leave_a_margin(tmp_path):
    from pipeline.figures import plot_best_vs_param, plot_ema_reconstruction
    snaps = [{"nimg": n, "sigma_rel": s} for n in (256, 512, 768, 1024) for s in (0.05, 0.1)]
    targets = [{"sigma_rel": s, "coefficients": list(np.linspace(-1, 2, len(snaps))), "rel_error": 0.0123,
                "max_abs_coef": 12.5} for s in (0.04, 0.08, 0.16)]
    p = plot_ema_reconstruction({"snapshots": snaps, "targets": targets, "target_nimg": 1024}, tmp_path / "ema.png")
    assert _border_is_blank(p)
    best = pd.DataFrame({"trial_id": ["a", "b", "c"], "train.ref_lr": [0.001, 0.01, 0.1], "fid": [300.0, 250.0, 280.0],
                         "fid_lo": [290.0, 240.0, 270.0], "fid_hi": [310.0, 260.0, 290.0]})
    p = plot_best_vs_param(best, ["train.ref_lr"], tmp_path / "best.png", "a-rather-long-sweep-name-for-the-title",
                           ranges={"train.ref_lr": (0.001, 0.1)})
    assert _border_is_blank(p)
