"""The method's options as small tables, read by the config schema (the names a field accepts) and by
the code that runs them. Adding one: an entry here, its parameters in config/schema.py (a noise law:
a class in LOSS_LAWS, the loss section's tagged union), its test in
tests/unit/test_tables.py, its line in docs/method.md. Torch is imported inside the functions, so the
schema loads without it.

- NOISE_LAWS (method.md 2): `loss.noise` -> how training draws its noise levels sigma.
- METRIC_NAMES (method.md 8): `metrics.names` -> the entries of metrics.METRICS (the table itself
  imports torch; tests/unit/test_tables.py checks the two agree).
- SOLVERS (method.md 5): `sampler.solver` -> its network evaluations per step count and whether it
  applies the second-order correction. Every sampler field reaches the FID record (records.sampler_record).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def _lognormal(n: int, p, generator, device):
    """ln(sigma) ~ Normal(P_mean, P_std^2) (EDM2 eq. 14)."""
    import torch
    return (torch.randn(n, generator=generator, device=device) * p.P_std + p.P_mean).exp()


def _loguniform(n: int, p, generator, device):
    """ln(sigma) ~ Uniform(ln sigma_lo, ln sigma_hi)."""
    import torch
    lo, hi = math.log(p.sigma_lo), math.log(p.sigma_hi)
    return (torch.rand(n, generator=generator, device=device) * (hi - lo) + lo).exp()


NOISE_LAWS: dict[str, Callable] = {"lognormal": _lognormal, "loguniform": _loguniform}


def sample_sigma(n: int, noise, generator=None, device="cpu"):
    """n noise levels from the law `noise.noise` (a loss section: config.LOSS_LAWS)."""
    return NOISE_LAWS[noise.noise](n, noise, generator, device)


@dataclass(frozen=True)
class Solver:
    nfe: Callable[[int], int]            # network evaluations for `steps` steps (the last step has no correction)
    second_order: bool                   # Heun's correction after each Euler step but the last


SOLVERS: dict[str, Solver] = {
    "heun": Solver(nfe=lambda steps: 2 * steps - 1, second_order=True),    # EDM Algorithm 2
    "euler": Solver(nfe=lambda steps: steps, second_order=False),
}


METRIC_NAMES = ("fid", "fd_dinov2", "precision_recall")    # metrics.METRICS, in its order
