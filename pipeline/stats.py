"""Uncertainty of image metrics: resampled FID, KID, paired comparisons, and rankings that say what
is resolved (method.md 8).

The FID's uncertainty comes from resampling the generated images' features (no image is generated
again) with the reference statistics held fixed: it measures how much the FID would move with
another draw of the same number of generated images from the same model.

The resampling is the half-sampling bootstrap (the delete-d jackknife with d = n/2): each resample
is a random half of the images drawn without replacement, and the spread of the half-sample FIDs,
scaled by sqrt((n - m) / m) (= 1 for m = n/2), estimates the standard error at n. The classic
bootstrap (n draws with replacement) repeats images, which FID's covariance term reads as lost
diversity: on real Fashion-MNIST features it gave 2.9 against a measured spread of 1.6 over 24
independent groups of 128 images; half-sampling gave 1.4 (tests/integration/test_fid.py checks the agreement
on Gaussian features).

Resample index sets depend only on (n, seed), so two models evaluated on the same seeds share them:
their FID difference is resampled in pairs, which cancels the noise they have in common (shared
seeds -> correlated errors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOT_RESAMPLES = 200
BOOT_SEED = 0
LEVEL = 0.95
SCHEME = "half-sampling without replacement (delete-d jackknife, d = n/2)"


def resample_indices(n: int, resamples: int = BOOT_RESAMPLES, seed: int = BOOT_SEED) -> np.ndarray:
    """resamples x n//2 indices, each row a random half of range(n) without replacement; a function
    of (n, resamples, seed) only."""
    rng = np.random.default_rng([seed, n])
    return np.stack([rng.permutation(n)[: n // 2] for _ in range(resamples)])


def scale(n: int) -> float:
    """sqrt((n - m) / m) for half-samples of size m = n // 2: the factor from their spread to the SE at n."""
    m = n // 2
    return float(np.sqrt((n - m) / m))


class ReferenceStats:
    """The reference's mu, Sigma and Sigma^(1/2), prepared once for many FIDs against it."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.asarray(mu, np.float64)
        self.sigma = np.asarray(sigma, np.float64)
        w, v = np.linalg.eigh(self.sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T            # Sigma_ref^(1/2), symmetric
        self.trace = float(np.trace(self.sigma))


def fid_replicates(features: np.ndarray, ref: ReferenceStats, idx: np.ndarray) -> np.ndarray:
    """FID of each resample (rows of idx) of the generated features against a fixed reference.

    Tr((S_b S_ref)^(1/2)) equals the sum of square roots of the nonzero eigenvalues of
    Zc Zc^T / (n - 1) with Zc = (X_b - mean X_b) Sigma_ref^(1/2): an n x n problem per resample
    instead of a d x d one (n = 128 generated images against d = 2048 features)."""
    X = np.asarray(features, np.float64)
    n = X.shape[0]
    Z = X @ ref.root                                   # once: resampling and centering commute with it
    out = np.empty(len(idx))
    for b, rows in enumerate(idx):
        xb, zb = X[rows], Z[rows]
        mu = xb.mean(0)
        xc, zc = xb - mu, zb - zb.mean(0)
        gram = zc @ zc.T / (n - 1)
        ev = np.linalg.eigvalsh((gram + gram.T) / 2)
        tr_cov = np.sqrt(ev[ev > ev[-1] * 1e-12]).sum()   # the zero eigenvalues: rounding noise, not sqrt'ed
        diff = mu - ref.mu
        out[b] = diff @ diff + (xc * xc).sum() / (n - 1) + ref.trace - 2 * tr_cov
    return out


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def fid_uncertainty(features: np.ndarray, ref: ReferenceStats, resamples: int = BOOT_RESAMPLES,
                    seed: int = BOOT_SEED, fid: float | None = None) -> dict:
    """Standard error, 95 % interval (the FID plus the scaled, centred percentiles of the half-sample
    FIDs) and the half-sample FIDs themselves (kept for paired comparisons)."""
    n = len(features)
    reps = fid_replicates(features, ref, resample_indices(n, resamples, seed))
    if fid is None:
        fid = float(fid_replicates(features, ref, np.arange(n)[None])[0])
    dev = (reps - reps.mean()) * scale(n)
    lo, hi = interval(dev)
    return {"fid_se": float(dev.std(ddof=1)), "fid_ci95": [fid + lo, fid + hi],
            "bootstrap": {"resamples": resamples, "seed": seed, "scheme": SCHEME,
                          "over": "generated images' features", "reference": "held fixed",
                          "replicates": [round(float(v), 4) for v in reps]}}


def kid(features: np.ndarray, ref_features: np.ndarray, subsets: int = 100, max_subset: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (clean-fid's estimator), averaged over random subsets of equal size;
    returns (mean, standard deviation over the subsets)."""
    x_all = np.asarray(ref_features, np.float64)
    y_all = np.asarray(features, np.float64)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset)
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals[s] = within - 2 * kxy.sum() / (m * m)
    return float(vals.mean()), float(vals.std(ddof=1)) if subsets > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Comparisons and rankings.

@dataclass
class Comparison:
    diff: float                      # FID(other) - FID(best)
    ci95: tuple[float, float]        # paired bootstrap interval of the difference
    resolved: bool                   # the interval excludes 0


def paired(rec_a: dict, rec_b: dict) -> Comparison | None:
    """FID(b) - FID(a) with a paired bootstrap, when both were evaluated on the same seeds with the
    same resamples (else None: the records cannot be paired)."""
    ba, bb = rec_a.get("bootstrap") or {}, rec_b.get("bootstrap") or {}
    same = (rec_a.get("seeds") == rec_b.get("seeds") and rec_a.get("num_images") == rec_b.get("num_images")
            and ba.get("seed") == bb.get("seed") and ba.get("resamples") == bb.get("resamples")
            and ba.get("replicates") and bb.get("replicates"))
    if not same:
        return None
    d = np.asarray(bb["replicates"]) - np.asarray(ba["replicates"])
    diff = float(rec_b["fid"] - rec_a["fid"])
    lo, hi = interval((d - d.mean()) * scale(int(rec_a["num_images"])))
    lo, hi = diff + lo, diff + hi
    return Comparison(diff, (lo, hi), not (lo <= 0 <= hi))


def rank(records: Sequence[dict], key=lambda r: r["fid"]) -> dict:
    """The best record and, for every other, whether it is distinguishable from the best.

    Returns {"best": index, "tied": [indices not resolved from the best, best included],
    "comparisons": {index: Comparison or None}}."""
    if not records:
        return {"best": None, "tied": [], "comparisons": {}}
    best = min(range(len(records)), key=lambda i: key(records[i]))
    comps, tied = {}, [best]
    for i, r in enumerate(records):
        if i == best:
            continue
        c = paired(records[best], r)
        comps[i] = c
        if c is None or not c.resolved:
            tied.append(i)
    return {"best": best, "tied": sorted(tied), "comparisons": comps}


def edge_note(values: Sequence[float], best_value: float, name: str, lo: float | None = None,
              hi: float | None = None) -> str | None:
    """A warning when the best value sits at an end of the searched range (the optimum may lie
    beyond it). lo/hi: the searched range; default the evaluated values' extremes."""
    vals = sorted(float(v) for v in values)
    if len(vals) < 2:
        return None
    lo = vals[0] if lo is None else lo
    hi = vals[-1] if hi is None else hi
    if np.isclose(best_value, lo) or best_value <= lo:
        return f"the best {name}={best_value:g} is the smallest searched: the optimum may lie below it"
    if np.isclose(best_value, hi) or best_value >= hi:
        return f"the best {name}={best_value:g} is the largest searched: the optimum may lie above it"
    return None


def ranking(records: Sequence[dict], label=lambda r: f"sigma_rel {r['sigma_rel']:.3f}") -> dict:
    """The best record (index), the labels of the others not distinguishable from it (paired 95 %
    interval of the FID difference contains 0), each comparison, printable lines, and a note when
    the best is at the edge of the evaluated EMA lengths."""
    res = rank(records)
    if res["best"] is None:
        return {"best": None, "tied_with_best": [], "lines": ["no results"], "edge": None, "comparisons": []}
    best = records[res["best"]]
    comps = []
    for i, c in res["comparisons"].items():
        comps.append({"label": label(records[i]), "diff": None if c is None else round(c.diff, 4),
                      "ci95": None if c is None else [round(c.ci95[0], 4), round(c.ci95[1], 4)],
                      "resolved": None if c is None else c.resolved})
    tied = [label(records[i]) for i in res["tied"] if i != res["best"]]
    edge = None
    if all(r.get("sigma_rel") is not None for r in records) and len({r["sigma_rel"] for r in records}) > 1:
        edge = edge_note([r["sigma_rel"] for r in records], best["sigma_rel"], "sigma_rel")
    guided = [r for r in records if (r.get("sampler") or {}).get("guidance", 1.0) != 1.0]
    if guided and best in guided:                 # a post-hoc grid: the guidance weight is an axis too
        ws = {r["sampler"]["guidance"] for r in records} | {1.0}
        edge = "; ".join(n for n in (edge, edge_note(ws, best["sampler"]["guidance"], "guidance w")) if n) or None
    lines = [f"best: FID {best['fid']:.2f} +- {best['fid_se']:.2f} at {label(best)}"]
    lines.append("not distinguishable from it (paired 95% interval of the difference contains 0): "
                 + (", ".join(tied) if tied else "none; every other result is resolved as worse"))
    for c in comps:
        if c["diff"] is not None:
            lines.append(f"  {c['label']}: FID {c['diff']:+.2f} vs the best (paired 95% interval {c['ci95'][0]:+.2f} "
                         f"to {c['ci95'][1]:+.2f}): {'resolved' if c['resolved'] else 'not resolved'}")
    if edge:
        lines.append(f"note: {edge}")
    return {"best": res["best"], "tied_with_best": tied, "lines": lines, "edge": edge, "comparisons": comps}




def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Squared distance of every row of x to its k-th nearest other row."""
    out = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i:i + chunk], x)
        out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]     # index 0 is the point itself (distance 0)
    return out


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each point: inside at least one ball (centre, squared radius)."""
    out = np.empty(len(points), dtype=bool)
    for i in range(0, len(points), chunk):
        out[i:i + chunk] = (_sq_dists(points[i:i + chunk], centres) <= radii[None, :]).any(1)
    return out


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019; method.md 10): the fraction of generated
    features inside the k-NN balls of the real ones, and of real features inside those of the generated."""
    gen, real = np.asarray(gen, np.float64), np.asarray(real, np.float64)
    precision = float(_covered(gen, real, _knn_radii(real, k)).mean())
    recall = float(_covered(real, gen, _knn_radii(gen, k)).mean())
    return precision, recall
