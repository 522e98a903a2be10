"""Launchers: one small protocol and its implementations. A launcher submits a job (a picklable
callable) and returns a handle that can `wait` for the result, `describe` where to look, read the
`logs` and `cancel` the job. submitit's SLURM and local executors are the two implementations here; a
launcher that is not submitit (a KubeRay job, a plain ssh host) is another class with the same two
methods and its entry in LAUNCHERS (and its backend entry in backends.py).

Only this module imports submitit. The jobs in launch.py use the three helpers at the end (requeue,
the job's folder, the torch.distributed environment of a multi-task job).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from .backends import BACKENDS
from .errors import PipelineError


class LaunchError(PipelineError, RuntimeError):
    """A job that cannot be submitted as asked (bad input, no scheduler here), or a job's own failure."""


class JobFailedError(LaunchError):
    """A submitted job ran and failed (not a bad input)."""


class Job(Protocol):
    """What submit returns."""
    job_id: str
    executor: str                                 # the backend's name (backends.BACKENDS)

    def wait(self): ...                           # block until the job ends; its result, or JobFailedError
    def describe(self) -> str: ...                # where its logs are, how to follow and cancel it
    def logs(self, tail_chars: int = 1500) -> str: ...
    def cancel(self) -> None: ...


class Launcher(Protocol):
    def submit(self, fn: Callable, job_name: str) -> Job: ...


# ----------------------------------------------------------------------------------------------
# submitit: SLURM, and the same jobs as local processes.

@dataclass
class SubmititJob:
    job_id: str
    folder: Path
    stdout: Path
    stderr: Path
    executor: str
    job: object                                   # submitit's Job

    def wait(self):
        try:
            return self.job.results()[0]          # every task's result; rank 0's is the job's
        except Exception as err:
            tail = self.stderr.read_text()[-1500:] if self.stderr.is_file() else ""
            raise JobFailedError(f"job {self.job_id} failed: "
                                 f"{str(err).strip().splitlines()[-1] if str(err) else err}\n"
                                 f"--- {self.stderr} (tail) ---\n{tail}") from None

    def describe(self) -> str:
        follow = f"tail -f {self.stdout} {self.stderr}"
        watch = BACKENDS[self.executor].watch(self.job_id) if self.executor in BACKENDS else ""
        extra = f"; {watch}" if watch else ""
        where = ("to SLURM" if self.executor == "slurm" else
                 "locally: a process on this machine (launcher.executor=local; --executor slurm sends it to SLURM)"
                 if self.executor == "local" else f"to {self.executor}")
        return (f"submitted job {self.job_id} {where}\n  logs: {self.stdout}\n        {self.stderr}\n"
                f"  follow: {follow}{extra}")

    def logs(self, tail_chars: int = 1500) -> str:
        """The end of the job's stdout and stderr (what is there so far)."""
        return "".join(f"--- {p} ---\n{p.read_text(errors='replace')[-tail_chars:]}\n" for p in (self.stdout, self.stderr)
                       if p.is_file())

    def cancel(self) -> None:
        self.job.cancel(check=False)


def _slurm_parameters(launcher) -> dict:
    """launcher.* and launcher.slurm.* -> submitit's SLURM parameters (beyond time, nodes and name)."""
    s = launcher.slurm
    params = dict(slurm_partition=s.partition, slurm_account=s.account, slurm_qos=s.qos,
                  tasks_per_node=max(1, launcher.nproc_per_node), cpus_per_task=s.cpus_per_task,
                  slurm_array_parallelism=s.array_parallelism, slurm_signal_delay_s=120)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    return {k: v for k, v in params.items() if v is not None}


class SubmititLauncher:
    """submitit's executor for one backend: `slurm` (sbatch, requeue on preemption and time-out) or
    `local` (the same job pickled and run as a local process, for trying a job without a cluster)."""
    PARAMETERS = {"slurm": _slurm_parameters, "local": lambda launcher: {}}

    def __init__(self, backend: str, launcher, folder: Path):
        self.backend, self.launcher, self.folder = backend, launcher, Path(folder)

    def submit(self, fn: Callable, job_name: str) -> SubmititJob:
        import submitit
        ex = submitit.AutoExecutor(folder=str(self.folder), cluster=self.backend)
        ex.update_parameters(timeout_min=self.launcher.timeout_min, nodes=self.launcher.nnodes, name=job_name,
                             **self.PARAMETERS[self.backend](self.launcher))
        try:
            job = ex.submit(fn)
        except Exception as err:                  # sbatch's own error, in one line
            raise LaunchError(_one_line_sbatch_error(err)) from None
        return SubmititJob(str(job.job_id), self.folder, Path(job.paths.stdout), Path(job.paths.stderr),
                           self.backend, job)


def _one_line_sbatch_error(err: Exception) -> str:
    text = getattr(err, "output", None) or getattr(err, "stderr", None) or str(err)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in str(text).splitlines() if "error" in ln.lower()]
    return "sbatch failed: " + (lines[-1] if lines else str(text).strip().splitlines()[-1])


LAUNCHERS: dict[str, Callable[..., Launcher]] = {"slurm": SubmititLauncher, "local": SubmititLauncher}


def launcher_for(backend: str, launcher, folder: Path) -> Launcher:
    """The launcher of a backend (backends.BACKENDS), after checking it is available here."""
    if backend not in BACKENDS or backend not in LAUNCHERS:
        raise LaunchError(f"executor={backend!r}: must be one of {', '.join(BACKENDS)}")
    why_not = BACKENDS[backend].available()
    if why_not:
        raise LaunchError(why_not)
    return LAUNCHERS[backend](backend, launcher, folder)


# ----------------------------------------------------------------------------------------------
# Inside a running job.

def requeue(job) -> object:
    """What a job's checkpoint() returns: the same job, submitted again (submitit requeues it)."""
    import submitit
    return submitit.helpers.DelayedSubmission(job)


def job_folder() -> Path:
    """The running job's submitit folder (logs and the job's own files)."""
    import submitit
    return Path(submitit.JobEnvironment().paths.folder)


def export_distributed_env() -> None:
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the scheduler's variables (a multi-task job)."""
    import submitit
    submitit.helpers.TorchDistributedEnvironment().export()
