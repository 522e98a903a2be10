"""Speed switches keep the numerics: the loss after N steps stays within tolerance of the plain path."""
import json

import pytest
import torch
from conftest import tiny_params
from safetensors.torch import load_file

from pipeline import config as C
from pipeline.edm import sample_images
from pipeline.networks import build_network
from pipeline.training import TrainHooks, train

STEPS = {"duration_nimg": 96, "checkpoint_nimg": 96, "status_nimg": 16, "amp": "none"}   # float32 is "plain"


def losses(tmp_path, fmnist, name, **switches):
    params = tiny_params(tmp_path / name, fmnist, tracking={"enabled": False}, train={**STEPS, **switches})
    train(C.load_config(params), TrainHooks(progress=False))
    return logged_losses(tmp_path / name / "run")


def logged_losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, fmnist):
    d = tmp_path_factory.mktemp("plain")
    losses(d, fmnist, "plain")
    return d / "plain"


@pytest.fixture(scope="module")
def plain(plain_dir):
    return logged_losses(plain_dir / "run")


def test_async_snapshots_and_prefetch_change_nothing(tmp_path, fmnist, plain, plain_dir):
    """Background snapshot writes and batches assembled ahead: the same losses and the same
    snapshot files, bit for bit (they move work in time, not in value)."""
    got = losses(tmp_path, fmnist, "async", async_snapshots=True, prefetch_batches=3)
    assert got == plain
    ref = sorted(p.name for p in (plain_dir / "run" / "snapshots").glob("phema-*.safetensors"))
    new = sorted(p.name for p in (tmp_path / "async" / "run" / "snapshots").glob("phema-*.safetensors"))
    assert new == ref and len(ref) == 2 * 3
    for name in ref:
        a = load_file(plain_dir / "run" / "snapshots" / name)
        b = load_file(tmp_path / "async" / "run" / "snapshots" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("switches, tol", [
    ({"channels_last": True}, 1e-4),
    ({"fused_adam": True}, 1e-4),
    ({"amp": "bf16"}, 0.05),          # bf16 has ~3 significant digits: a looser bound
])
def test_switch_keeps_the_loss(tmp_path, fmnist, plain, switches, tol):
    got = losses(tmp_path, fmnist, "switch", **switches)
    rel = [abs(a - b) / max(abs(b), 1e-3) for a, b in zip(got, plain)]
    print(f"{switches}: max relative loss difference over {len(rel)} logged steps {max(rel):.2e}")
    assert len(got) == len(plain) and max(rel) < tol


@pytest.mark.slow
def test_torch_compile_keeps_the_loss_or_falls_back(tmp_path, fmnist, plain, capsys):
    got = losses(tmp_path, fmnist, "compiled", compile=True)
    out = capsys.readouterr().out
    rel = max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(got, plain))
    print(f"compile: max relative loss difference {rel:.2e}; fallback used: {'torch.compile failed' in out}")
    assert rel < 1e-3


@pytest.mark.integration
@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    """sampler.compile (torch.compile; CUDA graphs on a GPU) gives the eager sampler's images."""
    cfg = C.resolve({}, {"network.model_channels": 16, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                         "network.attn_resolutions": [16], "network.channels_per_head": 16, "sampler.steps": 3})
    torch.manual_seed(0)
    net = build_network(cfg, 32, 1, 10).eval()
    labels = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    eager = sample_images(net, list(range(4)), labels, cfg.sampler)
    compiled_cfg = cfg.sampler.model_copy(update={"compile": True})
    got = sample_images(net, list(range(4)), labels, compiled_cfg)
    again = sample_images(net, list(range(4)), labels, compiled_cfg)     # reuses the compiled network
    rel = ((got - eager).norm() / eager.norm()).item()
    print(f"compiled sampler: relative L2 difference {rel:.2e}; fell back: {net._sampling_compiled.failed}")
    assert rel < 1e-4 and torch.equal(got, again)
    assert not any("_sampling_compiled" in k for k in net.state_dict())
