"""Where work runs: SLURM through submitit (or submitit's local executor), for a training run, any
command (a DVC stage, `dvc repro`) or a whole sweep.

Training is submitit-checkpointable. On SIGUSR2 (SLURM's warning before a time limit, or
preemption) the training loop finishes its step, writes a checkpoint, and submitit requeues the
job; on SIGTERM (`scontrol requeue`) it checkpoints the same way if it has the time, and the
requeued job resumes from the newest checkpoint on disk. Either way the run continues from the
same nimg, to the same parameters, in the same MLflow run.

The backends (SLURM, local) are a table in backends.py, with the one adapter through which a
running job reads its allocation; the launchers that submit to them (and the only imports of
submitit) are in launchers.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from . import config as C
from .backends import BACKENDS, job_env
from .launchers import (JobFailedError, LaunchError, SubmititJob, export_distributed_env, job_folder,  # noqa: F401
                        launcher_for, requeue)




# ----------------------------------------------------------------------------------------------
# Jobs (pickled by submitit, run on the compute node).

class TrainJob:
    """Train the run described by a params file; checkpointable for submitit."""

    def __init__(self, params: str, overrides: Sequence[str] = (), cwd: str | None = None):
        self.params, self.overrides, self.cwd = params, list(overrides), cwd or os.getcwd()

    def __call__(self) -> dict:
        os.chdir(self.cwd)
        _export_distributed_env()
        import socket
        print(f"edm2 task {os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')} on {socket.gethostname()}",
              flush=True)
        from .training import StopFlag, TrainHooks, train
        submitit_usr2 = signal.getsignal(signal.SIGUSR2)     # submitit's checkpoint-and-requeue handler
        stop = StopFlag().install()                          # training stops at a step boundary instead
        cfg = C.load_config(self.params, self.overrides)
        from .tracking.logger import training_run_name
        name = training_run_name(cfg, job_env().scheduler or "submitit", self.params)
        res = train(cfg, TrainHooks(stage="slurm", stop=stop, progress=False, run_name=name))
        rank = int(os.environ.get("RANK", "0"))
        if res.status == "stopped" and stop.signal == signal.SIGUSR2 and rank == 0 and callable(submitit_usr2):
            submitit_usr2(signal.SIGUSR2, None)              # -> self.checkpoint() -> requeue -> exit
        if res.status == "stopped" and job_env().scheduler is not None:
            # `scontrol requeue` (SIGTERM), or the other ranks of a job that rank 0 requeues: SLURM kills
            # and restarts the whole job. Exiting now would leave a failure result behind that a watcher
            # could read before the restart.
            time.sleep(float(os.environ.get("EDM2_SIGTERM_GRACE_S", "90")))
        if res.status == "stopped":
            raise LaunchError(f"training stopped by signal {stop.signal} at nimg={res.nimg}; "
                              f"the checkpoint is on disk and the next run resumes from it")
        return {"nimg": res.nimg, "status": res.status, "mlflow_run_id": res.mlflow_run_id,
                "final_loss": res.final_loss, "run_dir": str(res.run_dir)}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/time-out: the training checkpoint is already on disk
        (written at the step boundary), so requeue the same job; it resumes from that checkpoint."""
        return requeue(TrainJob(self.params, self.overrides, self.cwd))


class SweepJob:
    """Run a sweep inside one SLURM allocation. One node: a local Ray instance (loopback only). Several
    (one task per node): a Ray head on the first node, a Ray worker on each other node, all with token
    authentication (the token travels in the job, never in a command line), and the sweep driver on
    the head. Each node's Ray is stopped by its own task: `ray stop` would kill every Ray on a machine."""

    def __init__(self, sweep_file: str, cwd: str | None = None, port: int | None = None, token: str | None = None):
        self.sweep_file, self.cwd, self.port, self.token = sweep_file, cwd or os.getcwd(), port, token

    def __call__(self):
        os.chdir(self.cwd)
        env = job_env()
        nodes, node_id, cpus = env.nodes, env.node_id, env.cpus
        from .sweep.driver import run_sweep

        def summary(res) -> dict:
            return {"rows": len(res.table), "table": str(res.table_path), "parent_run_id": res.parent_run_id}
        if len(nodes) <= 1:                                  # one node: a local Ray instance
            return summary(run_sweep(self.sweep_file, num_cpus=cpus))
        job_id = env.job_id or "0"
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token or os.environ.get("RAY_AUTH_TOKEN", ""))
        if not os.environ["RAY_AUTH_TOKEN"]:
            raise LaunchError("a multi-node sweep needs a Ray token: submit it with `python -m pipeline submit sweep`")
        head_ip = node_address(nodes[0])
        port = self.port or 30000 + int(job_id) % 20000      # per job: two sweeps can share a node
        attempt = env.attempt
        done = job_folder() / f"{job_id}_ray_{attempt}.done"   # head -> workers
        if node_id != 0:
            wait_for_port(head_ip, port, 180)
        ray_node = start_ray_node(node_address(nodes[node_id]), head_ip, port, cpus, head=node_id == 0,
                                  temp_dir=f"/tmp/ray-edm2-{job_id}")
        try:
            if node_id != 0:                                 # a worker: serve until the head says done
                while ray_node.poll() is None and not done.exists():
                    time.sleep(1)
                return None
            wait_for_port(head_ip, port, 120, ray_node)
            return summary(run_sweep(self.sweep_file, address=f"{head_ip}:{port}", num_cpus=cpus, min_nodes=len(nodes)))
        finally:
            if node_id == 0:
                import ray
                ray.shutdown()                               # a driver whose raylet stops exits with 1
                done.touch()
            stop_ray_node(ray_node)


def node_address(hostname: str) -> str:
    """The address other nodes reach `hostname` at (its name resolved); Ray's own guess (the route to
    8.8.8.8) when the name resolves to loopback."""
    import socket
    ip = socket.gethostbyname(hostname)
    if ip.startswith("127."):
        import ray._private.services
        ip = ray._private.services.get_node_ip_address()
    return ip


def start_ray_node(ip: str, head_ip: str, port: int, cpus: int | None, head: bool, temp_dir: str):
    """`ray start --block` for this node (the head, or a worker joining head_ip:port), in its own process
    group so that stop_ray_node ends exactly its processes."""
    cmd = [ray_cli(), "start", f"--node-ip-address={ip}", "--block", "--disable-usage-stats"]
    cmd += (["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"] if head
            else [f"--address={head_ip}:{port}"])
    if cpus:
        cmd.append(f"--num-cpus={cpus}")
    # A node of a multi-node cluster: never the single-machine mode a local sweep asks for (a process that
    # ran one exports RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and sbatch passes the environment on).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return subprocess.Popen(cmd, start_new_session=True, env=env)


def ray_cli() -> str:
    """The `ray` command of this Python environment (a job's PATH need not have the venv on it)."""
    import sys
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.is_file() else "ray"


def stop_ray_node(p: subprocess.Popen, grace_s: float = 40.0) -> None:
    """SIGTERM to `ray start --block` (it drains and stops its node's processes), then SIGKILL to its
    process group for whatever is left."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until host:port accepts connections (a Ray head starting); fails early if `proc` (its `ray start`) ended."""
    import socket
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise LaunchError(f"`ray start` for {host}:{port} exited with {proc.returncode}: see the job's log")
            if time.time() > deadline:
                raise LaunchError(f"the Ray head at {host}:{port} did not come up within {timeout_s:.0f} s")
            time.sleep(0.5)


class CommandJob:
    """Run a command (a DVC stage, `dvc repro`, anything) in the project folder; its exit code is
    the job's result."""

    def __init__(self, command: Sequence[str], cwd: str | None = None):
        self.command, self.cwd = list(command), cwd or os.getcwd()

    def __call__(self) -> int:
        r = subprocess.run(self.command, cwd=self.cwd)
        if r.returncode != 0:
            raise LaunchError(f"`{' '.join(self.command)}` exited with {r.returncode}")
        return r.returncode


class EvaluateJob:
    """The evaluate stage in every task of the job (one task per GPU: the ranks come from the scheduler,
    each sampling its share of the seeds); preempted or timed out, it is requeued and resumes from its
    finished feature shards."""

    def __init__(self, params: str, overrides: Sequence[str] = (), stage_args: Sequence[str] = (),
                 cwd: str | None = None):
        self.params, self.overrides, self.stage_args = params, list(overrides), list(stage_args)
        self.cwd = cwd or os.getcwd()

    def __call__(self) -> int:
        os.chdir(self.cwd)
        _export_distributed_env()
        from stages.evaluate import main
        rc = main(["--params", self.params, *[x for o in self.overrides for x in ("-S", o)], *self.stage_args])
        if rc != 0:
            raise LaunchError(f"the evaluate stage exited with {rc} (its one-line reason is in the job's stderr)")
        return rc

    def checkpoint(self, *args, **kwargs):
        return requeue(EvaluateJob(self.params, self.overrides, self.stage_args, self.cwd))


def _export_distributed_env() -> None:
    """Multi-task jobs: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the scheduler's variables."""
    if job_env().tasks > 1 and "RANK" not in os.environ:
        export_distributed_env()


# ----------------------------------------------------------------------------------------------
# Submitting.

Submitted = SubmititJob                 # the handle submit returns (launchers.Job)


def submit(kind: str, target: Sequence[str], params_file: str = "params.yaml", overrides: Sequence[str] = (),
           executor: str | None = None, folder: str | Path | None = None, launcher_overrides: dict | None = None,
           ) -> Submitted:
    """kind: 'train' (target unused), 'evaluate' (target: the evaluate stage's flags), 'sweep' (target[0] =
    sweep file) or 'cmd' (target = the command)."""
    lo = {f"launcher.{k}": v for k, v in (launcher_overrides or {}).items() if v is not None}
    cfg = C.load_config(params_file, [*overrides, *(f"{k}={v}" for k, v in lo.items())]) \
        if Path(params_file).is_file() else C.resolve({}, lo)
    if kind == "train":
        fn, name = TrainJob(params_file, overrides), "edm2-train"
    elif kind == "evaluate":                               # target: the stage's own flags (after --)
        fn, name = EvaluateJob(params_file, overrides, target), "edm2-evaluate"
    elif kind == "sweep":
        if len(target) != 1:
            raise LaunchError(f"submit sweep takes one sweep file, e.g. submit sweep sweeps/lr.yaml "
                              f"(got {len(target)} arguments)")
        from .sweep.schema import load_sweep
        load_sweep(target[0])                              # bad sweep files fail here, not on the node
        import secrets                                       # the token of the job's Ray cluster (nodes > 1)
        fn, name = SweepJob(target[0], token=os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)), "edm2-sweep"
    elif kind == "cmd":
        if not target:
            raise LaunchError("give the command after --, e.g. submit cmd -- dvc repro")
        fn, name = CommandJob(target), "edm2-cmd"
    else:
        raise LaunchError(f"unknown job kind {kind!r}")
    kind_ex = executor or cfg.launcher.executor
    others = {k: (name, flag) for name, b in BACKENDS.items() if name != kind_ex for k, flag in b.only_flags.items()}
    ignored = [others[k] for k, v in (launcher_overrides or {}).items()      # flags this backend would ignore
               if v is not None and k in others and k not in BACKENDS.get(kind_ex, BACKENDS["local"]).only_flags
               and not (k in ("nnodes", "nproc_per_node") and v == 1)]
    if ignored:
        raise LaunchError(f"{', '.join(f for _, f in ignored)} only apply to {ignored[0][0].upper()} jobs, and this "
                          f"job would run with launcher.executor={kind_ex}: add --executor {ignored[0][0]}, or drop the "
                          f"flag(s)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(folder or f"runs/jobs/{kind}-{stamp}-{os.getpid()}")   # fresh: SLURM ids may restart at 1
    from .io import check_writable
    check_writable(folder, "submitit folder")
    if not folder.exists():                                  # a fresh folder: the job's pickle (a sweep's: its Ray
        folder.mkdir(parents=True)                           # token) is yours; an existing one keeps its mode
        os.chmod(folder, 0o700)
    return launcher_for(kind_ex, cfg.launcher, folder).submit(fn, name)


def describe(s) -> str:
    return s.describe()


def wait(s):
    """Block until the job ends (requeues included); its result, or JobFailedError with the log tail."""
    return s.wait()
