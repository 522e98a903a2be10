"""The GPU paths: each check runs on the CPU too (same code, its CPU counterpart), and on CUDA where a
device exists; the CUDA cases are marked `gpu` and skip with a reason elsewhere.
`scripts/gpu_check.sh` runs the CUDA cases and the GPU benchmarks on a GPU machine."""
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from unit.test_gpu import CUDA, DEVICES, tiny_cfg, tiny_net  # noqa: F401, F811 (shared with the unit tier)


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
            "from unit import test_gpu\n"
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
