"""Issue #34 item 6: torch uses the CPUs this process was given (affinity, cgroup quota,
SLURM_CPUS_PER_TASK, a Ray trial's CPUs: the smallest), said by `pipeline info`."""
import os


def test_the_limit_is_said_once_with_a_busy_machine_warning(monkeypatch):
    from pipeline import devices
    monkeypatch.setattr(devices, "_SAID", [])
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 0.0, 0.0))
    said = []
    devices.use_given_cpus(log=said.append)
    devices.use_given_cpus(log=said.append)
    assert len(said) == 2 and said[0].startswith("cpu: ") and "warning: the machine's load (1000.0)" in said[1]
