"""NVIDIA EDM2's released networks and raw post-hoc EMA snapshots, read without running anything in them
(docs/method.md 9; docs/data.md, "Using NVIDIA's released models").

NVIDIA's files are pickles whose classes travel as Python source inside the file: unpickling them the
ordinary way executes that source. Here a restricted unpickler resolves only an allow-list of globals
(tensor rebuilding, plain containers, numpy arrays); the persistent-class reconstructor is replaced by a
function that keeps the recorded class name and state and never looks at the embedded source. What is
recognised (EDM2's Precond and its parts, its pixel and VAE encoders, its loss) becomes this project's
network, built from the recorded init arguments, and is written as this project's safetensors model or
snapshot (the source file's name and sha256 in its header). Anything else is refused in one line.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import PipelineError

# The global NVIDIA's persistence module pickles every EDM2 object as; mapped to `_persistent` below.
PERSISTENT_RECONSTRUCTOR = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# Classes a network file may hold, by the name recorded in it, and their role.
NETWORK_CLASSES = {"Precond", "UNet", "Block", "MPConv", "MPFourier"}
ENCODER_CLASSES = {"StandardRGBEncoder": "pixel", "StabilityVAEEncoder": "vae"}
OTHER_CLASSES = {"EDM2Loss"}                         # training snapshots carry the loss; not used
KNOWN_CLASSES = NETWORK_CLASSES | set(ENCODER_CLASSES) | OTHER_CLASSES
# Plain classes pickled by reference with their __dict__ (torch containers, dnnlib's EasyDict).
CONTAINERS = {("torch.nn.modules.container", n) for n in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict",
                                                         "ParameterList")}
# NVIDIA's file names: <prefix>-<kimg, digits>-<std, d.ddd>.pkl (released models and raw snapshots).
NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<kimg>\d+)-(?P<std>\d\.\d+)\.pkl$")
SNAPSHOT_PREFIX = "network-snapshot"
# Tensor names that differ between NVIDIA's network and this project's (same tensor, other name).
RENAMED = {"unet.out_conv.weight": "unet.conv_out.weight"}

# NVIDIA's persistence records only the keyword arguments that were passed (train_edm2.py passes
# model_channels, dropout, use_fp16 and the data's resolution, channels and label_dim): every other
# argument takes the default of NVIDIA's constructors, here as facts read from their code.
NVIDIA_DEFAULTS_FROM = "NVlabs/edm2 training/networks_edm2.py at 4bf8162 (Autoguidance release, 2024)"
NVIDIA_DEFAULTS = {
    # Precond
    "use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128,
    # UNet
    "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_noise": None, "channel_mult_emb": None,
    "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5, "concat_balance": 0.5,
    # Block (head count = width // channels_per_head, floored)
    "resample_filter": [1, 1], "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3, "attn_balance": 0.3,
    "clip_act": 256,
}
REQUIRED_ARGS = ("img_resolution", "img_channels", "label_dim")     # Precond's positional arguments
# The type of each recorded argument: a value of another type is refused by name (never coerced).
ARG_KINDS = {"img_resolution": "pos_int", "img_channels": "pos_int", "label_dim": "int", "use_fp16": "bool",
             "sigma_data": "pos_float", "logvar_channels": "pos_int", "model_channels": "pos_int",
             "channel_mult": "pos_ints", "channel_mult_noise": "pos_int?", "channel_mult_emb": "pos_int?",
             "num_blocks": "pos_int", "attn_resolutions": "ints", "label_balance": "float",
             "concat_balance": "float", "resample_filter": "ints", "channels_per_head": "pos_int",
             "dropout": "float", "res_balance": "float", "attn_balance": "float", "clip_act": "pos_float?"}
# Recorded init arguments this project's network takes, by its config name.
NETWORK_FIELDS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "channels_per_head",
                  "dropout", "label_balance", "concat_balance", "res_balance", "clip_act", "logvar_channels")
MAX_WALK_DEPTH = 64                  # module nesting of a real EDM2 file: 4 (Precond > UNet > dict > Block > conv)


class NvidiaImportError(PipelineError, ValueError):
    """A file that is not one of NVIDIA's EDM2 networks, or holds something that is not allowed."""


class Persistent:
    """A persistent-class object as recorded in the file: its class name and state, never its code."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state


class _Container:
    """A plain class pickled by reference (a torch container, dnnlib's EasyDict): its state only."""
    qualname = "?"

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


class EasyDict(dict):
    """dnnlib.util.EasyDict as data: a dict (the top level of every EDM2 network file)."""

    def __setstate__(self, state):                    # an EasyDict's own __dict__ is empty
        pass


def _persistent(meta: Any) -> Persistent:
    """Stands in for NVIDIA's persistent-class reconstructor: `module_src` is never read."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state"), dict):
        raise NvidiaImportError("a persistent object whose record is not a class with a state")
    if meta["class_name"] not in KNOWN_CLASSES:
        raise NvidiaImportError(f"a persistent object of class {meta['class_name']!r}, which is none of EDM2's "
                                f"({', '.join(sorted(KNOWN_CLASSES))})")
    return Persistent(meta["class_name"], meta["state"])


def _storage_from_bytes(data: bytes):
    """A tensor storage: torch's own bytes, read with weights_only (no pickle inside runs anything)."""
    if not isinstance(data, (bytes, bytearray)):
        raise NvidiaImportError("a tensor storage that is not bytes")
    return torch.load(io.BytesIO(data), weights_only=True)


def _reconstructor(cls, base, state):                 # copyreg._reconstructor, protocols 0 and 1
    if not (isinstance(cls, type) and issubclass(cls, (_Container, EasyDict)) and base is object):
        raise NvidiaImportError(f"copyreg._reconstructor of {cls!r}")
    return cls.__new__(cls)


_container_types: dict[str, type] = {}


def _container(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _container_types:
        _container_types[key] = type(name, (_Container,), {"qualname": key})
    return _container_types[key]


def _numpy_global(module: str, name: str):
    import numpy as np
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    return None


class SafeUnpickler(pickle.Unpickler):
    """Resolves only what a network file of EDM2 holds; everything else is refused by name."""

    def find_class(self, module: str, name: str):
        if (module, name) == PERSISTENT_RECONSTRUCTOR:
            return _persistent
        if (module, name) == ("dnnlib.util", "EasyDict"):
            return EasyDict
        if (module, name) in CONTAINERS:
            return _container(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("builtins", "set"), ("__builtin__", "set")):
            return set
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        found = _numpy_global(module, name) if module.startswith("numpy") else None
        if found is not None:
            return found
        raise NvidiaImportError(f"the pickle calls {module}.{name}, which is not on the list of what an EDM2 "
                                f"network file may hold (nothing was run)")

    def persistent_load(self, pid):
        raise NvidiaImportError("the pickle uses persistent ids (a torch.save file, not an EDM2 network pickle)")


def read_pickle(path: str | Path) -> dict:
    """The top level of an EDM2 network file (`ema`, `encoder`, ...) with nothing in it executed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = SafeUnpickler(f).load()
    except NvidiaImportError as err:
        raise NvidiaImportError(f"{path}: refused: {err}") from None
    except OSError as err:
        raise NvidiaImportError(f"{path}: cannot read ({err.strerror or err})") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, RecursionError) as err:
        raise NvidiaImportError(f"{path}: not a readable pickle, or truncated ({err.__class__.__name__}: "
                                f"{str(err)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Persistent):
        raise NvidiaImportError(f"{path}: holds no EDM2 network (expected a dict with 'ema', got "
                                f"{type(data).__name__}{' with keys ' + str(sorted(map(str, data))[:6]) if isinstance(data, dict) else ''})")
    return data


def module_tensors(obj: Persistent | _Container, prefix: str = "", _seen: set | None = None,
                   _depth: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a recorded module tree: parameters and persistent buffers, children's by
    dotted name (as torch.nn.Module.state_dict names them). Each module is visited once: a module met
    twice (shared, or its own ancestor) or nested deeper than any EDM2 file is refused, so a crafted
    tree cannot make the walk exponential or endless."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        raise NvidiaImportError(f"module {prefix.rstrip('.') or '<root>'} appears twice in the module tree "
                                f"(shared or self-referencing): not a network as EDM2 writes it")
    if _depth > MAX_WALK_DEPTH:
        raise NvidiaImportError(f"module tree nested deeper than {MAX_WALK_DEPTH} levels at {prefix[:80]}...: "
                                f"not a network as EDM2 writes it")
    seen.add(id(obj))
    state = obj.state
    skip = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset, list, tuple)):
        raise NvidiaImportError(f"{prefix}_non_persistent_buffers_set is a {type(skip).__name__}, not a set")
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group) or {}, dict):
            raise NvidiaImportError(f"{prefix or '<root>.'}{group} is a {type(state.get(group)).__name__}, "
                                    f"not a mapping")
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if v is None or (group == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise NvidiaImportError(f"{prefix}{k} is a {type(v).__name__}, not a tensor")
            if not v.is_floating_point():
                raise NvidiaImportError(f"tensor {prefix}{k} is {str(v.dtype).replace('torch.', '')}: EDM2's networks "
                                        f"hold floating-point tensors only")
            out[prefix + str(k)] = v.detach()
    for k, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (Persistent, _Container)):
            raise NvidiaImportError(f"{prefix}{k} is a {type(child).__name__}, not a module")
        out.update(module_tensors(child, f"{prefix}{k}.", seen, _depth + 1))
    return out


def _plain(v):
    """Tuples as lists: recorded init arguments compared with, and written as, JSON values."""
    return list(v) if isinstance(v, tuple) else v


def _typed(name: str, v: Any):
    """A recorded init argument as the plain value its kind allows, or a refusal that names it."""
    import numbers
    kind = ARG_KINDS[name]
    if kind.endswith("?"):
        if v is None:
            return None
        kind = kind[:-1]
    bad = NvidiaImportError(f"init argument {name}={v!r:.60} is not {_KIND_TEXT[kind]}")
    is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if kind == "bool":
        if isinstance(v, bool) or (is_int and v in (0, 1)):
            return bool(v)
        raise bad
    if kind in ("int", "pos_int"):
        if not is_int or (kind == "pos_int" and v <= 0) or v < 0:
            raise bad
        return int(v)
    if kind in ("float", "pos_float"):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) \
                or (kind == "pos_float" and v <= 0):
            raise bad
        return float(v)
    if not isinstance(v, (list, tuple)) or len(v) > 64 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= (1 if kind == "pos_ints" else 0)
            for x in v) or (kind == "pos_ints" and not v):
        raise bad
    return [int(x) for x in v]


_KIND_TEXT = {"bool": "a boolean", "int": "an integer >= 0", "pos_int": "a positive integer",
              "float": "a finite number", "pos_float": "a positive number",
              "pos_ints": "a non-empty list of positive integers", "ints": "a list of integers >= 0"}


def recorded_args(ema: Persistent) -> tuple[dict, list[str]]:
    """The init arguments of the file's Precond: the recorded ones (typed) over NVIDIA's defaults, and
    the names of those that were not recorded (taken from NVIDIA_DEFAULTS)."""
    if ema.class_name != "Precond":
        raise NvidiaImportError(f"'ema' is a {ema.class_name}, not EDM2's Precond")
    unet = (ema.state.get("_modules") or {}).get("unet") if isinstance(ema.state.get("_modules"), dict) else None
    if not isinstance(unet, Persistent) or unet.class_name != "UNet":
        raise NvidiaImportError("'ema' holds no EDM2 UNet under 'unet'")
    kw = ema.state.get("_init_kwargs")
    if not isinstance(kw, dict) or ema.state.get("_init_args") not in ((), [], None):
        raise NvidiaImportError("'ema' records no init keyword arguments (_init_kwargs), or positional ones")
    unknown = sorted(str(k) for k in kw if k not in ARG_KINDS)
    if unknown:
        raise NvidiaImportError(f"init arguments this project's network cannot take: "
                                f"{', '.join(f'{k}={kw[k]!r:.40}' for k in unknown)}")
    missing = [k for k in REQUIRED_ARGS if k not in kw]
    if missing:
        raise NvidiaImportError(f"init arguments missing: {', '.join(missing)} (EDM2's Precond requires them)")
    typed = {k: _typed(k, v) for k, v in kw.items()}
    defaulted = sorted(set(NVIDIA_DEFAULTS) - set(typed))
    return {**NVIDIA_DEFAULTS, **typed}, defaulted


def network_args(ema: Persistent) -> tuple[dict, dict]:
    """NVIDIA's init arguments (recorded, else NVIDIA's defaults) -> (this project's config overrides,
    build arguments). Values this project's network cannot represent are refused by name."""
    kw, _ = recorded_args(ema)
    mult = kw["channel_mult"]
    representable = {   # argument -> (values this project's network computes the same with, what it means)
        "channel_mult_noise": ((None, mult[0]), "the noise embedding is channel_mult[0] wide here"),
        "channel_mult_emb": ((None, max(mult)), "the embedding is max(channel_mult) wide here"),
        "resample_filter": (([1, 1],), "resampling is the [1, 1] box filter here"),
        "attn_balance": ((kw["res_balance"],), "attention blends with res_balance here"),
        "clip_act": (None, "activations are always clipped here (None = no clip cannot be represented)"),
    }
    refused = []
    for k, (allowed, why) in representable.items():
        v = kw[k]
        if (allowed is None and v is None) or (allowed is not None and v not in allowed):
            refused.append(f"{k}={v!r} ({why})")
    if not 0 <= kw["dropout"] <= 1:
        refused.append(f"dropout={kw['dropout']!r} (a probability)")
    if refused:
        raise NvidiaImportError(f"init arguments this project's network cannot take: {'; '.join(refused)}")
    over = {f"network.{k}": kw[k] for k in NETWORK_FIELDS}
    over.update({"network.attention_heads": "floor", "loss.sigma_data": kw["sigma_data"]})
    args = {k: kw[k] for k in REQUIRED_ARGS}
    return over, args


def loss_args(loss_fn) -> dict:
    """A training snapshot's EDM2Loss noise law (P_mean, P_std, sigma_data), so the header's config says
    how the run was trained; nothing when the file has no loss (released models)."""
    if not isinstance(loss_fn, Persistent) or loss_fn.class_name != "EDM2Loss":
        return {}
    st, out = loss_fn.state, {}
    for k in ("P_mean", "P_std", "sigma_data"):
        v = st.get(k, (st.get("_init_kwargs") or {}).get(k))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"loss.{k}"] = float(v)
    return {"loss.noise": "lognormal", **out} if out else out       # EDM2Loss draws ln(sigma) ~ N(P_mean, P_std^2)


def encoder_kind(data: dict) -> str:
    enc = data.get("encoder")
    if enc is None:
        return "pixel"
    if not isinstance(enc, Persistent) or enc.class_name not in ENCODER_CLASSES:
        raise NvidiaImportError(f"'encoder' is a {getattr(enc, 'class_name', type(enc).__name__)}, none of EDM2's "
                                f"encoders ({', '.join(ENCODER_CLASSES)})")
    return ENCODER_CLASSES[enc.class_name]


def nimg_of_kimg(kimg: int, name: str) -> int:
    """EDM2's file names round nimg down to kimg; its snapshots fall on multiples of 1024 images."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise NvidiaImportError(f"{name}: kimg {kimg} is no multiple of 1024 images (EDM2 writes snapshots at those)")
    return nimg


def file_position(f: Path, kimg: int | None = None, sigma_rel: float | None = None) -> tuple[int, float, bool]:
    """(nimg, sigma_rel, is a raw training snapshot) from NVIDIA's file name, or from --kimg / --sigma-rel
    where the name does not carry them; a name and a flag that disagree are refused."""
    from .phema import check_sigma_rel
    m = NAME_RE.match(f.name)
    if m is None and (kimg is None or sigma_rel is None):
        raise NvidiaImportError(f"{f.name}: not named as EDM2 names its files (<name>-<kimg>-<sigma_rel>.pkl, e.g. "
                                f"edm2-img512-xs-2147483-0.135.pkl): give --kimg and --sigma-rel, or rename it")
    if m is not None:
        for flag, given, named in (("--kimg", kimg, int(m["kimg"])), ("--sigma-rel", sigma_rel, float(m["std"]))):
            if given is not None and given != named:
                raise NvidiaImportError(f"{f.name}: its name says {flag[2:]} {named}, {flag} says {given}")
        kimg, sigma_rel = int(m["kimg"]), float(m["std"])
    if kimg <= 0:
        raise NvidiaImportError(f"{f.name}: kimg {kimg}: a snapshot time must be > 0")
    return (nimg_of_kimg(kimg, f.name), check_sigma_rel(float(sigma_rel), f"{f.name}: sigma_rel"),
            m is not None and m["prefix"] == SNAPSHOT_PREFIX)


def plan_import(f: Path, kind: str, kimg: int | None, sigma_rel: float | None) -> dict:
    """One file read and checked against the network it describes; nothing written."""
    from . import config as C
    from .networks import NetworkSizeError, check_state, network_shapes
    nimg, sigma_rel, named_snapshot = file_position(f, kimg, sigma_rel)
    data = read_pickle(f)
    over, args = network_args(data["ema"])
    over.update(loss_args(data.get("loss_fn")))
    encoder = encoder_kind(data)
    over.update({"data.resolution": args["img_resolution"], "data.encoder": encoder,
                 **({"data.channels": args["img_channels"]} if encoder == "pixel" else
                    {"data.channels": 3, "data.vae_path": "stabilityai/sd-vae-ft-mse (not part of the file)"})})
    try:
        cfg = C.resolve({}, over)
    except C.ConfigError as err:
        raise NvidiaImportError(f"{f.name}: its init arguments build no network here ({str(err).splitlines()[0]})") \
            from None
    try:
        want = network_shapes(cfg, **args, copies=2)    # sized first, built without memory (meta device)
    except NetworkSizeError as err:
        raise NvidiaImportError(f"{f.name}: {err}") from None
    have = {RENAMED.get(k, k): v for k, v in module_tensors(data["ema"]).items()}
    check_state(want, have, f.name, NvidiaImportError)
    for k, t in have.items():
        if not torch.isfinite(t).all():
            raise NvidiaImportError(f"{f.name}: tensor {k} holds non-finite values")
    return {"file": f, "snapshot": kind == "snapshot" or (kind == "auto" and named_snapshot), "nimg": nimg,
            "sigma_rel": sigma_rel, "cfg": cfg, "args": args, "tensors": have,
            "digest": hashlib.sha256(f.read_bytes()).hexdigest(),
            "init_kwargs": data["ema"].state.get("_init_kwargs", {})}


def import_files(paths: Sequence[str | Path], out_dir: str | Path, kind: str = "auto", log=print,
                 kimg: int | None = None, sigma_rel: float | None = None) -> list[Path]:
    """NVIDIA's files (or folders of them) -> this project's safetensors in out_dir: models as
    `ema-<nimg>-<sigma_rel>.safetensors` (reconstruct's format: evaluate, sample), raw snapshots as
    `phema-<nimg>-<sigma_rel>.safetensors` (the reconstruct stage's input). Arguments a file does not
    record take NVIDIA's defaults (NVIDIA_DEFAULTS). Every file is read and checked before the first is
    written."""
    from .io import check_writable, files_in, save_safetensors
    from .phema import SNAPSHOT_FORMAT, sigma_rel_to_gamma, snapshot_name
    from .reconstruction import reconstruction_name
    from .snapshots import RECONSTRUCTION_FORMAT
    files = files_in(paths, lambda f: f.suffix == ".pkl", NvidiaImportError, ".pkl files")
    if len(files) > 1 and (kimg is not None or sigma_rel is not None):
        raise NvidiaImportError(f"--kimg / --sigma-rel name one file's position; {len(files)} files were given")
    out = Path(out_dir)
    check_writable(out, "--out")
    plans = [plan_import(f, kind, kimg, sigma_rel) for f in files]
    snap_nimgs = sorted({p["nimg"] for p in plans if p["snapshot"]})
    interval = min((b - a for a, b in zip(snap_nimgs, snap_nimgs[1:])), default=None)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for p in plans:
        cfg, nimg, sigma_rel_, tensors = p["cfg"], p["nimg"], p["sigma_rel"], p["tensors"]
        source = {"imported_from": "nvidia-edm2", "source_file": p["file"].name, "source_sha256": p["digest"],
                  "nvidia_init_kwargs": {str(k): _plain(v) for k, v in p["init_kwargs"].items()},
                  "nvidia_defaults_from": NVIDIA_DEFAULTS_FROM}
        meta = {"config": cfg.to_dict(), "net_args": p["args"], "model_key": cfg.run_key(), "nimg": nimg,
                "sigma_rel": sigma_rel_, "gamma": sigma_rel_to_gamma(sigma_rel_), **source}
        if p["snapshot"]:
            dst = out / snapshot_name(nimg, sigma_rel_)
            save_safetensors({k: v.to(torch.float16) for k, v in tensors.items()},
                             {**meta, "format": SNAPSHOT_FORMAT, "dtype": "float16", "snapshot_nimg": interval}, dst)
        else:
            dst = out / reconstruction_name(nimg, sigma_rel_)
            save_safetensors({k: v.to(torch.float32) for k, v in tensors.items()},
                             {**meta, "format": RECONSTRUCTION_FORMAT, "sources": [p["file"].name]}, dst)
        log(f"{p['file'].name} -> {dst} ({'snapshot' if p['snapshot'] else 'model'}, nimg {nimg}, sigma_rel "
            f"{sigma_rel_:.3f}, {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters)")
        written.append(dst)
    return written
