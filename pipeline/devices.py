"""Where the work runs: the device rule (`auto`: a GPU when one is visible, else the CPU; `cpu`,
`cuda`, `cuda:N`), the distributed context of torchrun / srun / Ray Train, the CPUs a job was given,
and the one compile policy of training and sampling (when torch.compile pays, with a fallback)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field as _field

from .errors import PipelineError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class DeviceError(PipelineError, RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Distributed context (torchrun sets the environment; one process without it).

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: object = _field(default_factory=lambda: __import__("torch").device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str = "auto", device=None, field: str = "train.device") -> Dist:
    """Ranks from torchrun's (or srun's, or Ray Train's) environment; one process without it.
    `device` overrides the choice by LOCAL_RANK (Ray Train knows each worker's GPU)."""
    import torch
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():         # Ray Train's TorchTrainer set it up
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = pick_device(device_choice, field)
        if device.type == "cuda" and device.index is not None and world > 1:
            raise DeviceError(f"{field}={device_choice} picks one GPU, but this run has {world} processes "
                              f"(each takes cuda:LOCAL_RANK): set {field}=cuda or auto")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, device)


def pick_device(choice: str = "auto", field: str = "device"):
    """A torch.device for `choice`; a clear error naming `field` when the GPU asked for is not there."""
    import torch
    choice = str(choice)
    if not re.match(DEVICE_PATTERN, choice):
        raise DeviceError(f"{field}={choice!r}: expected auto, cpu, cuda or cuda:N")
    if choice == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(choice)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{field}={choice} but no CUDA device is visible (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{field}={choice} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


# ----------------------------------------------------------------------------------------------
# The CPUs this process was given: torch's threads follow them (a job uses what it got, no more).

def cpu_limits() -> dict[str, int]:
    """Each limit on this process's CPUs that is set: the affinity mask (taskset, SLURM's binding),
    the cgroup's CPU quota (containers, SLURM's cgroup plugin), a share per torchrun process on the node,
    the scheduler's CPUs per task, a Ray trial's CPUs (EDM2_TRIAL_CPUS, set by the sweep's trial), and
    OMP_NUM_THREADS when set."""
    import math
    out = {}
    try:
        out["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["cores"] = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            out["cgroup quota"] = max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        try:                                               # cgroup v1
            quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
            if quota > 0:
                out["cgroup quota"] = max(1, math.ceil(quota / period))
        except (OSError, ValueError):
            pass
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:                                          # torchrun's processes on this node share its CPUs
        out["per local rank"] = max(1, min(out.values()) // local)
    from .backends import job_env                         # the scheduler's variables are read there only
    per_task = job_env().cpus_per_task
    if per_task:
        out["cpus per task"] = per_task
    for name, var in (("Ray trial", "EDM2_TRIAL_CPUS"), ("OMP_NUM_THREADS", "OMP_NUM_THREADS")):
        try:                                               # a thread count set by the user or torchrun is a limit too
            if os.environ.get(var):
                out[name] = max(1, int(float(os.environ[var])))
        except ValueError:
            pass
    return out


_SAID: list[int] = []


def use_given_cpus(log=None) -> int:
    """torch's intra-op threads = the smallest CPU limit; with `log`, said once per process with where it
    comes from, and one warning line when the machine is already busier than its CPUs. Returns the threads."""
    import torch
    limits = cpu_limits()
    n = min(limits.values())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if log is not None and not _SAID:
        _SAID.append(n)
        log(f"cpu: {n} thread{'s' if n != 1 else ''} ({', '.join(f'{k} {v}' for k, v in limits.items())})")
        try:
            load = os.getloadavg()[0]
            if load > (os.cpu_count() or 1):
                log(f"warning: the machine's load ({load:.1f}) is above its {os.cpu_count()} CPUs: other work competes "
                    f"for them, so this run will be slower than its benchmarks")
        except OSError:
            pass
    return n


# ----------------------------------------------------------------------------------------------
# Compilation: one policy for training and sampling.

# compile: auto compiles when the work reaches the break-even: the compile time (cold: nothing in
# inductor's on-disk cache) over the time saved per unit of work, measured in the real loops
# (docs/performance.md, "torch.compile"). Training: the run's images (CPU, small default, bf16: 105 s
# compile, 88 -> 112 img/s in the training loop; CUDA: not measured side by side, an estimate that pays
# at a 10% gain for EDM2 XS's 93 s compile on an H200). Sampling: images x network evaluations (CPU:
# 49 s compile, 6.3 -> 9.5 img/s at NFE 35; H200, XS: 30 s, 45 -> 71 img/s).
COMPILE_BREAK_EVEN = {"train": {"cpu": 45_000, "cuda": 1_000_000},
                      "sample": {"cpu": 32_000, "cuda": 130_000}}


def compile_wanted(setting, what: str, device, work: int) -> bool:
    """A compile switch (true / false / "auto") for `work` ("train": the run's images; "sample": images x NFE)."""
    if setting != "auto":
        return bool(setting)
    import torch                                   # this module stays light: the config schema imports it
    return work >= COMPILE_BREAK_EVEN[what].get(torch.device(device).type, float("inf"))



def maybe_compile(model, enabled: bool, log=print, what: str = "running", mode: str | None = None):
    """torch.compile with a fallback: compilation happens at the first call, and a model that fails
    to compile there runs uncompiled (said once). mode="reduce-overhead" adds CUDA graphs on a GPU."""
    if not enabled:
        return model
    import torch
    return _CompileFallback(torch.compile(model, mode=mode), model, log, what)


class _CompileFallback:
    def __init__(self, compiled, eager, log, what):
        self.compiled, self.eager, self.log, self.what, self.failed = compiled, eager, log, what, False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:               # no C++ compiler, unsupported op or backend
                self.failed = True
                self.log(f"warning: torch.compile failed ({err.__class__.__name__}: {str(err)[:200]}); "
                         f"{self.what} uncompiled")
        return self.eager(*args, **kwargs)

    def no_sync(self):
        return self.eager.no_sync()

    def __getattr__(self, name):                   # img_channels, label_dim, ...: the eager model's
        if name == "eager":
            raise AttributeError(name)
        return getattr(self.eager, name)
