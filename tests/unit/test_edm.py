"""method.md 1-3, 5: loss with learned uncertainty, learning-rate schedule, EDM sampler on a Gaussian mixture."""
import math

import pytest
import torch

from pipeline.config import NOISE_LAWS, loss_config
from pipeline.edm import SeededNoise, edm2_loss, edm_sampler, gmm_denoiser, learning_rate, sigma_steps
from pipeline.networks import Precond


def small_net(label_dim=0):
    torch.manual_seed(0)
    net = Precond(16, 1, label_dim, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                  channels_per_head=16)
    with torch.no_grad():                     # leave the zero-initialised state so F and u are non-trivial
        net.unet.out_gain.fill_(0.7)
    return net


def test_noise_laws_are_one_table_and_draw_their_distributions():
    from pipeline.edm import NOISE_LAWS as SAMPLERS
    from pipeline.edm import sample_sigma
    assert tuple(SAMPLERS) == NOISE_LAWS                     # the config's names are the sampler table's keys
    g = torch.Generator().manual_seed(0)
    ln = sample_sigma(20000, loss_config(P_mean=-0.8, P_std=1.6), g).log()
    assert abs(ln.mean().item() + 0.8) < 0.05 and abs(ln.std().item() - 1.6) < 0.05
    lu = sample_sigma(20000, loss_config(noise="loguniform", sigma_lo=0.01, sigma_hi=10.0), g).log()
    assert lu.min().item() >= math.log(0.01) and lu.max().item() <= math.log(10.0)
    assert abs(lu.mean().item() - (math.log(0.01) + math.log(10.0)) / 2) < 0.05      # uniform in ln(sigma)
    with pytest.raises(Exception, match="sigma_lo"):
        loss_config(noise="loguniform", sigma_lo=5.0, sigma_hi=1.0)


def test_loss_matches_spec_formula_and_u_gets_gradients():
    net = small_net()
    y = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5
    P_mean, P_std, sd = -0.8, 1.6, 0.5
    net.train()
    objective, stats = edm2_loss(net, y, None, loss_config(P_mean=P_mean, P_std=P_std, sigma_data=sd),
                                 generator=torch.Generator().manual_seed(7))
    objective.backward()
    g_u = net.logvar_linear.weight.grad
    assert g_u is not None and g_u.abs().sum() > 0, "u(sigma) must receive gradients"

    # Independent computation with the same random draws, straight from method.md 2. (Eval mode: the
    # training forward already normalized the stored weights, so the network computes the same.)
    net.eval()
    g = torch.Generator().manual_seed(7)
    sigma = torch.exp(torch.randn(6, generator=g) * P_std + P_mean)
    n = torch.randn(y.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        D, u = net(y + n, sigma, None, return_logvar=True)
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    l = lam.view(-1, 1, 1, 1) / torch.exp(u) * (D - y) ** 2 + u
    expected = torch.stack([l[i].sum() for i in range(6)]).mean()
    assert objective.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["loss"].item() == pytest.approx(l.mean().item(), rel=1e-6)
    assert stats["weighted_mse"].item() == pytest.approx((lam.view(-1, 1, 1, 1) * (D - y) ** 2).mean().item(), rel=1e-6)


def test_learning_rate_schedule_points():
    kw = dict(batch_size=2048, ref_lr=0.012, ref_batches=70000, rampup_nimg=10_000_000)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5_000_000, **kw) == pytest.approx(0.006)                       # half-way up the ramp
    assert learning_rate(10_000_000, **kw) == pytest.approx(0.012)                      # ramp done, t < ref_batches
    assert learning_rate(70000 * 2048, **kw) == pytest.approx(0.012)                    # exactly at ref_batches
    assert learning_rate(4 * 70000 * 2048, **kw) == pytest.approx(0.006)               # 1/sqrt(4)
    assert learning_rate(100 * 70000 * 2048, **kw) == pytest.approx(0.0012)            # 1/sqrt(100)
    # Counted in images: the same nimg with a 2x batch is half as many iterations.
    assert learning_rate(4 * 70000 * 2048, batch_size=4096, ref_lr=0.012, ref_batches=70000) == pytest.approx(0.012 / math.sqrt(2))


def test_sigma_steps_and_seeded_noise():
    t = sigma_steps(18)
    assert len(t) == 19 and t[0] == pytest.approx(80) and t[17] == pytest.approx(0.002) and t[18] == 0
    assert torch.all(t[:-1] > t[1:])
    a = SeededNoise([3, 4, 5]).randn([2, 2])
    b = torch.cat([SeededNoise([3]).randn([2, 2]), SeededNoise([4, 5]).randn([2, 2])])
    assert torch.equal(a, b)


def _mixture():
    def rot(a):
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    mu = torch.tensor([[-1.5, -0.6], [1.5, -0.6], [0.0, 1.6]], dtype=torch.float64)
    covs = torch.stack([rot(a) @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ rot(a).T
                        for a, d in [(0.3, [0.36, 0.16]), (1.0, [0.25, 0.12]), (-0.5, [0.30, 0.10])]])
    return w, mu, covs


def test_churn_and_guidance_paths():
    w, mu, covs = _mixture()
    D = gmm_denoiser(w, mu, covs)
    noise = SeededNoise(range(64))
    a = edm_sampler(D, noise, (2,), steps=8, churn=10.0, S_min=0.05, S_max=50)
    b = edm_sampler(D, SeededNoise(range(64)), (2,), steps=8, churn=10.0, S_min=0.05, S_max=50)
    c = edm_sampler(D, SeededNoise(range(64)), (2,), steps=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # Guidance with w = 1 or a guide equal to the model changes nothing.
    g1 = edm_sampler(D, SeededNoise(range(8)), (2,), steps=8, guide=D, guidance=2.0)
    g0 = edm_sampler(D, SeededNoise(range(8)), (2,), steps=8)
    assert torch.allclose(g1, g0)
    with pytest.raises(ValueError, match="solver"):
        edm_sampler(D, SeededNoise([0]), (2,), solver="rk4")


def _gaussian_denoiser(mu: float, s: float):
    """The ideal denoiser of N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    def D(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return D


def test_guided_sampler_integrates_the_guided_denoiser():
    """method.md 5: with a guide D_g and weight w the sampler integrates D_w = D_g + w (D - D_g); w = 1
    reproduces the unguided samples bit for bit; the guide is evaluated only when w != 1."""
    D, Dg = _gaussian_denoiser(1.0, 0.5), _gaussian_denoiser(-0.5, 1.5)
    calls = {"D": 0, "g": 0}

    def counted(f, key):
        def g(x, sigma):
            calls[key] += 1
            return f(x, sigma)
        return g
    for w in (0.0, 1.5, 3.0):
        Dw = lambda x, sigma, w=w: Dg(x, sigma) + w * (D(x, sigma) - Dg(x, sigma))   # noqa: E731
        guided = edm_sampler(D, SeededNoise(range(16)), (3,), steps=12, guide=Dg, guidance=w)
        explicit = edm_sampler(Dw, SeededNoise(range(16)), (3,), steps=12)
        assert torch.allclose(guided, explicit, rtol=0, atol=1e-12), w
    # The samples follow the guided Gaussian: D_w is the ideal denoiser of a Gaussian only in special
    # cases, but with w = 0 the result is the guide's distribution N(-0.5, 1.5^2).
    only_guide = edm_sampler(D, SeededNoise(range(4000)), (1,), steps=32, guide=Dg, guidance=0.0)
    assert abs(only_guide.mean().item() + 0.5) < 0.1 and abs(only_guide.std().item() - 1.5) < 0.1
    # w = 1: bit for bit the unguided result, and the guide never runs.
    plain = edm_sampler(counted(D, "D"), SeededNoise(range(16)), (3,), steps=12)
    n_plain = calls["D"]
    w1 = edm_sampler(counted(D, "D"), SeededNoise(range(16)), (3,), steps=12, guide=counted(Dg, "g"), guidance=1.0)
    assert torch.equal(plain, w1) and calls["g"] == 0 and calls["D"] == 2 * n_plain
    # w != 1: the guide runs exactly once per evaluation of the model.
    calls.update(D=0, g=0)
    edm_sampler(counted(D, "D"), SeededNoise(range(16)), (3,), steps=12, guide=counted(Dg, "g"), guidance=2.0)
    assert calls["g"] == calls["D"] == n_plain
