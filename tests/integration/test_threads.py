"""Issue #34 item 6: torch uses the CPUs this process was given (affinity, cgroup quota,
SLURM_CPUS_PER_TASK, a Ray trial's CPUs: the smallest), said by `pipeline info`."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(prefix, code, env=None):
    return subprocess.run([*prefix, sys.executable, "-c", code], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_taskset_one_cpu_is_one_thread():
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "pipeline", "info"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cpu: 1 thread (affinity 1)" in r.stdout, r.stdout
    # every command line goes through cli.run, which sets the threads before any work
    r = _run(["taskset", "-c", "0"], "import torch; from pipeline.cli import run; "
                                     "run('x', lambda: print('threads', torch.get_num_threads()))")
    assert "threads 1" in r.stdout, r.stdout + r.stderr


@pytest.mark.integration
def test_slurm_cpus_per_task_and_ray_trial_cpus():
    code = "import torch; from pipeline.devices import use_given_cpus; print('threads', use_given_cpus())"
    assert "threads 1" in _run([], code, {"SLURM_CPUS_PER_TASK": "1"}).stdout
    assert "threads 1" in _run([], code, {"EDM2_TRIAL_CPUS": "1"}).stdout
    from pipeline.devices import cpu_limits
    assert min(cpu_limits().values()) >= 1
