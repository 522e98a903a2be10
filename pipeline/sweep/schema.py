"""The sweep file's typed schema (sweeps/*.yaml): overrides of the one config schema, every value
validated (and every configuration a sweep can produce built) before Ray starts or a trial runs."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from ..config import (Config, ConfigError, GridConfig, NonNegFloat, NonNegInt, PosFloat, PosInt, SigmaRel, _Section,
                      at_least, format_errors, load_config, read_yaml)
from ..config.loading import renamed_keys
from .algorithms import SCHEDULERS, SEARCH_ALGORITHMS, scheduler_entry
from .space import AXIS_KINDS

MAX_TRIALS = 100_000


class AxisSpec(_Section):
    """One swept config value: exactly one of the kinds of space.AXIS_KINDS (grid / choice / uniform /
    loguniform)."""
    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[PosFloat, PosFloat]] = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in AXIS_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(AXIS_KINDS)} (got {given or 'none'})")
        if AXIS_KINDS[given[0]].listed and not self.spec:
            raise ValueError(f"{given[0]} is empty")
        if not AXIS_KINDS[given[0]].listed and not self.spec[0] < self.spec[1]:
            raise ValueError(f"{given[0]} needs low < high (got {list(self.spec)})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in AXIS_KINDS if getattr(self, k) is not None)

    @property
    def spec(self):
        """The values (grid, choice) or the (low, high) range of the axis."""
        return getattr(self, self.kind)

    def probe_values(self) -> list:
        """Values that must all be valid configs: every listed value, or both ends of a range."""
        return list(self.spec)


def _one_of(table: dict, what: str):
    def check(v: str) -> str:
        if v not in table:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(table)}")
        return v
    return AfterValidator(check)


class SchedulerSpec(_Section):
    type: Annotated[str, _one_of(SCHEDULERS, "scheduler")] = "none"    # algorithms.SCHEDULERS
    # Intermediate result the scheduler ranks trials by, reported at each snapshot. val_loss (default) does
    # not depend on a trial's own noise law or learning rate; loss / weighted_mse are the training losses.
    metric: Annotated[str, _one_of({"val_loss": 0, "loss": 0, "weighted_mse": 0}, "scheduler metric")] = "val_loss"
    grace_period_nimg: PosInt = 4096                    # ASHA: no stop before this many images
    reduction_factor: Annotated[float, AfterValidator(lambda v: at_least(v, 2))] = 2.0
    # A stopped trial's FID from its last snapshots (post-hoc: no retraining), so the searched axis is
    # ranked by FID for every trial; off: stopped trials keep only the loss they were stopped on.
    evaluate_stopped: bool = False


class ValidationSpec(_Section):
    """The fixed validation loss (edm.validation_loss): the first `num_images` of the FID reference
    set, noised at each of `sigmas` with noise drawn from `seed`; the same for every trial."""
    # None: only when the scheduler ranks trials by it (it costs a pass over num_images x len(sigmas) per
    # snapshot); true: at every snapshot anyway (a column of the results table); false: never.
    enabled: Optional[bool] = None
    num_images: PosInt = 64
    sigmas: list[PosFloat] = Field(default_factory=lambda: [0.05, 0.2, 0.5, 1.0, 2.0, 5.0])
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self):
        if not self.sigmas:
            raise ValueError("validation.sigmas must list at least one noise level")
        return self


class ResourceSpec(_Section):
    cpus: PosFloat = 1.0                                # per training process
    gpus: NonNegFloat = 0.0                             # per trial; fractional < 1 shares a GPU
    # Training processes per trial (default: one per GPU when gpus > 1). More than one runs the
    # trial's training under Ray Train's TorchTrainer (DDP: NCCL on GPUs, gloo on CPU workers).
    workers: Optional[PosInt] = None

    @model_validator(mode="after")
    def _check(self):
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"resources.gpus={self.gpus}: more than one GPU per trial must be a whole number")
        if self.workers is None:
            self.workers = int(self.gpus) if self.gpus > 1 else 1
        if self.workers > 1 and self.gpus and (self.gpus < self.workers or self.gpus % self.workers):
            raise ValueError(f"resources.gpus={self.gpus:g} over resources.workers={self.workers}: each training "
                             f"process needs the same whole number of GPUs")
        return self


class SweepConfig(_Section):
    name: str
    base: str = "params.yaml"                           # params file every trial starts from
    overrides: dict[str, Any] = Field(default_factory=dict)   # fixed for all trials
    search: dict[str, AxisSpec] = Field(default_factory=dict)  # dotted config key -> axis
    ema_lengths: list[SigmaRel] = Field(default_factory=list)  # post-hoc axis: never retrains
    posthoc: Optional[GridConfig] = None                # post-hoc grid per trial (evaluate.grid): no retraining
    algorithm: Annotated[str, _one_of(SEARCH_ALGORITHMS, "algorithm")] = "grid"   # algorithms.SEARCH_ALGORITHMS
    num_samples: PosInt = 1                             # random/optuna: trials; grid: repeats of the grid
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    max_concurrent: PosInt = 2
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    max_failures: NonNegInt = 2                         # retries of a crashed trial (from its checkpoint)
    seed: NonNegInt = 0                                 # fixes every random draw (random search, Optuna/TPE)
    experiment: Annotated[str, Field(min_length=1)] = "edm2-sweeps"   # MLflow experiment (one parent run per sweep)
    storage: str = "runs/sweeps"                        # Ray results, trial run folders
    # A trial waiting this long in PENDING while none runs ends the sweep, naming what it waits for.
    pending_timeout_s: PosFloat = 600.0
    # Per-trial figures (FID vs EMA length, post-hoc heat map) and sample grids: None = only while the sweep
    # plans at most PER_TRIAL_FIGURES_UP_TO trials; the sweep report always draws its best trials' grids.
    per_trial_figures: Optional[bool] = None
    # An MLflow server (127.0.0.1) in front of a sqlite store, for the trials' writers: None = only when more
    # than SERVER_ABOVE_WRITERS trials run at once on a local Ray; a given http(s) tracking.uri is used as is.
    tracking_server: Optional[bool] = None

    @field_validator("scheduler", "validation", "resources", mode="before")
    @classmethod
    def _mapping(cls, v, info):
        if v is not None and not isinstance(v, dict):
            example = {"scheduler": "{type: asha, metric: val_loss, grace_period_nimg: 4096, reduction_factor: 2}",
                       "validation": "{num_images: 64, sigmas: [0.05, 0.2, 0.5, 1.0, 2.0, 5.0], seed: 0}",
                       "resources": "{cpus: 1, gpus: 0}"}[info.field_name]
            raise ValueError(f"expected a mapping, e.g. {info.field_name}: {example}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.search and not self.ema_lengths and self.posthoc is None:
            raise ValueError("empty search space: give `search` axes, `ema_lengths` and/or `posthoc`")
        if self.ema_lengths and self.posthoc is not None and self.posthoc.sigma_rel:
            raise ValueError("give the EMA lengths once: `ema_lengths` or `posthoc.sigma_rel`, not both")
        takes = SEARCH_ALGORITHMS[self.algorithm].axis_kinds
        bad = [f"{k} ({a.kind})" for k, a in self.search.items() if a.kind not in takes]
        if bad:
            raise ValueError(f"algorithm={self.algorithm} takes {' / '.join(takes)} axes; {', '.join(bad)} "
                             f"{'is' if len(bad) == 1 else 'are'} not" +
                             ("" if self.algorithm == "grid" else " (`grid` axes need algorithm=grid)"))
        if self.validation.enabled is False and self.scheduler.type != "none" and self.scheduler.metric == "val_loss":
            raise ValueError(f"scheduler {self.scheduler.type} ranks trials by val_loss but validation.enabled is "
                             f"false: enable it or use scheduler.metric=loss")
        if any(k.startswith("ema.targets") for k in self.search):
            raise ValueError("sweep EMA length with `ema_lengths` (post-hoc, no retraining), not as a search axis")
        trials = self.num_samples * math.prod(len(a.grid) for a in self.search.values() if a.grid is not None)
        if trials > MAX_TRIALS:                             # the plan lists every trial: refuse a typo, not OOM
            raise ValueError(f"{trials:,} trials (num_samples x grid): more than {MAX_TRIALS:,}; split the sweep")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name={self.name!r}: use letters, digits, '.', '_' and '-' (it names folders and runs)")
        return self


PER_TRIAL_FIGURES_UP_TO = 16


def wants_validation(sweep: SweepConfig) -> bool:
    """The fixed validation loss runs when asked for, else only when the scheduler ranks trials by it."""
    if sweep.validation.enabled is not None:
        return sweep.validation.enabled
    return sweep.scheduler.type != "none" and sweep.scheduler.metric == "val_loss"


def wants_trial_figures(sweep: SweepConfig, planned_trials: int | None) -> bool:
    if sweep.per_trial_figures is not None:
        return sweep.per_trial_figures
    return planned_trials is not None and planned_trials <= PER_TRIAL_FIGURES_UP_TO


SERVER_ABOVE_WRITERS = 4


def wants_tracking_server(sweep: SweepConfig, uri: str, address: str | None) -> bool:
    """Whether the sweep starts its own MLflow server (tracking_server.TrackingServer) over `uri`: only over a
    sqlite file (a server or database URI serves many writers already), and only for a local Ray (trials on
    other nodes could not reach a server bound to 127.0.0.1: give them a server's http URI instead)."""
    if not uri.startswith("sqlite:") or sweep.tracking_server is False:
        return False
    if address is not None:
        if sweep.tracking_server:
            raise ValueError(f"tracking_server: true starts a server on 127.0.0.1, which trials on other nodes of "
                             f"--address {address} cannot reach: start one there (mlflow server --host <head>) and "
                             f"give its http URI as tracking.uri")
        return False
    return bool(sweep.tracking_server) or sweep.max_concurrent > SERVER_ABOVE_WRITERS     # rank 0 of a trial logs


def sweep_overrides(sweep: SweepConfig) -> dict:
    """What a sweep fixes for every trial: its overrides, EMA lengths and post-hoc grid."""
    overrides = dict(sweep.overrides)
    if sweep.ema_lengths:
        overrides["ema.targets"] = list(sweep.ema_lengths)
    if sweep.posthoc is not None:
        overrides["evaluate.grid"] = sweep.posthoc.model_dump(mode="json")
    return overrides


def load_sweep(path: str | Path) -> tuple[SweepConfig, Config]:
    """Validate a sweep file and every configuration it can produce; returns (sweep, base config)."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sweep fields at the top level")
    for part in ("overrides", "search"):                 # renamed config keys still work, with a note
        if isinstance(raw.get(part), dict):
            raw[part] = renamed_keys(raw[part], f"{path.name}: {part}")
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, raw).replace("\n", f"\n{path.name}: ")) from None
    base_path = Path(sweep.base) if Path(sweep.base).is_absolute() else (Path.cwd() / sweep.base)
    overrides = sweep_overrides(sweep)
    base = load_config(base_path, overrides)
    flat = base.flat()
    durations = [base.train.duration_nimg]
    for key, axis in sweep.search.items():
        if key not in flat:
            raise ConfigError(f"{path.name}: search.{key}: unknown key (not a field of the config)")
        for v in axis.probe_values():
            cfg = load_config(base_path, {**overrides, key: v})    # raises the one-line error for a bad value
            durations.append(cfg.train.duration_nimg)
    if "loss.noise" in sweep.search:      # each law drawn beside the other loss axes (a field of another law is refused)
        others = {k: a.probe_values()[0] for k, a in sweep.search.items() if k.startswith("loss.") and k != "loss.noise"}
        for law in sweep.search["loss.noise"].probe_values():
            try:
                load_config(base_path, {**overrides, **others, "loss.noise": law})
            except ConfigError as err:
                raise ConfigError(f"{path.name}: search: {err} (the axis loss.noise draws {law}; search one "
                                  f"law's fields per sweep, or only fields every law has)") from None
    s = sweep.scheduler
    if scheduler_entry(s.type).uses_grace and s.grace_period_nimg > min(durations):
        raise ConfigError(f"{path.name}: scheduler.grace_period_nimg={s.grace_period_nimg} is longer than "
                          f"the training (train.duration_nimg={min(durations)}): {s.type} could never stop a trial; "
                          f"lower it below the duration")
    if scheduler_entry(s.type).uses_grace and s.grace_period_nimg < base.ema.snapshot_nimg:
        raise ConfigError(f"{path.name}: scheduler.grace_period_nimg={s.grace_period_nimg} is shorter than "
                          f"ema.snapshot_nimg={base.ema.snapshot_nimg}, the interval at which trials report")
    return sweep, base
