"""params.yaml -> Config: YAML read strictly (duplicate keys refused), presets merged, `-S key=value`
overrides applied, every error in one line; and the config written back (YAML, JSON, differences).
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .fields import ConfigError, flatten, set_dotted
from .schema import LOSS_LAWS, Config, law_fields, noise_tag

PRESETS_FILE = Path(__file__).parents[1] / "presets.yaml"


# Keys that were renamed, old -> new (a dotted key, or a prefix of one: the longest match wins). Files,
# sweep files and `-S` overrides with an old key still work, with one note per key naming the new one.
RENAMED = {"fid": "metrics", "fid.metrics": "metrics.names",
           **{f"launcher.{k}": f"launcher.slurm.{k}" for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb",
                                                             "account", "qos", "array_parallelism")}}
_NOTED: set = set()


def renamed(key: str) -> str:
    """The current name of a dotted key that may use a renamed one."""
    for old in sorted(RENAMED, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return RENAMED[old] + key[len(old):]
    return key


def note_once(text: str, where: str | None) -> None:
    """One line on stderr per note and place; where=None: no note (a stored config read back, e.g. a
    model header written before a rename)."""
    if where is not None and (text, where) not in _NOTED:
        _NOTED.add((text, where))
        print(f"note: {where + ': ' if where else ''}{text}", file=sys.stderr)


def note_renamed(old: str, new: str, where: str | None) -> None:
    """The note on a renamed key (it keeps working)."""
    note_once(f"{old} is now {new} (the old key still works; rename it)", where)


def renamed_keys(values: dict, where: str | None = "") -> dict:
    """A mapping of dotted keys with the renamed ones under their current names (noted)."""
    out = {}
    for k, v in values.items():
        new = renamed(k)
        if new != k:
            note_renamed(k, new, where)
        out[new] = v
    return out


def renamed_sections(raw: dict, where: str | None = "") -> dict:
    """A nested params mapping with renamed sections and fields moved to their current names (noted).
    Two different values under the old and the new name are refused (which one was meant is not known);
    a stored config (where=None) keeps the current one."""
    old = {k: v for k, v in flatten(raw).items() if renamed(k) != k}
    if not old:
        return raw
    out = copy.deepcopy(raw)
    for k in old:
        _pop_dotted(out, k)
    current = flatten(out)
    for k, v in old.items():
        new, top = renamed(k), k.split(".")[0]
        if renamed(top) != top:
            note_renamed(top, renamed(top), where)       # the section
        if new != renamed(top) + k[len(top):]:             # a field renamed (inside it)
            note_renamed(k, new, where)
        if new not in current:
            set_dotted(out, new, v)
        elif current[new] != v and where is not None:
            raise ConfigError(f"{where + ': ' if where else ''}{k}={v!r} and {new}={current[new]!r} are the same "
                              f"setting under its old and new name: keep only {new}")
    return out


def _pop_dotted(d: dict, key: str) -> None:
    """Remove a dotted key, and the sections it leaves empty."""
    head, _, rest = key.partition(".")
    if rest and isinstance(d.get(head), dict):
        _pop_dotted(d[head], rest)
        if not d[head]:
            del d[head]
    else:
        d.pop(head, None)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.ref_lr=0.01` -> ('train.ref_lr', 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        reason = str(getattr(err, "problem", None) or err.__class__.__name__)
        raise ConfigError(f"override '{text}': the value is not valid YAML ({reason})") from None


def presets(internal: bool = False) -> dict[str, dict]:
    """The presets by name; entries whose name starts with '_' only serve as `base:` of others."""
    with open(PRESETS_FILE) as f:
        table = yaml.safe_load(f)
    return table if internal else {k: v for k, v in table.items() if not k.startswith("_")}


def preset(name: str) -> dict:
    """A preset's values, with `base:` presets merged underneath (deep merge)."""
    if name not in presets():
        raise ConfigError(f"preset={name!r}: unknown preset; choose one of {', '.join(sorted(presets()))}")
    return _merged(name, presets(internal=True))


def _merged(name: str, table: dict) -> dict:
    entry = dict(table[name])
    base = entry.pop("base", None)
    return _deep_merge(_merged(base, table), entry) if base else entry


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def format_errors(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        path = ""
        for i, part in enumerate(loc):
            if i == 1 and loc[0] == "loss" and part in LOSS_LAWS:
                continue                               # the tagged union's variant: loss.noise says it
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if path and isinstance(e.get("input"), dict) and re.match(r"^[\w.\[\]]+=", msg):
            lines.append(msg)                          # a section's own rule names its field already
        elif path:
            lines.append(f"{path}={e.get('input')!r}: {msg}" if e["type"] != "extra_forbidden" else f"{path}: {msg}")
        else:
            lines.append(msg)
    return "\n".join(lines)


def resolve(raw: dict | None = None, overrides: dict[str, Any] | list[str] | None = None, where: str | None = "") -> Config:
    """Build a validated Config from a raw mapping, its preset and dotted overrides (`where`: the file the
    mapping came from, for the note on a renamed key; None: a stored config, no note)."""
    raw = renamed_sections(copy.deepcopy(raw or {}), where)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    over: dict = {}
    for k, v in renamed_keys(overrides or {}, "override").items():
        set_dotted(over, k, v)
    raw = _deep_merge(switch_noise_law(raw, over), over)
    if raw.get("preset") is not None and not isinstance(raw["preset"], str):
        raise ConfigError(f"preset={raw['preset']!r}: expected a preset name, one of {', '.join(sorted(presets()))}")
    if raw.get("preset"):
        raw = _deep_merge(switch_noise_law(renamed_sections(preset(raw["preset"]), "presets.yaml"), raw), raw)
    raw = one_noise_law(raw, where, {k for k in (overrides or {}) if renamed(k).startswith("loss.")})
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, raw)) from None


# --- the loss section, a tagged union (schema.LOSS_LAWS) ------------------------------------------------
def _law(raw: dict) -> Any:
    loss = raw.get("loss")
    return noise_tag(loss if isinstance(loss, dict) else {})


def switch_noise_law(lower: dict, upper: dict) -> dict:
    """`lower` without its old law's fields when the layer above it (overrides over a file, a file over
    its preset) names another law in loss.noise: naming the tag picks the variant, whose fields start
    from that law's defaults (`-S loss.noise=loguniform` over a params.yaml with P_mean works)."""
    up = upper.get("loss")
    if not isinstance(up, dict) or "noise" not in up or up["noise"] == _law(lower) or up["noise"] not in LOSS_LAWS \
            or not isinstance(lower.get("loss"), dict):
        return lower
    keep = LOSS_LAWS[up["noise"]].model_fields
    return {**lower, "loss": {k: v for k, v in lower["loss"].items() if k in keep}}


def one_noise_law(raw: dict, where: str | None, overridden: set = frozenset()) -> dict:
    """The loss section with only its law's fields. Another law's field (the flat section before the
    union held them all) is dropped when it has that law's default value (with a note; silently in a
    stored config, where=None) and refused otherwise: it would not do what it says. `overridden`: the
    dotted keys an override set (the error names the override, not the file)."""
    loss, law = raw.get("loss"), _law(raw)
    if not isinstance(loss, dict):
        return raw
    if law not in LOSS_LAWS:
        raise ConfigError(f"loss.noise={law!r}: unknown noise law; choose one of {', '.join(LOSS_LAWS)}")
    owners = {f: name for name in LOSS_LAWS for f in law_fields(name) if name != law}
    strays = {k: owners[k] for k in loss if k in owners and k not in law_fields(law)}
    for k, owner in strays.items():
        default = LOSS_LAWS[owner].model_fields[k].default
        place = "override" if f"loss.{k}" in overridden else where
        if place is not None and loss[k] != default:
            raise ConfigError(f"{place + ': ' if place else ''}loss.{k}={loss[k]!r} belongs to the {owner} noise law, "
                              f"not to loss.noise={law} (whose fields are {', '.join(law_fields(law))}): set "
                              f"loss.noise={owner} or remove it")
        note_once(f"loss.{k}={loss[k]!r} belongs to the {owner} noise law, unused with loss.noise={law}: "
                  f"ignored (remove it)", place)
    return {**raw, "loss": {k: v for k, v in loss.items() if k not in strays}} if strays else raw


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    raw = read_yaml(path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if not raw:
        raise ConfigError(f"{path}: empty (no sections); start from the project's params.yaml")
    return resolve(raw, overrides, str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's contents; a missing, unreadable, non-UTF-8 or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{path}: not valid YAML{where} ({reason})") from None


def yaml_dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def json_dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def diff(a: Config | dict, b: Config | dict, sections: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Fields whose values differ between two configs: {dotted key: (a, b)}."""
    fa = flatten(a.to_dict() if isinstance(a, Config) else a)
    fb = flatten(b.to_dict() if isinstance(b, Config) else b)
    keys = sorted(set(fa) | set(fb))
    if sections is not None:
        keys = [k for k in keys if k.split(".")[0] in sections]
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}

