"""The GPU paths: each check runs on the CPU too (same code, its CPU counterpart), and on CUDA where a
device exists; the CUDA cases are marked `gpu` and skip with a reason elsewhere.
`scripts/gpu_check.sh` runs the CUDA cases and the GPU benchmarks on a GPU machine."""
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pipeline import config as C
from pipeline.networks import build_network

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")])
DEVICES = ["cpu", CUDA]


def tiny_cfg(**over):
    return C.resolve({}, {"network.model_channels": 16, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                          "network.attn_resolutions": [16], "network.channels_per_head": 16, "sampler.steps": 3,
                          **over})


def tiny_net(device):
    torch.manual_seed(0)
    net = build_network(tiny_cfg(), 32, 1, 10).to(device)
    with torch.no_grad():
        net.unet.out_gain.fill_(0.5)                      # not the zero-initialised identity
    return net


def batch(device, n=8):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 1, 32, 32, generator=g) * 0.5).to(device)
    sigma = torch.exp(torch.randn(n, generator=g)).to(device)
    labels = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float().to(device)
    return x, sigma, labels


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_stays_close_to_float32(device):
    from pipeline.edm import edm2_loss
    net = tiny_net(device)
    x, sigma, labels = batch(device)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    plain, _ = edm2_loss(net, x, labels, tiny_cfg().loss, sigma=sigma, eps=eps)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        half, _ = edm2_loss(net, x, labels, tiny_cfg().loss, sigma=sigma, eps=eps)
    assert abs(half.item() - plain.item()) / abs(plain.item()) < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gives_the_same_denoiser(device):
    net = tiny_net(device).eval()
    x, sigma, labels = batch(device)
    with torch.no_grad():
        a = net(x, sigma, labels)
        b = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sigma, labels)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adam_equals_foreach(device):
    nets = [tiny_net(device), tiny_net(device)]
    opts = [torch.optim.Adam(nets[0].parameters(), lr=0.01, betas=(0.9, 0.99), foreach=True),
            torch.optim.Adam(nets[1].parameters(), lr=0.01, betas=(0.9, 0.99), fused=True)]
    x, sigma, labels = batch(device)
    for net, opt in zip(nets, opts):
        for _ in range(3):
            opt.zero_grad()
            net(x, sigma, labels).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampler_matches_eager(device):
    """sampler.compile: torch.compile, with CUDA graphs (mode reduce-overhead) on a GPU."""
    from pipeline.edm import sample_images
    cfg = tiny_cfg()
    net = tiny_net(device).eval()
    labels = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float().to(device)
    eager = sample_images(net, list(range(4)), labels, cfg.sampler, device=device)
    got = sample_images(net, list(range(4)), labels, cfg.sampler.model_copy(update={"compile": True}), device=device)
    assert ((got - eager).norm() / eager.norm()).item() < 1e-3


@pytest.mark.parametrize("backend, device", [("gloo", "cpu"), pytest.param("nccl", "cuda", marks=CUDA.marks)])
def test_ddp_in_one_process(backend, device):
    """The collective the training loop uses (all_reduce of the logged loss), in a one-process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import os, torch, torch.distributed as dist\n"
            f"dist.init_process_group('{backend}', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
            f"t = torch.tensor([2.0], device='{device}')\n"
            f"dist.all_reduce(t)\n"
            f"assert t.item() == 2.0\n"
            f"dist.destroy_process_group()\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
def test_features_on_the_device_equal_the_cpu(device):
    """Evaluation on the device: the Inception features agree with the CPU's."""
    import numpy as np

    from pipeline.fid import array_features, load_feature_net
    imgs = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1), dtype=np.uint8)
    cpu = array_features(imgs, load_feature_net("fid-helper", "cpu"))
    dev = array_features(imgs, load_feature_net("fid-helper", device))
    assert np.abs(dev - cpu).max() / np.abs(cpu).max() < 1e-3


def test_gpu_check_dry_run_lists_the_acceptance_steps():
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=30)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 3
    assert "-m gpu tests/test_gpu.py" in lines[0]
    assert "benchmarks.train --device cuda --amp" in lines[1] and "xs64" in lines[1]
    assert "benchmarks.sample --device cuda" in lines[2]
