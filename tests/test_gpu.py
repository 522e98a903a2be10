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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_acceptance_steps_import_without_the_cluster_stack():
    """What the GPU node lacks (ray, mlflow, dvc, submitit, clean-fid, optuna, the Inception wheel) is never
    imported by the acceptance steps: every step's modules load with those packages blocked."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_env import CLUSTER_STACK
    code = ("import sys, importlib.abc, importlib.machinery\n"
            f"BLOCK = {CLUSTER_STACK!r}\n"
            "class Absent(importlib.abc.Loader):\n"
            "    def create_module(self, spec):\n"
            "        raise ModuleNotFoundError(f'blocked: {spec.name}', name=spec.name)\n"
            "    def exec_module(self, module):\n"
            "        pass\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCK:\n"
            "            return importlib.machinery.ModuleSpec(name, Absent())\n"
            "sys.meta_path.insert(0, Block())\n"
            "try:\n    import ray\nexcept ModuleNotFoundError:\n    pass\nelse:\n    sys.exit('not blocked')\n"
            "import benchmarks.train, benchmarks.sample, benchmarks.matmul_peak, benchmarks.common\n"
            "import pipeline.config, pipeline.networks, pipeline.edm, pipeline.fid, pipeline.training\n"
            "import pipeline.evaluate, pipeline.phema, pipeline.data.encoded, pipeline.io, pipeline.devices\n"
            "sys.path.insert(0, 'tests')\n"
            "import test_gpu\n"
            "test_gpu.inception('cpu')\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.integration
def test_gpu_check_dry_run_lists_the_acceptance_steps():
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and [x.split()[0] for x in lines] == ["gpu-tests", "matmul-peak", "train", "sample",
                                                                   "eval-device", "nccl-ddp"], r.stdout + r.stderr
    budgets = [int(x.split("(")[1].split()[0]) for x in lines]
    assert sum(budgets) <= 7 * 60                                # the whole run fits 7 minutes (a rerun fits 15)
    assert "-m gpu" in lines[0] and "benchmarks.train --device cuda --amp" in lines[2] and "xs64" in lines[2]
    assert "--measured-peak" in lines[2] and "cudagraph" in lines[3]


@pytest.mark.slow
def test_gpu_acceptance_rehearsal_on_the_cpu(tmp_path):
    """scripts/gpu_bundle.sh && scripts/gpu_check.sh --rehearse: a venv with only the node's packages, the
    bundle installed offline, every step on the CPU at the smallest shapes; one JSON per step and a log."""
    import json
    if not (ROOT / "gpu-bundle" / "requirements.txt").is_file():
        b = subprocess.run(["bash", str(ROOT / "scripts/gpu_bundle.sh")], capture_output=True, text=True, timeout=300)
        if b.returncode != 0 and ("Could not" in b.stderr or "connection" in b.stderr.lower()):
            pytest.skip(f"no package index reachable to build the bundle: {b.stderr[-300:]}")
        assert b.returncode == 0, b.stderr[-2000:]
    manifest = json.loads((ROOT / "gpu-bundle" / "manifest.json").read_text())
    assert manifest["total_bytes"] <= 10 << 20 and "3.12" in manifest["python_versions"]
    assert not any(w["file"].startswith(("torch", "ray", "mlflow")) for w in manifest["wheels"])
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--rehearse"], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "OUT": str(out), "PY": sys.executable})
    print(r.stdout[-3000:])
    assert "installed gpu-bundle/ offline" in r.stdout, r.stdout + r.stderr[-2000:]
    steps = {p.name: json.loads(p.read_text()) for p in out.glob("gpu_check-*.json")}
    assert len(steps) == 6 and (out / "gpu_check.log").is_file()
    bad = {k: v["status"] for k, v in steps.items() if v["status"] != "ok"}
    assert r.returncode == 0 and not bad, (bad, (out / "gpu_check.log").read_text()[-4000:])
    train = steps["gpu_check-train.json"]["results"][0]["figures"]
    assert train["measured_peak_tflops"] > 0 and {x["shape"] for x in train["runs"]} == {"xs64"}
    assert all(x["mfu_measured_peak"] is not None for x in train["runs"])
    modes = {x["mode"] for x in steps["gpu_check-sample.json"]["results"][0]["figures"]["runs"]}
    assert modes == {"eager", "compile", "cudagraph"}
