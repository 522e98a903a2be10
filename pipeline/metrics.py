"""The evaluation metrics as a small table (method.md 8): each metric is a feature extractor plus a
distance plus the record fields it fills. `fid.metrics` in params picks them; FID is always first
(every record's primary number, with KID from the same Inception features).

Adding a metric: one class here (`check` for what it needs on disk, `extractor` returning a fid.FeatureNet whose fn maps the clean
299x299 float [0, 255] batch to features, `measure` returning its record fields), one entry in
METRICS, and its name in `fid.metrics`. Reference statistics are cached per extractor hash by
fid.reference_stats, so each metric gets its own cache entry automatically.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .fid import FIDError, FeatureNet, load_feature_net, measure


class FIDMetric:
    """FID (clean-fid Inception, 2048-d pool features), its bootstrap interval, and KID."""
    name = "fid"

    def check(self, cfg) -> None:
        pass

    def extractor(self, cfg, device) -> FeatureNet:
        return load_feature_net(cfg.fid.feature_net, str(device))

    def measure(self, feats: np.ndarray, ref: dict, n: int) -> dict:
        return measure(feats, ref, n)


class FDDinov2Metric:
    """FD-DINOv2 (Stein et al. 2023, reported by EDM2 beside FID): the Frechet distance on the CLS
    features of a DINOv2 ViT (L/14 in the papers), images resized to 224 and normalised with the
    ImageNet mean and std. The weights are read from `fid.dinov2_weights` (never downloaded)."""
    name = "fd_dinov2"

    def check(self, cfg) -> None:
        path = cfg.fid.dinov2_weights
        if not path:
            raise FIDError("fid.metrics has fd_dinov2 but fid.dinov2_weights is not set: give the path of a local "
                           "DINOv2 checkpoint (e.g. dinov2_vitl14_pretrain.pth); nothing is downloaded")
        if not Path(path).is_file():
            raise FIDError(f"fid.dinov2_weights={path}: no such file (FD-DINOv2 needs the DINOv2 weights on disk; "
                           f"nothing is downloaded)")

    def extractor(self, cfg, device) -> FeatureNet:
        self.check(cfg)
        return _dinov2(str(Path(cfg.fid.dinov2_weights).resolve()), str(device))

    def measure(self, feats: np.ndarray, ref: dict, n: int) -> dict:
        m = measure(feats, ref, n)                 # the same Frechet distance and bootstrap, other features
        return {"value": m["fid"], "se": m["fid_se"], "ci95": m["fid_ci95"]}


METRICS = {"fid": FIDMetric(), "fd_dinov2": FDDinov2Metric()}


def check_metrics(cfg) -> None:
    """Every metric of fid.metrics known and ready (weights on disk), before any compute."""
    for name in cfg.fid.metrics:
        metric(name).check(cfg)


def metric(name: str):
    if name not in METRICS:
        raise FIDError(f"fid.metrics: unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def references(cfg, device, ref_cache: str | Path, progress: bool = True) -> list[tuple]:
    """(name, metric, extractor, reference statistics) of every metric of cfg.fid.metrics, FID first,
    each reference computed once and then read from the cache (keyed by the extractor's hash)."""
    from .data import EncodedDataset
    from .fid import reference_dataset_dir, reference_stats
    dataset = EncodedDataset(reference_dataset_dir(cfg, ref_cache))
    out = []
    for name in cfg.fid.metrics:
        m = metric(name)
        ex = m.extractor(cfg, device)
        out.append((name, m, ex, reference_stats(dataset, ex, cfg.fid.ref_num_images, ref_cache,
                                                 cfg.fid.batch_size, progress=progress)))
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
        raise FIDError(f"fid.dinov2_weights={path}: not a DINOv2 ViT checkpoint (missing {err})") from None
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
