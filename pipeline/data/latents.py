"""VAE latents (method.md 7): the optional encoder (a local diffusers AutoencoderKL, never
downloaded) and the latent conventions: how pixels enter the VAE, how its posterior is scaled for the
network, and how samples come back to pixels. A convention is an entry of CONVENTIONS.

- `edm2`: EDM2's convention exactly (its StabilityVAEEncoder, facts in NVIDIA-FORMATS): pixels / 255
  into the encoder, the posterior mean and std stored (float32), z = mean + std * eps drawn afresh
  each time an image is used, then z * scale + bias with scale = 0.5 / raw_std, bias = -raw_mean *
  scale for EDM2's fixed raw_mean / raw_std; decoding inverts that, runs the decoder and maps
  clamp(x, 0, 1) * 255 to uint8. Latents made here and by NVIDIA's dataset tool are interchangeable.
- `data-stats`: this project's earlier convention: pixels / 127.5 - 1, per-channel statistics of the
  dataset's own latents (mean, and std of the posterior mixture) scaled to mean 0 and std 0.5
  (float16 storage); decoding maps the decoder's [-1, 1] back as the pixel encoder does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .manifest import read_manifest
from .pixels import DataError, decode_pixels


def load_vae(vae_path: str | Path):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("data.encoder=vae needs diffusers: pip install 'edm2-pipeline[vae]'") from None
    p = Path(vae_path)
    if not p.is_dir():
        raise DataError(f"data.vae_path={vae_path}: no such folder (a local diffusers AutoencoderKL; "
                        f"nothing is downloaded)")
    return AutoencoderKL.from_pretrained(p, local_files_only=True).eval()


def vae_downsampling(vae) -> int:
    """Pixel-to-latent size ratio of an AutoencoderKL (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(pixels: np.ndarray, vae, batch_size: int = 32, progress: bool = False,
                   convention: str = "edm2"):
    """Pixels (N x 3 x H x W uint8) -> the VAE posterior's [mean, std] (N x 2C x h x w; float32 for the
    edm2 convention, as EDM2 stores them, float16 for data-stats), plus per-channel statistics of the
    latents (what data-stats scales by; recorded for both)."""
    out = []
    rng = range(0, len(pixels), batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="vae encode", unit="batch")
    dtype = torch.float32 if convention == "edm2" else torch.float16
    for i in rng:
        dist = vae.encode(vae_input(torch.from_numpy(pixels[i:i + batch_size]), convention)).latent_dist
        out.append(torch.cat([dist.mean, dist.std], dim=1).to(dtype).numpy())
    return np.concatenate(out), latent_statistics(np.concatenate(out))


def latent_statistics(arr: np.ndarray) -> dict:
    c = arr.shape[1] // 2
    mean = arr[:, :c].astype(np.float64)
    std = arr[:, c:].astype(np.float64)
    ch_mean = mean.mean(axis=(0, 2, 3))
    ch_std = np.sqrt((mean ** 2 + std ** 2).mean(axis=(0, 2, 3)) - ch_mean ** 2)
    return {"mean": ch_mean.tolist(), "std": ch_std.tolist()}

# EDM2's fixed constants for Stable Diffusion's VAE (sd-vae-ft-mse), 4 latent channels.
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)

EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)

FINAL_MEAN, FINAL_STD = 0.0, 0.5

CONVENTIONS = ("edm2", "data-stats")


def vae_input(pixels_uint8: torch.Tensor, convention: str) -> torch.Tensor:
    """N x 3 x H x W uint8 -> what the VAE's encoder is given."""
    x = pixels_uint8.to(torch.float32)
    return x / 255 if convention == "edm2" else x / 127.5 - 1


def scale_bias(convention: str, latent_stats: dict | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), C x 1 x 1 float32: network units = z * scale + bias."""
    if convention == "edm2":
        if channels != len(EDM2_RAW_MEAN):
            raise ValueError(f"data.latent_convention=edm2 has constants for {len(EDM2_RAW_MEAN)} latent channels, "
                             f"the VAE gives {channels}: use data-stats")
        raw_mean, raw_std = torch.tensor(EDM2_RAW_MEAN), torch.tensor(EDM2_RAW_STD)
    else:
        if not latent_stats:
            raise ValueError("data.latent_convention=data-stats needs the dataset's latent_stats (its manifest)")
        raw_mean = torch.tensor(latent_stats["mean"], dtype=torch.float32)
        raw_std = torch.tensor(latent_stats["std"], dtype=torch.float32)
    scale = FINAL_STD / raw_std
    bias = FINAL_MEAN - raw_mean * scale
    return scale.view(-1, 1, 1).to(torch.float32), bias.view(-1, 1, 1).to(torch.float32)


def draw(mean_std: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """N x 2C stored posterior -> network input: a fresh z = mean + std * eps, then z * scale + bias."""
    c = mean_std.shape[1] // 2
    mean, std = mean_std[:, :c].float(), mean_std[:, c:].float()
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return z * scale + bias


@torch.no_grad()
def decode(x: torch.Tensor, vae, convention: str, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Network-unit latents N x C x h x w -> N x 3 x H x W uint8 pixels."""
    dev = next(vae.parameters()).device
    z = (x.to(dev, torch.float32) - bias.to(dev)) / scale.to(dev)
    y = vae.decode(z).sample.to(torch.float32)
    if convention == "edm2":
        return y.clamp(0, 1).mul(255).to(torch.uint8)
    return (y * 127.5 + 128).clip(0, 255).to(torch.uint8)


def vae_downsampling_of(vae_path: str | Path) -> int:
    """Pixel-to-latent size ratio from the VAE's config.json alone (no weights loaded)."""
    cfg = json.loads((Path(vae_path) / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def pixel_resolution(data_cfg) -> int:
    """The images' resolution: data.resolution for pixels, times the VAE's downsampling for latents."""
    if data_cfg.encoder != "vae":
        return data_cfg.resolution
    return data_cfg.resolution * vae_downsampling_of(data_cfg.vae_path)


class Decoder:
    """Samples -> N x H x W x C uint8 pixels, for a model's data settings (its header's config) with the
    VAE of the current params; pixels decode as the pixel encoder does."""

    def __init__(self, model_data: dict, vae_path: str | None, device="cpu", dataset_dir: str | None = None):
        self.vae = None
        if model_data.get("encoder") != "vae":
            return
        if not vae_path:
            raise DataError("this model was trained on VAE latents: set data.vae_path to the VAE that decodes them")
        self.convention = model_data.get("latent_convention") or "data-stats"
        stats = None
        if self.convention == "data-stats":
            stats = read_manifest(Path(dataset_dir or "data/encoded") / "train").get("latent_stats")
        self.vae = load_vae(vae_path).to(device)
        self.scale, self.bias = scale_bias(self.convention, stats, self.vae.config.latent_channels)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.vae is None:
            return decode_pixels(x).permute(0, 2, 3, 1).cpu().numpy()
        return decode(x, self.vae, self.convention, self.scale, self.bias).permute(0, 2, 3, 1).cpu().numpy()

