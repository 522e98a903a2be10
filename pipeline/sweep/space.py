"""The search space: axis kinds as one table, the plan (every trial's values known in advance where
the algorithm allows), and the mapping between dotted config keys and Tune's parameter names.

Adding an axis kind: one `AxisKind` entry in AXIS_KINDS (its draw for random search, its Tune
distribution for model-based search, the values that must validate) and its field in
schema.AxisSpec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

AXIS_SEP = "__"                     # Tune flattens nested keys with "/": keep dotted keys flat and safe
POINT = "_point"                    # grid and random search: Tune gets the plan's points as one grid axis
TRIAL = "_trial"                    # inside a point: the trial's stable name (its folder), e.g. t0003


@dataclass(frozen=True)
class AxisKind:
    """One way of giving an axis's values. `draw(rng, spec)`: one value for random search (numpy
    Generator); `tune(spec)`: Tune's distribution for model-based search; `listed`: the spec is a list
    of values (grid, choice), else a (low, high) range."""
    draw: Callable[[Any, Any], Any] | None
    tune: Callable[[Any], Any] | None
    listed: bool


def _tune(name: str):
    def make(spec):
        from ray import tune
        return getattr(tune, name)(*([list(spec)] if name == "choice" else spec))
    return make


AXIS_KINDS: dict[str, AxisKind] = {
    "grid": AxisKind(draw=None, tune=None, listed=True),                   # every value, in every combination
    "choice": AxisKind(draw=lambda rng, v: v[int(rng.integers(len(v)))], tune=_tune("choice"), listed=True),
    "uniform": AxisKind(draw=lambda rng, v: float(rng.uniform(*v)), tune=_tune("uniform"), listed=False),
    "loguniform": AxisKind(draw=lambda rng, v: float(math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))),
                           tune=_tune("loguniform"), listed=False),
}


def axis_name(key: str) -> str:
    return key.replace(".", AXIS_SEP)


def axis_key(name: str) -> str:
    return name.replace(AXIS_SEP, ".")


def trial_name(index: int) -> str:
    """The stable name of the plan's trial `index` (grid, random): its folder under trials/ and its row
    in the results; a resumed sweep finds its trials by these names, not by Ray's state."""
    return f"t{index:04d}"


def grid_trial_points(sweep) -> list[dict]:
    """Every combination of the grid axes, `num_samples` times (repeats of the grid)."""
    import itertools
    keys = list(sweep.search)
    combos = list(itertools.product(*(sweep.search[k].spec for k in keys))) or [()]
    return [dict(zip(keys, c)) for c in combos] * sweep.num_samples


def draw_points(sweep) -> list[dict]:
    """Random search, drawn here from the sweep's seed (numpy): the same file draws the same values,
    another seed others, and --dry-run shows exactly what will run."""
    import numpy as np
    rng = np.random.default_rng(sweep.seed)
    points = []
    for _ in range(sweep.num_samples):
        point = {}
        for key in sorted(sweep.search):                     # sorted: the draw order does not follow the file's
            a = sweep.search[key]
            point[key] = AXIS_KINDS[a.kind].draw(rng, a.spec)
        points.append(point)
    return points


def tune_space(sweep) -> dict:
    """The axes as Tune distributions (model-based search proposes the points during the sweep)."""
    return {axis_name(k): AXIS_KINDS[a.kind].tune(a.spec) for k, a in sweep.search.items()}


def point_space(points: list[tuple[str, dict]]) -> dict:
    """Tune's space for a planned search: exactly `points` ((name, values) still to run) as one grid
    axis, each carrying its trial name."""
    from ray import tune
    return {POINT: tune.grid_search([{TRIAL: name, **{axis_name(k): v for k, v in pt.items()}}
                                     for name, pt in points])}


def split_config(config: dict, fallback: str) -> tuple[str, dict]:
    """(trial name, {dotted key: value}) from a Tune trial config; unplanned trials are named by Tune's id."""
    flat = {**(config.get(POINT) or {}), **{k: v for k, v in config.items() if k != POINT}}   # never mutate Tune's
    name = flat.pop(TRIAL, None) or fallback
    return str(name), {axis_key(k): v for k, v in flat.items()}


def searched_range(axis) -> tuple:
    """(lo, hi) of a numeric axis as searched (not only the values drawn); a text axis: its values."""
    values = list(axis.spec)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return (min(values), max(values))
    return tuple(values)
