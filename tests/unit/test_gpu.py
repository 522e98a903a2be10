"""The GPU paths: each check runs on the CPU too (same code, its CPU counterpart), and on CUDA where a
device exists; the CUDA cases are marked `gpu` and skip with a reason elsewhere.
`scripts/gpu_check.sh` runs the CUDA cases and the GPU benchmarks on a GPU machine."""
import pytest
import torch

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
def test_channels_last_gives_the_same_denoiser(device, no_tf32):
    net = tiny_net(device).eval()
    x, sigma, labels = batch(device)
    with torch.no_grad():
        a = net(x, sigma, labels)
        b = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sigma, labels)
    # relative to the norm, as the other device checks: an H200 (TF32 off) gave 5.3e-4 in the largest element,
    # cuDNN choosing other algorithms for the other layout; a wrong layout gives O(1)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 1e-3, (rel, (a - b).abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adam_equals_foreach(device):
    """The same seeded gradients through both Adam kernels (gradients from the network itself would differ
    by the convolutions' own rounding, and Adam turns a near-zero gradient's sign into a full step)."""
    params = [[p.detach().clone().requires_grad_(True) for p in tiny_net(device).parameters()] for _ in range(2)]
    opts = [torch.optim.Adam(params[0], lr=0.01, betas=(0.9, 0.99), foreach=True),
            torch.optim.Adam(params[1], lr=0.01, betas=(0.9, 0.99), fused=True)]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in params[0]]
        for ps, opt in zip(params, opts):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(*params):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a - b).abs().max().item()


def inception(device):
    """The FID Inception when its weights are installed; else (an air-gapped GPU node) torchvision's
    Inception-v3 of the same architecture with seeded random weights: this checks CPU = device, not
    the weights."""
    from pipeline.fid import fid_helper_weights, load_feature_net
    if fid_helper_weights() is not None:
        return load_feature_net("fid-helper", device).fn
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).eval()
    net.fc = torch.nn.Identity()                          # the 2048-d pool features
    net = net.to(device)

    def fn(x):
        with torch.no_grad():
            return net((x.to(device, torch.float32) - 128) / 128)
    return fn


@pytest.fixture
def no_tf32():
    """Plain float32 on the GPU for an equality check (TF32 convolutions and matmuls off), restored after."""
    mods = (torch.backends.cuda.matmul, torch.backends.cudnn)
    name = "fp32_precision" if hasattr(torch.backends.cudnn, "fp32_precision") else "allow_tf32"   # PyTorch >= 2.9
    before = [getattr(m, name) for m in mods]
    for m in mods:
        setattr(m, name, "ieee" if name == "fp32_precision" else False)
    yield
    for m, v in zip(mods, before):
        setattr(m, name, v)


@pytest.mark.parametrize("device", DEVICES)
def test_features_on_the_device_equal_the_cpu(device, no_tf32):
    """Evaluation on the device: Inception features of the same images agree with the CPU's (float32,
    TF32 off) within 5e-3 relative (norm of the difference over the norm). The Inception here has seeded random
    weights (the real ones are a download), whose activations grow to ~1e11 through its ~100 layers and amplify
    float32 rounding: an H200 measured 1.5e-3 in the largest element; a wrong layout or device path gives O(1)."""
    imgs = torch.from_numpy(__import__("numpy").random.default_rng(0).integers(0, 255, (4, 3, 299, 299),
                                                                               dtype="uint8"))
    cpu = inception("cpu")(imgs).cpu()
    dev = inception(device)(imgs).cpu()
    assert cpu.shape == (4, 2048)
    rel = ((dev - cpu).norm() / cpu.norm()).item()
    assert rel < 5e-3, rel


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_on_the_device_equals_the_cpu(device, no_tf32):
    """The sampler on the device gives the CPU's images (per-image seeded noise drawn on the CPU; the
    device integrates in float32, the CPU in float64) within 1e-3 relative."""
    from pipeline.edm import sample_images
    cfg = tiny_cfg()
    labels = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    cpu = sample_images(tiny_net("cpu").eval(), list(range(4)), labels, cfg.sampler, device="cpu")
    dev = sample_images(tiny_net(device).eval(), list(range(4)), labels.to(device), cfg.sampler, device=device).cpu()
    rel = ((dev - cpu).norm() / cpu.norm()).item()
    assert rel < 1e-3, rel
