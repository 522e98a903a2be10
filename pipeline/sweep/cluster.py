"""The Ray side of a sweep: a local instance bound to 127.0.0.1 or an authenticated cluster, the
resources a trial holds checked against what is there, and the watch that ends a sweep whose trials
wait for resources that never come."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from ..errors import SweepError
from .schema import SweepConfig
from .space import split_config


def cpus_per_trial(sweep: SweepConfig) -> float:
    """CPUs one trial holds: its training processes, plus the trial's driver when there are several."""
    res = sweep.resources
    return res.cpus * res.workers + (1 if res.workers > 1 else 0)


def check_resources(sweep: SweepConfig, ray) -> tuple[float, str]:
    """GPUs per trial against the cluster: none there -> CPU workers; too few -> clear error."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    want, workers = sweep.resources.gpus, sweep.resources.workers
    if want > gpus > 0:
        raise SweepError(f"resources.gpus={want:g} per trial, but the cluster has {gpus:g} GPUs")
    need = cpus_per_trial(sweep)
    if need > cpus:
        raise SweepError(f"resources.cpus={sweep.resources.cpus:g} x resources.workers={workers} per trial"
                         f"{' + 1 for the trial driver' if workers > 1 else ''}, but the cluster has {cpus:g} CPUs")
    if want > 0 and gpus == 0:
        print(f"sweep: the cluster has no GPUs: running trials on CPU workers (resources.gpus={want:g} ignored)")
        return 0.0, "cpu"
    return want, ("cuda" if want > 0 else "cpu")


OVERSUBSCRIBE = 4                  # --num-cpus: at most this many logical CPUs per core


def check_plan(sweep: SweepConfig, storage: Path, reports: Path, address: str | None, num_cpus: int | None,
               trials: int) -> None:
    """Everything that can be checked before Ray starts and before any MLflow run is created (a dry
    run too): output folders creatable, CPUs and GPUs per trial within this machine."""
    from ..io import check_writable
    check_writable(storage, "sweep storage")
    check_writable(reports, "sweep reports folder")
    if num_cpus is not None and num_cpus < 1:
        raise SweepError(f"--num-cpus {num_cpus}: must be >= 1")
    cores = os.cpu_count() or 1
    if num_cpus is not None and address is None and num_cpus > OVERSUBSCRIBE * cores:
        raise SweepError(f"--num-cpus {num_cpus}: Ray's logical CPUs for this machine's {cores} cores; more than "
                         f"{OVERSUBSCRIBE * cores} would run that many trial processes on them at once")
    if address is not None and not re.fullmatch(r"auto|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}", address):
        raise SweepError(f"--address {address!r}: expected host:port of a Ray head (or ray://host:port, or auto)")
    if address is None:                                      # a local instance: its CPUs and GPUs are known now
        cpus = num_cpus or os.cpu_count() or 1              # Ray's logical CPUs: more than the cores is allowed
        res = sweep.resources
        per_trial = cpus_per_trial(sweep)
        if per_trial > cpus:
            raise SweepError(f"resources.cpus={res.cpus:g} x resources.workers={res.workers} per trial needs "
                             f"{per_trial:g} CPUs, this machine has {cpus}")
        gpus = _local_gpus()
        if res.gpus > gpus > 0:
            raise SweepError(f"resources.gpus={res.gpus:g} per trial, but this machine has {gpus} GPUs")
        if sweep.max_concurrent * per_trial > cpus and trials > int(cpus // per_trial):
            print(f"sweep: note: max_concurrent={sweep.max_concurrent} trials x {per_trial:g} CPUs each exceeds the "
                  f"{cpus} CPUs here: at most {int(cpus // per_trial)} run at once")


def _local_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:                                        # no usable CUDA: CPU workers
        return 0


def is_loopback(address: str) -> bool:
    """True when a Ray address (host:port, [v6]:port, ray://host:port) names this machine's loopback."""
    import ipaddress
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                                         # a name, or "auto": not known to be loopback


def ray_auth_token_available() -> bool:
    """Where Ray reads a token from: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or (bool(path) and Path(path).is_file()) \
        or (Path.home() / ".ray" / "auth_token").is_file()


def prepare_ray_env(address: str | None) -> None:
    """Before Ray starts: a local instance listens on 127.0.0.1 only, authentication off there; a
    cluster address that is not loopback needs Ray's token authentication (refused otherwise)."""
    if address is None:
        # Ray (2.60) has no bind-address option; its single-machine mode (what it uses on macOS and
        # Windows) makes the GCS, raylet, workers and agents bind 127.0.0.1 instead of every interface.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:                             # already imported in this process
            import ray._private.ray_constants as ray_constants
            ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nothing off this machine can reach it
        return
    if is_loopback(address):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    how = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, a file in RAY_AUTH_TOKEN_PATH or "
           "~/.ray/auth_token) here and for every `ray start`; docs/scaling.md")
    if mode == "disabled":
        raise SweepError(f"--address {address} is not loopback, and RAY_AUTH_MODE=disabled: a Ray cluster reachable "
                         f"over the network runs anyone's code without authentication. Use token authentication: {how}")
    if not ray_auth_token_available():
        raise SweepError(f"--address {address}: no Ray authentication token here; {how}")
    os.environ["RAY_AUTH_MODE"] = "token"


def ray_temp_dir() -> str:
    """The per-user root of a local Ray instance's session files (short: Ray's socket paths have a limit)."""
    return os.environ.get("EDM2_RAY_TMPDIR") or f"/tmp/ray-{os.getuid()}"


def connect_ray(address: str | None, num_cpus: int | None, min_nodes: int = 1, wait_s: float = 120.0):
    """ray.init for a sweep (a local instance, or the cluster at `address`), with the cluster's errors in
    one line; waits up to wait_s for min_nodes alive nodes (a SLURM allocation's workers joining).
    Returns (ray, whether this call started it: the caller then shuts it down)."""
    import ray
    if ray.is_initialized():
        return ray, False
    # A local instance keeps its session files in a per-user folder, not the machine-wide /tmp/ray.
    kwargs = {"address": address} if address else {"num_cpus": num_cpus, "_temp_dir": ray_temp_dir()}
    try:
        ray.init(**kwargs, include_dashboard=False, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise SweepError(f"could not join the Ray cluster at {address}: {first} (is `ray start --head` running "
                         f"there, and is RAY_AUTH_TOKEN the one the cluster was started with?)") from None
    deadline = time.time() + wait_s
    while (alive := sum(n["Alive"] for n in ray.nodes())) < min_nodes and time.time() < deadline:
        time.sleep(1)
    if alive < min_nodes:
        print(f"sweep: only {alive} of {min_nodes} Ray nodes joined within {wait_s:.0f} s; going on with them")
    return ray, True


class PendingWatch:
    """When no trial runs and one has waited in PENDING longer than `timeout_s`
    (sweep.pending_timeout_s), name the resources it waits for and what the cluster has free, and
    end the sweep (through Tune's stopper) instead of holding its CPUs for ever."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.stuck, self._since = timeout_s, None, {}

    def check(self, trials, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        pending = [t for t in trials if t.status == "PENDING"]
        if any(t.status == "RUNNING" for t in trials) or not pending:
            self._since = {}
            return None
        self._since = {t.trial_id: self._since.get(t.trial_id, now) for t in pending}
        oldest = min(pending, key=lambda t: self._since[t.trial_id])
        waited = now - self._since[oldest.trial_id]
        if waited > self.timeout_s and self.stuck is None:
            import ray
            want = getattr(oldest.placement_group_factory, "required_resources", {}) or {}
            self.stuck = (f"trial {split_config(oldest.config, oldest.trial_id)[0]} waited {waited:.0f} s in PENDING "
                          f"(sweep.pending_timeout_s={self.timeout_s:g}) for {_resources(want) or 'its resources'}; "
                          f"the cluster has free: {_resources(ray.available_resources()) or 'nothing'}")
            print(f"sweep: {self.stuck}", file=sys.stderr, flush=True)
        return self.stuck

    def tune_hooks(self) -> tuple:
        """(stopper, callback) for tune.RunConfig(stop=..., callbacks=[...])."""
        from ray.tune import Callback
        from ray.tune.stopper import Stopper
        watch = self

        class Hook(Callback):
            def on_step(self, iteration, trials, **info):
                watch.check(trials)

        class Stop(Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                return watch.stuck is not None
        return Stop(), Hook()


def _resources(r: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if not k.startswith(("node:", "object_store")))


