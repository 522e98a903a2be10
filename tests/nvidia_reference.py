"""NVIDIA EDM2's definitions, written again for the tests: the denoiser as a function of a state dict in
NVIDIA's tensor names and its full init arguments, and generate_images.py's per-seed noise and sampler.

Written from docs/method.md and shared/NVIDIA-FORMATS.md (what NVIDIA's code does, in words), not from
NVIDIA's code and not from pipeline/: a second, functional statement of the same definitions, so an
import or a sampler option can be checked against it rather than against itself."""
import math

import numpy as np
import torch
import torch.nn.functional as F

# NVIDIA's constructor defaults (networks_edm2.py, written here as read, independently of pipeline/nvidia.py).
DEFAULTS = {"use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128, "model_channels": 192,
            "channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5,
            "concat_balance": 0.5, "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3,
            "attn_balance": 0.3, "clip_act": 256}


def _unit(v, dims):
    n = math.prod(v.shape[d] for d in dims)
    return v / (1e-4 + torch.linalg.vector_norm(v, dim=dims, keepdim=True) / math.sqrt(n))


def denoiser(T: dict, recorded: dict, x, sigma, labels=None):
    """D(x; sigma) of EDM2's Precond with these tensors and init arguments (missing ones: DEFAULTS)."""
    kw = {**DEFAULTS, **recorded}
    T = {k: v.float() for k, v in T.items()}
    silu = lambda v: F.silu(v) / 0.596                                          # noqa: E731
    msum = lambda a, b, t: (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t ** 2)  # noqa: E731

    def conv(name, v, gain=1.0):
        w = T[f"{name}.weight"]
        w = _unit(w, list(range(1, w.ndim))) * (gain / math.sqrt(w[0].numel()))
        return v @ w.t() if w.ndim == 2 else F.conv2d(v, w, padding=w.shape[-1] // 2)

    def fourier(name, v):
        return torch.cos(v[:, None] * T[f"{name}.freqs"][None] + T[f"{name}.phases"][None]) * math.sqrt(2)

    def block(name, v, emb, enc, mode, attention):
        width = T[f"{name}.conv_res1.weight"].shape[0]
        heads = width // kw["channels_per_head"] if attention else 0
        if mode == "down":
            v = F.avg_pool2d(v, 2)
        if mode == "up":
            v = v.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        skip = f"{name}.conv_skip.weight" in T
        if enc:
            v = _unit(conv(f"{name}.conv_skip", v) if skip else v, [1])
        y = conv(f"{name}.conv_res0", silu(v))
        y = silu(y * (conv(f"{name}.emb_linear", emb, gain=T[f"{name}.emb_gain"]) + 1)[:, :, None, None])
        y = conv(f"{name}.conv_res1", y)
        if not enc and skip:
            v = conv(f"{name}.conv_skip", v)
        v = msum(v, y, kw["res_balance"])
        if heads:
            b, c, h, w_ = v.shape
            q, k, val = _unit(conv(f"{name}.attn_qkv", v).reshape(b, heads, -1, 3, h * w_), [2]).unbind(3)
            a = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(q.shape[2]), dim=3)
            v = msum(v, conv(f"{name}.attn_proj", torch.einsum("bhqk,bhck->bhcq", a, val).reshape(b, c, h, w_)),
                     kw["attn_balance"])
        return v.clip(-kw["clip_act"], kw["clip_act"])

    sd = kw["sigma_data"]
    sigma = sigma.reshape(-1, 1, 1, 1).float()
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.flatten().log() / 4
    emb = conv("unet.emb_noise", fourier("unet.emb_fourier", c_noise))
    if kw["label_dim"]:
        emb = msum(emb, conv("unet.emb_label", labels * math.sqrt(kw["label_dim"])), kw["label_balance"])
    emb = silu(emb)
    v = c_in * x.float()
    v = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)
    res0, levels, skips = kw["img_resolution"], len(kw["channel_mult"]), []
    for lv in range(levels):
        r = res0 >> lv
        v = conv(f"unet.enc.{r}x{r}_conv", v) if lv == 0 else block(f"unet.enc.{r}x{r}_down", v, emb, True, "down", False)
        skips.append(v)
        for i in range(kw["num_blocks"]):
            v = block(f"unet.enc.{r}x{r}_block{i}", v, emb, True, "keep", r in kw["attn_resolutions"])
            skips.append(v)
    for lv in reversed(range(levels)):
        r = res0 >> lv
        if lv == levels - 1:
            v = block(f"unet.dec.{r}x{r}_in0", v, emb, False, "keep", True)
            v = block(f"unet.dec.{r}x{r}_in1", v, emb, False, "keep", False)
        else:
            v = block(f"unet.dec.{r}x{r}_up", v, emb, False, "up", False)
        for i in range(kw["num_blocks"] + 1):
            s, t = skips.pop(), kw["concat_balance"]
            c = math.sqrt((v.shape[1] + s.shape[1]) / ((1 - t) ** 2 + t ** 2))
            v = torch.cat([v * (c * (1 - t) / math.sqrt(v.shape[1])), s * (c * t / math.sqrt(s.shape[1]))], dim=1)
            v = block(f"unet.dec.{r}x{r}_block{i}", v, emb, False, "keep", r in kw["attn_resolutions"])
    return c_skip * x.float() + c_out * conv("unet.out_conv", v, gain=T["unet.out_gain"])


def generate(denoise, seeds, shape, label_dim, steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, churn=0.0,
             S_min=0.0, S_max=float("inf"), S_noise=1.0, device="cpu"):
    """generate_images.py's images for `seeds`: one generator per seed (seed mod 2^32) on `device`; the
    initial noise (float32), then each seed's class label, then churn noise, all from that generator;
    the 2nd-order EDM sampler in float32. Returns (x, label indices)."""
    gens = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]
    draw = lambda shp, dt: torch.stack([torch.randn(shp, generator=g, dtype=dt, device=device) for g in gens])  # noqa
    noise = draw(list(shape), torch.float32)
    idx = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device) for g in gens]) \
        if label_dim else None
    labels = torch.eye(label_dim, device=device)[idx] if label_dim else None
    i = torch.arange(steps, dtype=torch.float32, device=device)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = noise * t[0]
    for n in range(steps):
        tc, tn = t[n], t[n + 1]
        th, xh = tc, x
        if churn > 0 and S_min <= tc <= S_max:
            gamma = min(churn / steps, np.sqrt(2) - 1)
            th = tc + gamma * tc
            xh = x + (th ** 2 - tc ** 2).sqrt() * S_noise * draw(list(x.shape[1:]), x.dtype)
        d = (xh - denoise(xh, th, labels)) / th
        x = xh + (tn - th) * d
        if n < steps - 1:
            d2 = (x - denoise(x, tn, labels)) / tn
            x = xh + (tn - th) * (0.5 * d + 0.5 * d2)
    return x, idx
