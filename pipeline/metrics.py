"""The evaluation metrics as a small table (method.md 8, 10, 12). A metric names the feature network
it reads (FEATURES), says what it needs on disk (`check`), and `measure`s generated features against
the reference statistics of that network, returning one or more named entries
`{name: {"value", "se", "interval", ...}}`; FID, KID, FD-DINOv2, precision and recall are all such
entries of a record's `metrics` (records.to_row flattens them for every table). Features are
computed once per feature network per image set and shared by the metrics that read them.

`metrics.names` in params picks the metrics; `fid` comes first (its FID is every record's primary
number, KID from the same Inception features). Adding a metric: a class here, one METRICS entry,
its name in `metrics.names`, and a test (tests/integration/test_fid.py). Reference statistics are cached per
feature network's hash by fid.reference_stats.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fid import FIDError, FeatureNet, load_feature_net, measure


def _entry(value: float, se: float | None, **more) -> dict:
    """A metric entry: the value, its standard error and the normal 95 % interval (unless given)."""
    interval = more.pop("interval", None)
    if interval is None and se is not None:
        interval = [value - 1.96 * se, value + 1.96 * se]
    return {"value": float(value), "se": None if se is None else float(se), "interval": interval, **more}


class FIDMetric:
    """FID (clean-fid Inception, 2048-d pool features) with its half-sampling interval, and KID from the
    same features (method.md 8, 10)."""
    features = "inception"
    names = ("fid", "kid")

    def check(self, cfg) -> None:
        pass

    def measure(self, feats: np.ndarray, ref: dict, n: int) -> dict:
        m = measure(feats, ref, n)
        out = {"fid": _entry(m["fid"], m["fid_se"], interval=m["fid_ci95"], bootstrap=m["bootstrap"])}
        if m.get("kid") is not None:                       # the subsets' spread, as clean-fid reports it
            out["kid"] = _entry(m["kid"], m["kid_std"], se_kind="std over subsets")
        return out


class FDDinov2Metric:
    """FD-DINOv2 (method.md 12): the Frechet distance and its interval on DINOv2 features."""
    features = "dinov2"
    names = ("fd_dinov2",)

    def check(self, cfg) -> None:
        path = cfg.metrics.dinov2_weights
        if not path:
            raise FIDError("metrics.names has fd_dinov2 but metrics.dinov2_weights is not set: give the path of a local "
                           "DINOv2 checkpoint (e.g. dinov2_vitl14_pretrain.pth); nothing is downloaded")
        if not Path(path).is_file():
            raise FIDError(f"metrics.dinov2_weights={path}: no such file (FD-DINOv2 needs the DINOv2 weights on disk; "
                           f"nothing is downloaded)")

    def measure(self, feats: np.ndarray, ref: dict, n: int) -> dict:
        m = measure(feats, ref, n)                 # the same Frechet distance and half-sampling, other features
        return {"fd_dinov2": _entry(m["fid"], m["fid_se"], interval=m["fid_ci95"])}


class PrecisionRecallMetric:
    """Precision and recall of k-NN manifolds (Kynkaanniemi et al. 2019; method.md 10) on the Inception
    features FID already computed: no second pass over the images."""
    features = "inception"
    names = ("precision", "recall")
    k = 3
    min_images = 1000        # below it on either side the k-NN manifolds are too sparse: the values carry a note

    def check(self, cfg) -> None:
        pass

    def measure(self, feats: np.ndarray, ref: dict, n: int) -> dict:
        from .stats import precision_recall
        real = ref.get("features")
        if real is None or len(real) <= self.k:
            raise FIDError("precision/recall need the reference's features (recompute the reference statistics)")
        p, r = precision_recall(feats, real, self.k)
        few = min(len(feats), len(real)) < self.min_images
        note = (f"k-NN manifolds of {len(feats)} generated and {len(real)} reference images are too sparse to mean "
                f"much, they need about {self.min_images:,} per side; 0 or 1 with SE 0 is typical of too few "
                f"images") if few else None
        out = {}
        for name, v, m in (("precision", p, len(feats)), ("recall", r, len(real))):
            se = float(np.sqrt(v * (1 - v) / m))
            out[name] = _entry(v, se, interval=[max(0.0, v - 1.96 * se), min(1.0, v + 1.96 * se)], k=self.k,
                               se_kind="binomial, given the other set's manifold", **({"note": note} if few else {}))
        return out


METRICS = {"fid": FIDMetric(), "fd_dinov2": FDDinov2Metric(), "precision_recall": PrecisionRecallMetric()}


def _inception(cfg, device) -> FeatureNet:
    return load_feature_net(cfg.metrics.feature_net, str(device), cfg.metrics.mode)


def _dinov2_net(cfg, device) -> FeatureNet:
    METRICS["fd_dinov2"].check(cfg)
    return _dinov2(str(Path(cfg.metrics.dinov2_weights).resolve()), str(device))


FEATURES = {"inception": _inception, "dinov2": _dinov2_net}     # feature network -> its extractor


def check_metrics(cfg) -> None:
    """Every metric of metrics.names known and ready (weights on disk, a reference that fits), before any compute."""
    for name in cfg.metrics.names:
        metric(name).check(cfg)
    check_reference_protocol(cfg)


def metric(name: str):
    if name not in METRICS:
        raise FIDError(f"metrics.names: unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def metric_names(cfg) -> list[str]:
    """Every entry a record of these settings carries (metrics.names expanded: fid -> fid, kid; ...)."""
    return [n for name in cfg.metrics.names for n in metric(name).names]


@dataclass
class FeatureGroup:
    """One feature network, its reference statistics, and the metrics that read its features."""
    extractor: FeatureNet
    ref: dict
    metrics: list


def references(cfg, device, ref_cache: str | Path, progress: bool = True, ranks: tuple[int, int] = (0, 1),
               reduce=None) -> list[FeatureGroup]:
    """The feature groups of cfg.metrics.names (Inception, with FID, first), each network loaded once and
    its reference computed once (streamed; under torchrun spread over the ranks, joined by `reduce`),
    then read from the cache (keyed by the network's hash)."""
    from .data.encoded import EncodedDataset
    from .fid import is_reference_file, read_reference_file, reference_dataset_dir, reference_stats
    published = is_reference_file(cfg.metrics.reference)
    check_reference_protocol(cfg)
    dataset = None if published else EncodedDataset(reference_dataset_dir(cfg, ref_cache))
    groups: dict[str, FeatureGroup] = {}
    for name in cfg.metrics.names:
        m = metric(name)
        if m.features not in groups:
            ex = FEATURES[m.features](cfg, device)
            if published:                          # NVIDIA's statistics: mu/sigma as published, no images
                ref = {**read_reference_file(cfg.metrics.reference, m.features), "feature_net": ex.name,
                       "feature_net_sha256": ex.sha256}
            else:
                ref = reference_stats(dataset, ex, cfg.metrics.ref_num_images, ref_cache, cfg.metrics.batch_size, progress,
                                      ranks, reduce)
            groups[m.features] = FeatureGroup(ex, ref, [])
        groups[m.features].metrics.append(m)
    return list(groups.values())


def check_reference_protocol(cfg) -> None:
    """A published reference file (NVIDIA's `.pkl`, EDM's `.npz`) holds statistics of the legacy
    Inception protocol and no images: refused with metrics.mode clean, and with metrics that need images."""
    from .fid import is_reference_file
    if not is_reference_file(cfg.metrics.reference):
        return
    from .fid import NVIDIA_REFS_URL
    if not Path(cfg.metrics.reference).is_file():
        raise FIDError(f"metrics.reference={cfg.metrics.reference}: no such file; NVIDIA publishes the ImageNet reference "
                       f"statistics at {NVIDIA_REFS_URL} (img512.pkl, img64.pkl): download one there and set "
                       f"metrics.reference to its path")
    if cfg.metrics.mode != "legacy":
        raise FIDError(f"metrics.reference={cfg.metrics.reference} holds NVIDIA's statistics of the legacy Inception "
                       f"protocol: set metrics.mode=legacy (metrics.mode=clean would compare two protocols)")
    needs_images = [n for n in cfg.metrics.names if n == "precision_recall"]
    if needs_images:
        raise FIDError(f"metrics.names has {needs_images[0]}, which needs the reference images' features; "
                       f"metrics.reference={cfg.metrics.reference} holds only mu and sigma")


def group_key(g: FeatureGroup) -> str:
    """A feature network's name in feature shards (its weights' hash)."""
    return g.extractor.sha256[:16]


def measure_images(images: np.ndarray, groups: list[FeatureGroup], n: int, batch_size: int, progress: bool = False,
                   desc: str = "") -> dict:
    """Every metric of `groups` on one set of generated images held in memory (small sets; evaluations
    stream through shards.set_features and measure_features)."""
    from .fid import array_features
    feats = {group_key(g): array_features(images, g.extractor, batch_size, progress=progress,
                                          desc=f"{desc}: {g.extractor.name} features" if desc else "features")
             for g in groups}
    return measure_features(feats, groups, n)


def measure_features(feats: dict[str, np.ndarray], groups: list[FeatureGroup], n: int) -> dict:
    """Each metric's entries ({name: entry}, FID first) from one image set's features per network
    (group_key -> N x D), each entry naming the network it was measured on."""
    out = {}
    for g in groups:
        for m in g.metrics:
            for name, e in m.measure(feats[group_key(g)], g.ref, n).items():
                out[name] = {**e, "feature_net": g.extractor.name, "feature_net_sha256": g.extractor.sha256}
    return out


def combine_sets(sets: list[dict]) -> dict:
    """K disjoint seed sets -> one entry per metric (method.md 8): the mean, its standard error from the
    sets' own (independent sets: sqrt(sum se_k^2) / K), a normal 95 % interval, every set's value and
    the minimum (EDM/EDM2's reporting). Half-sample replicates are averaged (the same resample indices in
    every set), so two records of the same seed sets still pair. One set is returned as it is."""
    if len(sets) == 1:
        return sets[0]
    k = len(sets)
    out = {}
    for name in sets[0]:
        es = [s[name] for s in sets if name in s]
        if len(es) != k:
            continue
        vals = [e["value"] for e in es]
        mean = float(np.mean(vals))
        se = float(np.sqrt(sum(e["se"] ** 2 for e in es)) / k) if all(e.get("se") is not None for e in es) else None
        e = {**es[0], "value": mean, "se": se, "interval": None if se is None else [mean - 1.96 * se, mean + 1.96 * se],
             "sets": vals, "min": float(min(vals))}
        if es[0].get("bootstrap") is not None:
            reps = [x["bootstrap"].get("replicates") for x in es]
            e["bootstrap"] = {**es[0]["bootstrap"], "seed_sets": k,
                              "replicates": [round(float(v), 4) for v in np.mean(reps, axis=0)] if all(reps) else None}
        out[name] = e
    return out


# ----------------------------------------------------------------------------------------------
# DINOv2 as a timm VisionTransformer, its size read from the checkpoint itself.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    from .io import load_torch_file
    state = load_torch_file(path, "DINOv2 checkpoint")      # weights_only=True: nothing in it can run code
    return state.get("model", state) if isinstance(state, dict) else state


@functools.lru_cache(maxsize=2)
def _dinov2(path: str, device: str) -> FeatureNet:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from .fid import _sha256
    state = _read_state(path)
    try:
        dim = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        patch = state["patch_embed.proj.weight"].shape[-1]
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except (KeyError, ValueError) as err:
        raise FIDError(f"metrics.dinov2_weights={path}: not a DINOv2 ViT checkpoint (missing {err})") from None
    net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=224,
                            patch_size=patch, embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
                            mlp_ratio=mlp_ratio)
    net.load_state_dict(checkpoint_filter_fn(state, net))
    dev = torch.device(device)
    net = net.eval().to(dev)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:       # (N, 3, 299, 299) float in [0, 255], as for Inception
        with torch.no_grad():
            x = torch.nn.functional.interpolate(x.to(dev) / 255.0, size=(224, 224), mode="bicubic",
                                                antialias=True, align_corners=False)
            return net((x - mean) / std).float()
    return FeatureNet(f"dinov2-vit{dim}x{depth}", _sha256(Path(path)), fn, dev)
