"""Pixels in model units and images brought to the configured size (method.md 7): uint8 <-> [-1, 1],
resize / pad / crop, channel conversion. The one error type of the data package lives here.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import PipelineError


class DataError(PipelineError, ValueError):
    """Missing, corrupt or mismatched data; the message says what was tried or what differs."""


def encode_pixels(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 -> x / 127.5 - 1 (std about 0.5 = sigma_data)."""
    if not isinstance(x_uint8, torch.Tensor):
        x_uint8 = torch.from_numpy(np.array(x_uint8, dtype=np.float32))   # copies: memory maps are read-only
    return x_uint8.to(torch.float32) / 127.5 - 1


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model output -> uint8: clip(x * 127.5 + 128)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def to_resolution(img: np.ndarray, resolution: int, mode: str) -> np.ndarray:
    """H x W x C uint8 -> resolution x resolution x C: 'pad' (centre, zeros), 'resize' (Lanczos to a
    square) or 'center-crop' (largest centred square, then Lanczos)."""
    h, w = img.shape[:2]
    if mode == "pad":
        if h > resolution or w > resolution:
            raise DataError(f"image of {w}x{h} is larger than data.resolution={resolution}: "
                            f"use data.resize=resize or center-crop")
        out = np.zeros((resolution, resolution, img.shape[2]), dtype=np.uint8)
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out[top:top + h, left:left + w] = img
        return out
    from PIL import Image
    if mode == "adm-center-crop":
        return _adm_center_crop(img, resolution)
    if mode == "center-crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    out = np.asarray(pil.resize((resolution, resolution), Image.LANCZOS))
    return out[..., None] if out.ndim == 2 else out


def _adm_center_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """The centre crop EDM2 prepares ImageNet with (from ADM): halve with a box filter while the short
    side is at least twice the target, bicubic to a short side of exactly the target, then the central
    square."""
    from PIL import Image
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    while min(pil.size) >= 2 * resolution:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), Image.BOX)
    scale = resolution / min(pil.size)
    pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    arr = arr[top:top + resolution, left:left + resolution]
    return arr[..., None] if arr.ndim == 2 else arr


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.shape[2] == channels:
        return img
    if channels == 1:   # ITU-R 601-2 luma, as PIL's convert("L")
        return (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().clip(0, 255) \
            .astype(np.uint8)[..., None]
    if channels == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    raise DataError(f"cannot convert {img.shape[2]}-channel images to {channels} channels")

