"""Speed switches keep the numerics: the loss after N steps stays within tolerance of the plain path."""
import json

import pytest

from conftest import tiny_params
from pipeline import config as C
from pipeline.training import train

STEPS = {"duration_nimg": 96, "checkpoint_nimg": 96, "status_nimg": 16}


def losses(tmp_path, fmnist, name, **switches):
    params = tiny_params(tmp_path / name, fmnist, tracking={"enabled": False}, train={**STEPS, **switches})
    train(C.load_config(params), progress=False)
    rows = [json.loads(l) for l in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, fmnist):
    return losses(tmp_path_factory.mktemp("plain"), fmnist, "plain")


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
