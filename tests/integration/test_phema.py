"""method.md 6: power-function EMA tracking, snapshots and post-hoc reconstruction."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.phema import PowerFunctionEMA


@pytest.mark.integration
@pytest.mark.slow
def test_memory_bounded_by_targets_plus_two_models(tmp_path):
    """8 targets from 50 snapshots of an 8M-parameter model: peak RSS growth <= (8 + 2) models
    (8 float32 accumulators + chunk buffers; on the memory-mapped fallback 2 half-precision snapshots)."""
    n_params = 8 * 2 ** 20
    model_bytes = n_params * 4                          # one float32 model copy
    net = torch.nn.Module()
    for i in range(4):
        net.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n_params // 4)))
    ema = PowerFunctionEMA(net, [0.05, 0.10])
    for i in range(1, 26):
        ema.update(net, i * 1000, 1000)
        ema.save_snapshots(tmp_path, i * 1000, {"model_key": "m", "snapshot_nimg": 1000})
    assert len(list(tmp_path.glob("phema-*.safetensors"))) == 50
    # A fresh process that only reconstructs, so its peak RSS is the reconstruction's.
    script = textwrap.dedent("""
        import gc, sys
        from pipeline.reconstruction import reconstruct
        def kib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")    # reset the peak (VmHWM) to the current RSS
        before = kib("VmRSS:")
        reconstruct(sys.argv[1], [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15, 0.2], batch_targets=8)
        print(before, kib("VmHWM:"))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=os.getcwd())
    before, peak = map(int, out.stdout.split()[-2:])
    grown = peak - before
    print(f"peak growth {grown / 2**20:.0f} MiB = {grown / model_bytes:.2f} model copies (limit 10)")
    assert grown <= 10 * model_bytes
    assert grown >= 8 * model_bytes * 0.9, "the 8 accumulators must show up: the measurement is off"
