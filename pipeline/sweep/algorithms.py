"""Search algorithms and trial schedulers as two small tables.

A search algorithm says which axis kinds it takes, how its trials' values are drawn (in advance, so
`--dry-run` shows them, or proposed during the sweep), how reproducible that is, and which Tune
searcher runs it. A scheduler says whether it stops trials early, how it is built from
`sweep.scheduler`, and how its stops are recorded: every entry goes through `recording`, which writes
each trial the scheduler stops (at what nimg, on what value) to the sweep's `stopped.json`, so the
results tell early-stopped trials from interrupted ones and `--resume` does not run them again.

Adding one: an entry here (and, for a scheduler, the Ray class); the schema reads the names from
these tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text, read_json
from .space import draw_points, grid_trial_points, split_config


@dataclass(frozen=True)
class SearchAlgorithm:
    label: str                                   # how the plan names who draws the values
    axis_kinds: tuple[str, ...]                  # the AxisSpec kinds it accepts
    planned: bool                                # every trial's values known before the sweep starts
    reproducible: str                            # what the same seed guarantees
    points: Callable[[Any], list]                # sweep -> the plan's points (None: proposed during the sweep)
    searcher: Callable[..., Any] | None = None   # (sweep, evaluated) -> a Tune searcher; None: the plan's points


def _optuna(sweep, evaluated: list[tuple[dict, float]]):
    """Optuna/TPE (seeded), told the finished trials of an earlier attempt of this sweep."""
    from ray.tune.search.optuna import OptunaSearch

    from .space import axis_name

    class ResumedOptuna(OptunaSearch):
        def set_search_properties(self, metric, mode, config, **spec):
            ok = super().set_search_properties(metric, mode, config, **spec)
            for values, fid in evaluated:
                self.add_evaluated_point({axis_name(k): v for k, v in values.items()}, fid)
            return ok
    return ResumedOptuna(metric="best_fid", mode="min", seed=sweep.seed)


RANGES = ("choice", "uniform", "loguniform")
SEARCH_ALGORITHMS: dict[str, SearchAlgorithm] = {
    "grid": SearchAlgorithm("the grid", ("grid",), True, "exactly: the plan is every combination",
                            grid_trial_points),
    "random": SearchAlgorithm("random search", RANGES, True, "exactly: values drawn from sweep.seed before the "
                              "sweep", draw_points),
    "optuna": SearchAlgorithm("Optuna", RANGES, False, "seeded TPE: the same proposals for the same order of "
                              "finished trials", lambda s: [None] * s.num_samples, _optuna),
}


@dataclass(frozen=True)
class Scheduler:
    title: str                                   # how summaries name it
    stops: bool                                  # may stop trials before the end of training
    uses_grace: bool                             # reads scheduler.grace_period_nimg
    synchronous: bool                            # fills brackets: every trial exists from the start
    make: Callable[..., Any] | None              # (spec, max_t) -> Ray scheduler class and its kwargs
    doc: str


def _asha(spec, max_t):
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler, dict(grace_period=spec.grace_period_nimg, reduction_factor=spec.reduction_factor,
                               max_t=max_t)


def _hyperband(spec, max_t):
    from ray.tune.schedulers import HyperBandScheduler
    # stop_last_trials=False: a trial at the last rung trains to its end (and its EMA fan-out), never cut at max_t.
    return HyperBandScheduler, dict(reduction_factor=spec.reduction_factor, max_t=max_t, stop_last_trials=False)


SCHEDULERS: dict[str, Scheduler] = {
    "none": Scheduler("no scheduler", False, False, False, None, "every trial trains to the end"),
    "asha": Scheduler("ASHA", True, True, False, _asha, "asynchronous successive halving: stops a trial at a rung when it is "
                      "not in the best 1/reduction_factor there; never waits for other trials"),
    "hyperband": Scheduler("HyperBand", True, False, True, _hyperband, "synchronous HyperBand brackets: pauses trials at a rung "
                           "until the bracket is filled, then stops the worse ones (a paused trial resumes from its "
                           "own checkpoint); its brackets hold every trial, so all are created at the start and "
                           "resources, not max_concurrent, bound how many run at once"),
}


def search_algorithm(name: str) -> SearchAlgorithm:
    return SEARCH_ALGORITHMS[name]


def scheduler_entry(name: str) -> Scheduler:
    return SCHEDULERS[name]


STOPPED = "stopped.json"                         # {trial name: {nimg, metric, value, scheduler}}


def read_stopped(exp_dir: Path) -> dict:
    """The trials a scheduler stopped (stopped.json; asha_stopped.json of sweeps run before HyperBand existed)."""
    out = {}
    for name in ("asha_stopped.json", STOPPED):
        out.update(read_json(exp_dir / name))
    return out


def tune_concurrency(sweep) -> int | None:
    """Tune's max_concurrent_trials: sweep.max_concurrent, or None for a synchronous scheduler (its
    brackets only see the trials Tune has created; resources then bound how many run)."""
    return None if scheduler_entry(sweep.scheduler.type).synchronous else sweep.max_concurrent


def build_scheduler(sweep, max_t: int, exp_dir: Path):
    """The sweep's Tune scheduler (None for `none`), recording its stops to exp_dir/stopped.json."""
    entry = scheduler_entry(sweep.scheduler.type)
    if entry.make is None:
        return None
    cls, kwargs = entry.make(sweep.scheduler, max_t)
    return recording(cls, exp_dir / STOPPED, sweep.scheduler.type)(
        time_attr="nimg", metric=sweep.scheduler.metric, mode="min", **kwargs)


def recording(cls, path: Path, name: str):
    """`cls` (a Ray trial scheduler) that also writes each trial it stops to `path`: the ones it answers
    STOP for, and the ones it stops through the controller (HyperBand's paused trials of a cut bracket)."""
    from ray.tune.schedulers import TrialScheduler

    def record(trial, result: dict, metric: str) -> None:
        import time

        from .trial_state import write_trial_state
        stopped = read_json(path)
        trial_name = split_config(trial.config, trial.trial_id)[0]
        stopped[trial_name] = {"nimg": result.get("nimg"), "metric": metric, "value": result.get(metric),
                               "scheduler": name}
        atomic_write_text(json.dumps(stopped, indent=2), path)
        trial_dir = path.parent / "trials" / trial_name       # its own record says so at once, not "running"
        if trial_dir.is_dir():
            write_trial_state(trial_dir, status="early-stopped", ended_at=time.time(), stop=stopped[trial_name])

    class Controller:                             # the Tune controller, with its stop_trial recorded
        def __init__(self, inner, metric):
            self._inner, self._metric = inner, metric

        def stop_trial(self, trial):
            record(trial, trial.last_result or {}, self._metric)
            return self._inner.stop_trial(trial)

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    class Recording(cls):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(Controller(tune_controller, self._metric), trial, result)
            if decision == TrialScheduler.STOP and not result.get("done"):
                record(trial, result, self._metric)
            return decision
    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording
