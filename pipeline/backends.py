"""The launcher backends as a small table, and the one adapter through which a running job reads its
place in the allocation (job id, node, nodes, CPUs, attempt, tasks): nothing else reads a
scheduler's environment variables. Each backend says whether it is available here, how to tell a job
it started, how to watch a job, and which submit flags only it uses; its launcher (how jobs are
submitted) is its LAUNCHERS entry in launchers.py. Adding one: an entry here and there, its test in
tests/, its line in docs/scaling.md. Only the standard library: the config schema reads the names.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class JobEnv:
    """Where a running job is, read once from its scheduler's environment."""
    scheduler: str | None              # the backend that started it (None: a plain process)
    job_id: str | None
    node_id: int                       # this node's index in the allocation
    nodes: tuple[str, ...]             # the allocation's host names, in order
    cpus: int | None                   # CPUs on this node
    attempt: int                       # requeues so far
    tasks: int                         # tasks of the job (one per process)
    cpus_per_task: int | None = None   # CPUs the scheduler gave each task (this process)


def _slurm_env() -> JobEnv:
    e = os.environ
    nodelist = e.get("SLURM_JOB_NODELIST")
    nodes = ()
    if nodelist:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        nodes = tuple(out.stdout.split() or [nodelist])
    return JobEnv("slurm", e.get("SLURM_JOB_ID"), int(e.get("SLURM_NODEID", "0")), nodes,
                  int(e.get("SLURM_CPUS_ON_NODE", "0")) or None, int(e.get("SLURM_RESTART_COUNT", "0")),
                  int(e.get("SLURM_NTASKS", "1")), _cpus_per_task())


def _cpus_per_task() -> int | None:
    """SLURM_CPUS_PER_TASK (also seen outside a job's own environment, e.g. exported by a wrapper script)."""
    try:
        return max(1, int(float(os.environ["SLURM_CPUS_PER_TASK"])))
    except (KeyError, ValueError):
        return None


def _plain_env() -> JobEnv:
    return JobEnv(None, None, 0, (), None, 0, 1, _cpus_per_task())


@dataclass(frozen=True)
class Backend:
    available: object                              # () -> None, or why not (one line)
    in_job: object                                 # () -> True inside a job this backend started
    env: object                                    # () -> JobEnv
    watch: object                                  # job id -> shell commands to watch / cancel it
    only_flags: dict                               # launcher field -> submit flag that only this backend uses


SLURM_ONLY_FLAGS = {"slurm.partition": "--partition", "slurm.gpus_per_node": "--gpus", "slurm.cpus_per_task": "--cpus",
                    "slurm.mem_gb": "--mem-gb", "slurm.account": "--account", "slurm.qos": "--qos", "nnodes": "--nodes",
                    "nproc_per_node": "--tasks-per-node", "slurm.array_parallelism": "--array-parallelism"}

BACKENDS: dict[str, Backend] = {
    "slurm": Backend(lambda: None if shutil.which("sbatch") else
                     "SLURM is not available on this machine (no `sbatch` on PATH); use --executor local to run the "
                     "same job here", lambda: "SLURM_JOB_ID" in os.environ, _slurm_env,
                     lambda job_id: f"squeue -j {job_id}; scancel {job_id}", SLURM_ONLY_FLAGS),
    "local": Backend(lambda: None, lambda: False, _plain_env, lambda job_id: "", {}),
}


def job_env() -> JobEnv:
    """The allocation this process runs in, from the backend that started it (a plain process otherwise)."""
    for b in BACKENDS.values():
        if b.in_job():
            return b.env()
    return _plain_env()
