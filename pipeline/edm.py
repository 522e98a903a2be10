"""EDM training objective, learning-rate schedule and sampler (method.md 2, 3 and 5).

Written from docs/method.md (EDM2 equation numbers; EDM Algorithm 2 for the sampler).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # D(x; sigma) -> E[y | x]


# ----------------------------------------------------------------------------------------------
# method.md 2: noise levels, weighting and loss with learned uncertainty (EDM2 eqs. 14-16, 21).
#
# The noise-level laws are a table in options.py (NOISE_LAWS); training and the loss both draw through
# sample_sigma, so a law added there is used everywhere.
from .options import NOISE_LAWS, SOLVERS, sample_sigma  # noqa: E402,F401  (edm.sample_sigma: the loss's draw)


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm2_loss(net, images: torch.Tensor, labels: torch.Tensor | None, loss_cfg,
              generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
              eps: torch.Tensor | None = None):
    """Per element l = lambda / exp(u) * (D(y + n; sigma) - y)^2 + u  (method.md 2; EDM2 eq. 21).

    loss_cfg: the loss section (config.LOSS_LAWS: the noise law, its parameters, sigma_data).

    sigma and eps (the unit noise, n = sigma eps) are drawn from `generator` unless given (training
    draws them for the whole global batch, so results do not depend on how it is split).
    Returns (objective, stats): objective = per-image sum of l, averaged over the batch (what the
    optimizer minimizes); stats holds the mean of l and the plain weighted MSE, both detached.
    """
    if sigma is None:
        sigma = sample_sigma(images.shape[0], loss_cfg, generator, images.device)
    sigma = sigma.reshape(-1, 1, 1, 1)
    if eps is None:
        eps = torch.randn(images.shape, generator=generator, device=images.device)
    noise = eps * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    weighted_se = loss_weight(sigma, loss_cfg.sigma_data) * (denoised - images) ** 2
    per_elem = weighted_se / logvar.exp() + logvar
    objective = per_elem.flatten(1).sum(1).mean()
    return objective, {"loss": per_elem.mean().detach(), "weighted_mse": weighted_se.mean().detach()}


@torch.no_grad()
def validation_loss(net, images: torch.Tensor, labels: torch.Tensor | None, sigmas: Sequence[float],
                    eps: torch.Tensor, sigma_data: float, batch_size: int = 64) -> float:
    """The weighted denoising error lambda(sigma) ||D(y + sigma eps; sigma) - y||^2 (per element,
    without the learned u) of fixed images at a fixed grid of noise levels with fixed noise `eps`,
    averaged with equal weight per level: unlike the training loss, it does not depend on the
    noise law a run trains with, so runs with different P_mean/P_std can be ranked on it.
    The network is evaluated in eval mode (no dropout) and put back in its previous mode."""
    was_training = net.training
    net.eval()
    try:
        total = 0.0
        for s in sigmas:
            sigma = torch.full((len(images),), float(s), device=images.device)
            err = 0.0
            for i in range(0, len(images), batch_size):
                y, n = images[i:i + batch_size], eps[i:i + batch_size] * float(s)
                lab = labels[i:i + batch_size] if labels is not None else None
                d = net(y + n, sigma[i:i + batch_size], lab).to(torch.float32)
                err += (loss_weight(sigma[i:i + batch_size].view(-1, 1, 1, 1), sigma_data) * (d - y) ** 2).sum().item()
            total += err / images.numel()
        return total / len(sigmas)
    finally:
        net.train(was_training)


# ----------------------------------------------------------------------------------------------
# method.md 3: learning-rate schedule (EDM2 eq. 11), counted in images.

def learning_rate(nimg: float, batch_size: int, ref_lr: float, ref_batches: float, rampup_nimg: float = 0) -> float:
    """lr(t) = ref_lr / sqrt(max(t / ref_batches, 1)) * min(nimg / rampup_nimg, 1), t = nimg / batch_size."""
    t = nimg / batch_size
    lr = ref_lr / math.sqrt(max(t / ref_batches, 1.0)) if ref_batches > 0 else ref_lr
    if rampup_nimg > 0:
        lr *= min(nimg / rampup_nimg, 1.0)
    return lr


# ----------------------------------------------------------------------------------------------
# method.md 5: EDM sampler (EDM Algorithm 2), Heun or Euler, optional churn and guidance.

class SeededNoise:
    """One random stream per image seed, so an image's noise does not depend on which batch it
    lands in (results are identical for any sampler batch size)."""

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.device = torch.device(device)
        # Drawn on the CPU in float64 whatever the device: CUDA's generator gives other numbers for the
        # same seed, and a seed must name the same image on every machine (gpu_check measured 1.4 relative
        # difference between a CPU and an H200 when the noise was drawn on the device).
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float64) -> torch.Tensor:
        return torch.stack([torch.randn(list(shape), generator=g, dtype=torch.float64)
                            for g in self.gens]).to(self.device, dtype)


class NvidiaSeeds:
    """Per-seed noise as EDM2's generate_images.py draws it: a torch.Generator per image seeded with
    seed mod 2^32, on the sampling device, drawing in the dtype asked for (the initial noise in float32,
    then the class label, then the churn noise). The same seed gives NVIDIA's image on the same kind of
    device, and other numbers on another (CUDA's generator is not the CPU's)."""

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.device = torch.device(device)
        self.gens = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(list(shape), generator=g, dtype=dtype, device=self.device)
                            for g in self.gens])

    def randint(self, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(high, size=[], generator=g, device=self.device) for g in self.gens])


def class_labels(seeds: Sequence[int], label_dim: int, sampler_cfg, shape: Sequence[int], device="cpu") -> torch.Tensor:
    """Each seed's class: (seed mod label_dim) with portable seeding; with nvidia seeding the label
    EDM2's generate_images.py draws from the seed's generator after the initial noise."""
    if getattr(sampler_cfg, "seeding", "portable") != "nvidia":
        return torch.tensor([int(s) % label_dim for s in seeds])
    rnd = NvidiaSeeds(seeds, device)
    rnd.randn(shape)                                             # the initial noise comes first
    return rnd.randint(label_dim).cpu()


def sigma_steps(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                dtype=torch.float64, device="cpu") -> torch.Tensor:
    """t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, and t_N = 0."""
    i = torch.arange(steps, dtype=dtype, device=device)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_sampler(denoise: Denoiser, noise: SeededNoise | torch.Tensor, shape: Sequence[int] | None = None,
                steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                solver: str = "heun", guide: Denoiser | None = None, guidance: float = 1.0,
                dtype=torch.float64, churn_noise: SeededNoise | NvidiaSeeds | None = None) -> torch.Tensor:
    """Generate samples by integrating the probability-flow ODE (with optional churn).

    `denoise(x, sigma)` is D(x; sigma); `noise` is a per-seed stream (SeededNoise, NvidiaSeeds; with
    `shape` per image) or an initial N(0, I) tensor (then churn noise comes from `churn_noise`, a
    per-seed stream, or torch's global RNG). With `guide` (a guiding denoiser D_g) and guidance w:
    D_w = D_g + w (D - D_g).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: must be one of {', '.join(SOLVERS)}")

    def D(x, sigma):
        d = denoise(x, sigma).to(dtype)
        if guide is not None and guidance != 1:
            g = guide(x, sigma).to(dtype)
            d = g.lerp(d, guidance)                              # D_g + w (D - D_g)
        return d

    if not isinstance(noise, torch.Tensor):
        churn_noise, eps0 = noise, noise.randn(shape, dtype=dtype)
    else:
        eps0 = noise.to(dtype)
    if churn_noise is not None:
        fresh = lambda like: churn_noise.randn(like.shape[1:], dtype=dtype)  # noqa: E731
    else:
        fresh = lambda like: torch.randn_like(like)  # noqa: E731
    t = sigma_steps(steps, sigma_min, sigma_max, rho, dtype=dtype, device=eps0.device)
    x = eps0 * t[0]                                              # x_0 = t_0 eps
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(churn / steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = x
        if gamma > 0:
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * fresh(x)
        d = (x_hat - D(x_hat, t_hat)) / t_hat                   # Euler step
        x = x_hat + (t_next - t_hat) * d
        if SOLVERS[solver].second_order and t_next > 0:          # 2nd-order correction
            d2 = (x - D(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (d + d2) / 2
    return x


def sample_images(net, seeds: Sequence[int], labels: torch.Tensor | None, sampler_cfg, device="cpu",
                  guide=None, guide_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Samples from a Precond network for one batch of per-image seeds (float32, data scale), seeded
    as sampler_cfg.seeding says (portable or nvidia; with nvidia and labels None, the labels are drawn
    from the seeds' generators as EDM2 does).
    `guide`: the guiding network D_g (used only where sampler_cfg.guidance != 1), fed `guide_labels`
    (default: the same labels; zeros make the same network its own unconditional guide)."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    nvidia = getattr(sampler_cfg, "seeding", "portable") == "nvidia"
    # The ODE's dtype: float64 on the CPU, float32 on a GPU; EDM2's float32 everywhere with nvidia seeding.
    dtype = torch.float64 if torch.device(device).type == "cpu" and not nvidia else torch.float32
    if nvidia:                                  # EDM2's order: initial noise, class label, churn noise
        noise = NvidiaSeeds(seeds, device)
        eps0 = noise.randn(shape, dtype=torch.float32)
        if net.label_dim:
            drawn = torch.nn.functional.one_hot(noise.randint(net.label_dim), net.label_dim).float()
            labels = drawn if labels is None else labels
    else:
        noise, eps0 = SeededNoise(seeds, device), None
    model = _sampling_model(net, sampler_cfg.compile is True, device)    # "auto" is decided by the caller
    amp = getattr(sampler_cfg, "amp", "none") == "bf16"        # network in bf16 autocast; the ODE is not

    def as_denoiser(network, lab):
        def D(x, sigma):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                return network(x.to(torch.float32), sigma.to(torch.float32).expand(x.shape[0]), lab)
        return D
    denoise = as_denoiser(model, labels)
    guide_fn = as_denoiser(guide, labels if guide_labels is None else guide_labels) if guide is not None else None

    s = sampler_cfg
    return edm_sampler(denoise, noise if eps0 is None else eps0, shape, steps=s.steps, sigma_min=s.sigma_min,
                       sigma_max=s.sigma_max, rho=s.rho, churn=s.churn, S_min=s.S_min, S_max=s.S_max,
                       S_noise=s.S_noise, solver=s.solver, guide=guide_fn, guidance=s.guidance, dtype=dtype,
                       churn_noise=noise).to(torch.float32)


def _sampling_model(net, compile_: bool, device):
    """The network, or its compiled form (made once per network and reused across batches; on a GPU
    mode reduce-overhead replays the sampler's fixed-shape steps as CUDA graphs)."""
    if not compile_:
        return net
    compiled = net.__dict__.get("_sampling_compiled")
    if compiled is None:
        from .devices import maybe_compile
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        compiled = maybe_compile(net, True, what="sampling", mode=mode)
        object.__setattr__(net, "_sampling_compiled", compiled)   # not a submodule: not in state_dict
    return compiled


# ----------------------------------------------------------------------------------------------
# Closed-form ideal denoiser of a Gaussian mixture (method.md 5 correctness check; also a test oracle).

def gmm_denoiser(weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> Denoiser:
    """D(x; sigma) = E[y | x] for y ~ sum_k w_k N(mu_k, S_k), x = y + sigma n, on flat (B, d) inputs."""
    weights, means, covs = weights.double(), means.double(), covs.double()
    d = means.shape[1]
    eye = torch.eye(d, dtype=torch.float64)

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], d).double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64) ** 2
        cov_x = covs + s2 * eye                                  # (K, d, d): covariance of x | k
        prec = torch.linalg.inv(cov_x)
        diff = x[:, None, :] - means[None]                       # (B, K, d)
        maha = torch.einsum("bkd,kde,bke->bk", diff, prec, diff)
        logdet = torch.linalg.slogdet(cov_x).logabsdet
        logp = weights.log()[None] - 0.5 * (maha + logdet[None])
        resp = logp.softmax(dim=1)                               # posterior p(k | x)
        # E[y | x, k] = mu_k + S_k (S_k + s^2 I)^-1 (x - mu_k)
        cond = means[None] + torch.einsum("kde,kef,bkf->bkd", covs, prec, diff)
        return (resp[..., None] * cond).sum(1).reshape(shape)

    return denoise
