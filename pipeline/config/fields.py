"""The field types and rules every section uses (a wrong value names the field, the value and the
rule), the section base class, which fields stay out of the run key, and dotted keys.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ..devices import DEVICE_PATTERN
from ..errors import PipelineError

SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)  # method.md 6: sigma_rel < sqrt(1/12) ~= 0.2887

# A torch.compile switch: true, false, or "auto" (compile when the run's work passes the measured
# break-even, devices.COMPILE_BREAK_EVEN).
CompileSwitch = Union[bool, Literal["auto"]]


class ConfigError(PipelineError, ValueError):
    """A configuration value broke a rule; the message is one line per broken rule."""


def _sigma_rel(v: float) -> float:
    if not (0.0 < v < SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f})")
    return v


def _positive(v):
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def _non_negative(v):
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


def _power_of_two(v: int) -> int:
    if v < 4 or (v & (v - 1)) != 0:
        raise ValueError("must be a power of two >= 4")
    return v

SigmaRel = Annotated[float, AfterValidator(_sigma_rel)]

PosFloat = Annotated[float, AfterValidator(_positive)]

PosInt = Annotated[int, AfterValidator(_positive)]

NonNegFloat = Annotated[float, AfterValidator(_non_negative)]

NonNegInt = Annotated[int, AfterValidator(_non_negative)]

SEED_LIMIT = 1 << 63                   # torch's generators take seeds below 2^63 (signed 64-bit)


def _seed(v: int) -> int:
    if not 0 <= v < SEED_LIMIT:
        raise ValueError("a seed must be in [0, 2^63)")
    return v

Seed = Annotated[int, AfterValidator(_seed)]


def _device(v: str) -> str:
    if not re.match(DEVICE_PATTERN, v):
        raise ValueError("expected auto, cpu, cuda or cuda:N (GPU N of several)")
    return v

Device = Annotated[str, AfterValidator(_device)]     # resolved by devices.pick_device


def _not_nan(v: float) -> float:
    if math.isnan(v):
        raise ValueError("must be a number (not NaN)")
    return v


def _unit_interval(v: float) -> float:
    if not (0.0 <= v < 1.0):
        raise ValueError("must be in [0, 1)")
    return v

# Fields marked NOT_IN_KEY do not change what a training run computes (paths, devices, logging
# intervals, evaluation settings, bit-identical speed switches): Config.run_key() leaves them out,
# so changing one resumes the same run instead of archiving it.
NOT_IN_KEY = {"run_key": False}


def off_key(*default: Any, **kw) -> Any:
    """A field that is not part of the run key (see NOT_IN_KEY): off_key(value) or off_key(default_factory=f)."""
    return Field(*default, json_schema_extra=NOT_IN_KEY, **kw)


def _takes_numbers_only(annotation) -> bool:
    """True for int/float fields (bare, Annotated, Optional, Literal of numbers): pydantic would turn a
    YAML `true` into 1 there."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (int, float):
        return True
    if origin is Annotated:
        return _takes_numbers_only(args[0])
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_takes_numbers_only(a) for a in kinds)
    if origin is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    return False


def _element_type(annotation):
    """The element type of list[...] / tuple[...] (also inside Optional/Annotated), else None."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _element_type(args[0])
    if origin in (Union, types.UnionType):
        for a in args:
            if _element_type(a) is not None:
                return _element_type(a)
    if origin in (list, tuple) and args:
        return args[0]
    return None


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and infinities are refused at load time (a float field that may be
    # infinite says so itself), not found after ten steps of non-finite losses.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, v, info):
        """`true`/`false` are not numbers and numbers are not switches: `-S train.batch_size=true` and
        `-S train.compile=1` are refused, not read as 1 and true."""
        ann = cls.model_fields[info.field_name].annotation
        if (ann is bool or ann == Optional[bool]) and not isinstance(v, bool) and not (ann != bool and v is None):
            raise ValueError("expected true or false")
        if ann == CompileSwitch and not isinstance(v, bool) and v != "auto":
            raise ValueError("expected true or false (or auto)")
        if isinstance(v, bool) and _takes_numbers_only(ann):
            raise ValueError("expected a number, got a boolean (true/false)")
        elem = _element_type(ann)
        if isinstance(v, (list, tuple)) and elem is not None and _takes_numbers_only(elem) \
                and any(isinstance(x, bool) for x in v):
            raise ValueError("expected numbers, got a boolean (true/false)")
        return v


def _at_most(hi: int):
    def check(v: int) -> int:
        if v > hi:
            raise ValueError(f"must be <= {hi}")
        return v
    return AfterValidator(check)


def _balance(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("a blend weight t must be in [0, 1]")
    return v

Balance = Annotated[float, AfterValidator(_balance)]


def _in_unit(v: float, name: str) -> float:
    return _unit_interval(v)


def at_least(v: int, lo: int) -> int:
    if v < lo:
        raise ValueError(f"must be >= {lo}")
    return v


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; unknown keys are caught later by the schema (extra=forbid)."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value

