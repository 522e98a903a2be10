"""method.md 1-3, 5: loss with learned uncertainty, learning-rate schedule, EDM sampler on a Gaussian mixture."""
import math

import pytest
import torch
from unit.test_edm import _mixture  # noqa: F401, F811 (shared with the unit tier)

from pipeline.edm import edm_sampler, gmm_denoiser


def _fit(x, w, mu, covs):
    """Assign samples to components by posterior; return fitted weights, means, covariances."""
    diff = x[:, None] - mu[None]
    logp = w.log() - 0.5 * (torch.einsum("bkd,kde,bke->bk", diff, torch.linalg.inv(covs), diff)
                            + torch.linalg.slogdet(covs).logabsdet)
    k = logp.argmax(1)
    return [((k == j).double().mean(), x[k == j].mean(0), torch.cov(x[k == j].T)) for j in range(len(w))]


def _kl_discrepancy(x, w, mu, covs):
    """KL(true mixture parameters || fitted ones): weight KL + weighted per-component Gaussian KL."""
    total = 0.0
    for j, (wf, mf, cf) in enumerate(_fit(x, w, mu, covs)):
        inv = torch.linalg.inv(cf)
        d = mf - mu[j]
        kl = 0.5 * (torch.trace(inv @ covs[j]) + d @ inv @ d - 2 + torch.linalg.slogdet(cf).logabsdet
                    - torch.linalg.slogdet(covs[j]).logabsdet)
        total += (w[j] * (w[j] / wf).log() + w[j] * kl).item()
    return total


def _exact_samples(n, seed, w, mu, covs):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return mu[k] + torch.einsum("bde,be->bd", torch.linalg.cholesky(covs)[k], z)


@pytest.mark.slow
def test_heun_reproduces_gaussian_mixture_and_beats_euler():
    w, mu, covs = _mixture()
    D = gmm_denoiser(w, mu, covs)
    n, seeds = 1000, range(4)
    # "Sampling error": the spread of the same discrepancy for exact draws of the same size.
    exact = sorted(_kl_discrepancy(_exact_samples(n, 100 + s, w, mu, covs), w, mu, covs) for s in range(100))
    q99 = exact[98]

    def run(solver, steps):
        out = []
        for s in seeds:
            eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            out.append(edm_sampler(D, eps, steps=steps, solver=solver))
        return out

    heun = run("heun", 18)        # NFE 35
    euler = run("euler", 35)      # NFE 35
    for x in heun:                # component weights within 3 standard errors
        for j, (wf, mf, cf) in enumerate(_fit(x, w, mu, covs)):
            se = math.sqrt(w[j] * (1 - w[j]) / n)
            assert abs(wf - w[j]) < 3 * se
            assert torch.linalg.norm(mf - mu[j]) < 0.12 and torch.linalg.norm(cf - covs[j]) < 0.25 * torch.linalg.norm(covs[j])
    heun_kl = sum(_kl_discrepancy(x, w, mu, covs) for x in heun) / len(heun)
    euler_kl = sum(_kl_discrepancy(x, w, mu, covs) for x in euler) / len(euler)
    assert heun_kl < q99, f"Heun NFE 35: {heun_kl:.4f} outside sampling error (exact q99 {q99:.4f})"
    assert euler_kl > 1.5 * heun_kl, f"Euler NFE 35 ({euler_kl:.4f}) not measurably worse than Heun ({heun_kl:.4f})"
    # And the solver converges: many Heun steps get closer still.
    fine = _kl_discrepancy(edm_sampler(D, torch.randn(n, 2, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64), steps=128), w, mu, covs)
    assert fine < _kl_discrepancy(heun[0], w, mu, covs)
