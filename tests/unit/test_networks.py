"""method.md 4: magnitude-preserving primitives, forced weight normalization, layout, fresh denoiser."""
import math

import pytest
import torch

from pipeline import config as C
from pipeline.networks import MPConv, MPFourier, Precond, build_network, count_parameters, mp_cat, mp_silu, mp_sum, normalize


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_mp_primitives_keep_unit_rms(gen):
    a = torch.randn(256, 512, generator=gen)
    b = torch.randn(256, 256, generator=gen)
    assert rms(mp_silu(a)) == pytest.approx(1, rel=0.02)
    for t in (0.3, 0.5):
        assert rms(mp_sum(a, torch.randn(256, 512, generator=gen), t)) == pytest.approx(1, rel=0.02)
    for t in (0.3, 0.5, 0.7):     # different channel counts on purpose
        assert rms(mp_cat(a, b, dim=1, t=t)) == pytest.approx(1, rel=0.02)
    assert rms(MPFourier(4096)(torch.randn(64, generator=gen))) == pytest.approx(1, rel=0.02)
    lin = MPConv(512, 384)
    assert rms(lin(a)) == pytest.approx(1, rel=0.02)
    conv = MPConv(64, 96, (3, 3))
    y = conv(torch.randn(8, 64, 48, 48, generator=gen))
    assert rms(y[:, :, 1:-1, 1:-1]) == pytest.approx(1, rel=0.02)   # interior: zero padding shrinks borders
    assert rms(normalize(torch.randn(4, 32, 8, 8, generator=gen) * 7, dim=1)) == pytest.approx(1, rel=1e-3)


def test_mp_gain_scales_output(gen):
    lin = MPConv(512, 256)
    x = torch.randn(128, 512, generator=gen)
    assert rms(lin(x, gain=3.0)) == pytest.approx(3 * rms(lin(x)), rel=1e-5)
    assert lin(x, gain=0.0).abs().max().item() == 0.0


def test_forced_weight_normalization_survives_large_adam_steps(gen):
    net = Precond(16, 2, 0, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                  channels_per_head=16)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    x = torch.randn(4, 2, 16, 16, generator=gen)
    drifted = 0.0
    for _ in range(5):
        opt.zero_grad()
        out, logvar = net(x + torch.randn(x.shape, generator=gen), torch.full([4], 1.3), return_logvar=True)
        (out.square().mean() + logvar.mean()).backward()
        opt.step()
        drifted = max(drifted, max(abs(rms(m.weight[i]) - 1) for m in net.modules() if isinstance(m, MPConv)
                                   for i in range(m.weight.shape[0])))
    assert drifted > 0.05, "lr too small to test anything: weights never left unit norm"
    net(x, torch.full([4], 1.3), return_logvar=True)   # a training-mode forward re-normalizes stored weights
    for name, m in net.named_modules():
        if isinstance(m, MPConv):
            row_rms = m.weight.detach().flatten(1).pow(2).mean(1).sqrt()
            assert torch.allclose(row_rms, torch.ones_like(row_rms), atol=1e-3), name


@pytest.mark.parametrize("res, ch, labels", [(32, 1, 10), (16, 3, 0), (8, 4, 5), (64, 3, 0)])
def test_fresh_denoiser_is_c_skip_x(res, ch, labels, gen):
    net = Precond(res, ch, labels, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[res // 2], channels_per_head=16)
    x = torch.randn(3, ch, res, res, generator=gen)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    lab = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]) % max(labels, 1), max(labels, 1)).float() if labels else None
    for mode in (net.train, net.eval):
        mode()
        d = net(x, sigma, lab)
        c_skip = (0.25 / (sigma ** 2 + 0.25)).reshape(-1, 1, 1, 1)
        assert torch.equal(d, c_skip * x)


def test_conditional_needs_labels_and_labels_matter(gen):
    net = Precond(16, 1, 4, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                  channels_per_head=16)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for m in net.modules():
            if hasattr(m, "emb_gain"):
                m.emb_gain.fill_(1.0)
    x = torch.randn(2, 1, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, torch.ones(2))
    eye = torch.eye(4)
    assert not torch.allclose(net(x, torch.ones(2), eye[[0, 0]]), net(x, torch.ones(2), eye[[1, 1]]))


def test_edm2_parameter_counts():
    xs = C.resolve({"preset": "img64-xs"})
    net = build_network(xs, 64, 3, 1000)
    assert count_parameters(net) == pytest.approx(124.7e6, rel=0.01)
    del net
    s = C.resolve({"preset": "img64-s"})
    assert count_parameters(build_network(s, 64, 3, 1000)) == pytest.approx(280.2e6, rel=0.01)


def test_small_default_builds_and_backpropagates(root, gen):
    cfg = C.load_config(root / "params.yaml")
    net = build_network(cfg, 32, 1, 10)
    x = torch.randn(2, 1, 32, 32, generator=gen)
    d, logvar = net(x, torch.tensor([0.5, 5.0]), torch.eye(10)[[3, 7]], return_logvar=True)
    (d.square().mean() + logvar.sum()).backward()
    assert net.unet.out_gain.grad is not None and net.unet.out_gain.grad.abs() > 0
    assert math.isfinite(d.sum().item())
