"""Every benchmark runs on CPU in its reduced (--smoke) mode and writes its JSON (no timing asserts)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["train", "sample", "reconstruct", "fid", "sweep_overhead", "sweep_scale"])
def test_benchmark_smoke(name, tmp_path, fmnist):
    extra = ["--dataset-dir", str(fmnist["train"][0].parent)] if name.startswith("sweep") else []
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--device", "cpu", "--out",
                        str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (out,) = tmp_path.glob(f"{name}-smoke-cpu.json")
    rec = json.loads(out.read_text())
    assert rec["smoke"] and rec["figures"] and rec["command"].startswith(f"python -m benchmarks.{name}")
