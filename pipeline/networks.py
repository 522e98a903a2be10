"""Magnitude-preserving U-Net of EDM2 (method.md 4) and the EDM preconditioning wrapper (method.md 1).

Written from docs/method.md; equation numbers are the EDM2 paper's. Every layer keeps activations at unit
RMS in expectation, weights are kept at unit norm by forced weight normalization, and there are no
biases (a constant ones channel replaces them).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, NetworkConfig
from .errors import PipelineError

# ----------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Divide each vector along `dim` by eps + ||x|| / sqrt(N) -> unit RMS (method.md 4, normalize)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """MP-SiLU, eq. 81: silu(x) / 0.596 has unit RMS for x ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """MP-sum, eq. 88: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)."""
    # Under bf16 autocast a float32 skip meets a bf16 convolution output: CUDA's lerp wants one dtype
    # (the CPU's promotes on its own), so promote here and both devices compute the same thing.
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """MP-concat, eq. 103: channel groups weighted by (1 - t) and t, total magnitude preserved."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """MP-Fourier features, eq. 75: sqrt(2) cos(2 pi (f c + phase)), f ~ N(0, 1), fixed."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """MP convolution / linear layer (eqs. 47, 66): no bias, weight normalized to unit norm per
    output filter, scaled by gain / sqrt(fan_in). `kernel=()` makes it a linear layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            # Forced weight normalization (method.md 4): the stored weight itself stays at unit RMS per
            # output row, so Adam's effective step size does not shrink as weights grow.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)                                         # differentiable (method.md 4)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2x2 average pooling ('down') or nearest 2x upsampling ('up')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


# ----------------------------------------------------------------------------------------------
# U-Net blocks and layout (method.md 4, EDM2 figure 21).

class Block(nn.Module):
    """Encoder or decoder residual block with optional cosine self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str,
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        assert flavor in ("enc", "dec")
        self.flavor, self.resample_mode = flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.clip_act = dropout, res_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))           # modulation starts switched off
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                              # pixel norm of the skip input
        # Residual branch: conv3x3(mp_silu(x)) -> (1 + emb_gain * E(emb)) -> mp_silu -> dropout -> conv3x3.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)                     # global RNG, seeded per step by training
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)                                # decoder: skip conv after the branch reads x
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, c_, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)            # cosine attention: per-head pixel norm
            attn = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", attn, v).reshape(b, c_, h, w)
            x = mp_sum(x, self.attn_proj(y), t=self.res_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2 magnitude-preserving U-Net F(x; c_noise, labels) for any channel count and any
    power-of-two resolution; conditional when label_dim > 0."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions=(16, 8), channels_per_head: int = 64, dropout: float = 0.0,
                 label_balance: float = 0.5, concat_balance: float = 0.5, res_balance: float = 0.3,
                 clip_act: float = 256.0):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        c0, emb_ch = widths[0], max(widths)
        self.label_dim, self.label_balance, self.concat_balance = label_dim, label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))            # fresh model: D(x) = c_skip x
        blk = dict(emb_channels=emb_ch, channels_per_head=channels_per_head, dropout=dropout,
                   res_balance=res_balance, clip_act=clip_act)

        # Embedding: MP-Fourier(c_0) of c_noise -> MP linear (c_0 -> E); labels by MP-sum (t = 0.5).
        self.emb_fourier = MPFourier(c0, seed=0)
        self.emb_noise = MPConv(c0, emb_ch)
        self.emb_label = MPConv(label_dim, emb_ch) if label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1                                  # + constant ones channel (bias)
        skips = []
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample_mode="down", **blk)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="enc",
                                                            attention=res in attn_resolutions, **blk)
                skips.append(cout)

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **blk)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample_mode="up", **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="dec",
                                                            attention=res in attn_resolutions, **blk)
        self.conv_out = MPConv(cout, img_channels, (3, 3))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels (one-hot)")
            lab = self.emb_label(class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, lab, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.conv_out(x, gain=self.out_gain)


class Precond(nn.Module):
    """EDM preconditioning (method.md 1) around the U-Net, plus the learned uncertainty u(sigma) (method.md 2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_data: float = 0.5,
                 logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        # Uncertainty head: MP-Fourier(128) of c_noise -> MP linear (128 -> 1); training only.
        self.logvar_fourier = MPFourier(logvar_channels, seed=1)   # drawn independently of emb_fourier (EDM2)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def coefficients(self, sigma: torch.Tensor):
        """method.md 1 (EDM Table 1): c_skip, c_out, c_in, c_noise."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim and class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels (one-hot)")
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.unet(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)        # method.md 1: D = c_skip x + c_out F(c_in x)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten().expand(x.shape[0])))
            return D_x, logvar.reshape(-1, 1, 1, 1)
        return D_x


class NetworkSizeError(PipelineError, ValueError):
    """A network too large to build here: refused before any memory is allocated."""


# A hard ceiling far above EDM2-XXL (1.5 G parameters); below it, what the memory can hold decides.
MAX_PARAMETERS = 20_000_000_000


def _precond_kwargs(cfg: Config | NetworkConfig, sigma_data: float) -> dict:
    net = cfg.network if isinstance(cfg, Config) else cfg
    if isinstance(cfg, Config):
        sigma_data = cfg.loss.sigma_data
    return dict(sigma_data=sigma_data, logvar_channels=net.logvar_channels, model_channels=net.model_channels,
                channel_mult=list(net.channel_mult), num_blocks=net.num_blocks,
                attn_resolutions=list(net.attn_resolutions), channels_per_head=net.channels_per_head,
                dropout=net.dropout, label_balance=net.label_balance, concat_balance=net.concat_balance,
                res_balance=net.res_balance, clip_act=net.clip_act)


def network_shapes(cfg: Config | NetworkConfig, img_resolution: int, img_channels: int, label_dim: int,
                   sigma_data: float = 0.5, copies: float = 1.0) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{tensor name: (shape, dtype)} of the network a config describes, built on the meta device (no
    memory); refused when `copies` float32 copies of it would not fit the memory available here."""
    if img_resolution > 1 << 14 or img_channels > 1 << 12 or label_dim > 1 << 20:
        raise NetworkSizeError(f"network of {img_resolution}x{img_resolution}x{img_channels} with {label_dim} "
                               f"labels: beyond any size this project builds")
    with torch.device("meta"):
        net = Precond(img_resolution, img_channels, label_dim, **_precond_kwargs(cfg, sigma_data))
    shapes = {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}
    n = sum(s.numel() for s, _ in shapes.values())
    need, avail = int(n * 4 * copies), available_memory()
    if n > MAX_PARAMETERS or need > avail:
        raise NetworkSizeError(f"the network has {n / 1e6:,.0f}M parameters: {copies:g} float32 cop"
                               f"{'y needs' if copies == 1 else 'ies need'} {need / 2**30:,.1f} GiB, "
                               f"{avail / 2**30:,.1f} GiB are available (network.model_channels / num_blocks / "
                               f"channel_mult too large?)")
    return shapes


def available_memory() -> int:
    """Bytes this process may still allocate: Linux's MemAvailable, within a cgroup's memory limit."""
    avail = 1 << 62
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (open(x).read().strip() for x in (limit_file, usage_file))
            if limit.isdigit():
                avail = min(avail, max(int(limit) - int(usage), 0))
            break
        except OSError:
            continue
    return avail


def check_state(want: dict[str, tuple[torch.Size, torch.dtype]], have: dict[str, torch.Tensor | tuple],
                where: str, error: type[Exception]) -> None:
    """Tensors (or (shape, dtype) pairs) against the network they claim to be: the same names and shapes,
    floating-point where the network's are; else `error` naming the first difference."""
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise error(f"{where}: its tensors do not match the network its header describes (missing {missing[:3]}, "
                    f"unexpected {extra[:3]})")
    for k, t in have.items():
        shape, dtype = (t.shape, t.dtype) if isinstance(t, torch.Tensor) else t
        if tuple(shape) != tuple(want[k][0]) or dtype.is_floating_point != want[k][1].is_floating_point:
            raise error(f"{where}: tensor {k!r} is {list(shape)} {str(dtype).replace('torch.', '')}, the network "
                        f"its header describes needs {list(want[k][0])} {str(want[k][1]).replace('torch.', '')}")


def build_network(cfg: Config | NetworkConfig, img_resolution: int, img_channels: int, label_dim: int,
                  sigma_data: float = 0.5, copies: float = 1.0) -> Precond:
    """The denoiser described by a config; the single place where config fields become a model.
    Its size is checked first (network_shapes): `copies` float32 copies must fit the memory."""
    network_shapes(cfg, img_resolution, img_channels, label_dim, sigma_data, copies)
    return Precond(img_resolution, img_channels, label_dim, **_precond_kwargs(cfg, sigma_data))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# torch.compile with a fallback (training: train.compile; sampling: sampler.compile).
