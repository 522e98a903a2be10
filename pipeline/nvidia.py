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
import copyreg
import hashlib
import io
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
# NVIDIA's init arguments this project's network takes, by name (Precond's and the U-Net's).
PRECOND_ARGS = {"img_resolution", "img_channels", "label_dim", "sigma_data", "logvar_channels"}
UNET_ARGS = {"model_channels", "channel_mult", "num_blocks", "attn_resolutions", "channels_per_head", "dropout",
             "label_balance", "concat_balance", "res_balance", "clip_act"}


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
            RuntimeError, MemoryError) as err:
        raise NvidiaImportError(f"{path}: not a readable pickle, or truncated ({err.__class__.__name__}: "
                                f"{str(err)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Persistent):
        raise NvidiaImportError(f"{path}: holds no EDM2 network (expected a dict with 'ema', got "
                                f"{type(data).__name__}{' with keys ' + str(sorted(map(str, data))[:6]) if isinstance(data, dict) else ''})")
    return data


def module_tensors(obj: Persistent | _Container, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a recorded module tree: parameters and persistent buffers, children's by
    dotted name (as torch.nn.Module.state_dict names them)."""
    state = obj.state
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if v is None or (group == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise NvidiaImportError(f"{prefix}{k} is a {type(v).__name__}, not a tensor")
            out[prefix + k] = v.detach()
    for k, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (Persistent, _Container)):
            raise NvidiaImportError(f"{prefix}{k} is a {type(child).__name__}, not a module")
        out.update(module_tensors(child, f"{prefix}{k}."))
    return out


def _plain(v):
    """Tuples as lists: recorded init arguments compared with, and written as, JSON values."""
    return list(v) if isinstance(v, tuple) else v


def network_args(ema: Persistent) -> tuple[dict, dict]:
    """NVIDIA's recorded init arguments -> (this project's network overrides, build arguments).
    Arguments whose value this project's network fixes are accepted at that value; any other is named."""
    if ema.class_name != "Precond":
        raise NvidiaImportError(f"'ema' is a {ema.class_name}, not EDM2's Precond")
    unet = (ema.state.get("_modules") or {}).get("unet")
    if not isinstance(unet, Persistent) or unet.class_name != "UNet":
        raise NvidiaImportError("'ema' holds no EDM2 UNet under 'unet'")
    kw = ema.state.get("_init_kwargs")
    if not isinstance(kw, dict) or ema.state.get("_init_args") not in ((), [], None):
        raise NvidiaImportError("'ema' records no init keyword arguments (_init_kwargs), or positional ones")
    kw = dict(kw)
    mult = list(kw.get("channel_mult", (1, 2, 3, 4)))
    fixed = {"use_fp16": None,                              # this project's autocast decides; recorded only
             "channel_mult_noise": (None, mult[0]), "channel_mult_emb": (None, max(mult)),
             "resample_filter": ([1, 1],), "attn_balance": (kw.get("res_balance", 0.3),)}
    refused = []
    for k, allowed in fixed.items():
        if k in kw:
            v = kw.pop(k)
            if allowed is not None and _plain(v) not in allowed:
                refused.append(f"{k}={v!r}")
    unknown = sorted(set(kw) - PRECOND_ARGS - UNET_ARGS)
    refused += [f"{k}={kw[k]!r}" for k in unknown]
    if refused:
        raise NvidiaImportError(f"init arguments this project's network cannot take: {', '.join(refused)}")
    missing = sorted({"img_resolution", "img_channels"} - set(kw))
    if missing:
        raise NvidiaImportError(f"init arguments missing: {', '.join(missing)}")
    over = {f"network.{k}": _plain(v) for k, v in kw.items() if k in UNET_ARGS}
    if "logvar_channels" in kw:
        over["network.logvar_channels"] = kw["logvar_channels"]
    if "sigma_data" in kw:
        over["loss.sigma_data"] = float(kw["sigma_data"])
    args = {"img_resolution": int(kw["img_resolution"]), "img_channels": int(kw["img_channels"]),
            "label_dim": int(kw.get("label_dim", 0))}
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
    return out


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


def import_files(paths: Sequence[str | Path], out_dir: str | Path, kind: str = "auto",
                 log=print) -> list[Path]:
    """NVIDIA's files (or folders of them) -> this project's safetensors in out_dir: models as
    `ema-<nimg>-<sigma_rel>.safetensors` (reconstruct's format: evaluate, sample), raw snapshots as
    `phema-<nimg>-<sigma_rel>.safetensors` (the reconstruct stage's input). Every file is read and
    checked before the first is written."""
    from . import config as C
    from .io import check_writable, files_in, save_safetensors
    from .networks import build_network
    from .phema import (RECONSTRUCTION_FORMAT, SNAPSHOT_FORMAT, reconstruction_name, sigma_rel_to_gamma,
                        check_sigma_rel, snapshot_name)
    files = files_in(paths, lambda f: f.suffix == ".pkl", NvidiaImportError, ".pkl files")
    out = Path(out_dir)
    check_writable(out, "--out")
    plans = []
    for f in files:
        m = NAME_RE.match(f.name)
        if not m:
            raise NvidiaImportError(f"{f.name}: not named as EDM2 names its files (<name>-<kimg>-<sigma_rel>.pkl, "
                                    f"e.g. edm2-img512-xs-2147483-0.135.pkl); rename it so the training time and EMA "
                                    f"length are known")
        as_snapshot = kind == "snapshot" or (kind == "auto" and m["prefix"] == SNAPSHOT_PREFIX)
        nimg, sigma_rel = nimg_of_kimg(int(m["kimg"]), f.name), check_sigma_rel(float(m["std"]), f.name)
        data = read_pickle(f)
        over, args = network_args(data["ema"])
        over.update(loss_args(data.get("loss_fn")))
        encoder = encoder_kind(data)
        over.update({"data.resolution": args["img_resolution"], "data.encoder": encoder,
                     **({"data.channels": args["img_channels"]} if encoder == "pixel" else
                        {"data.channels": 3, "data.vae_path": "stabilityai/sd-vae-ft-mse (not part of the file)"})})
        try:
            cfg = C.resolve({}, over)
            net = build_network(cfg, **args)
        except (C.ConfigError, TypeError, ValueError, RuntimeError) as err:
            raise NvidiaImportError(f"{f.name}: its init arguments build no network here ({str(err).splitlines()[0]})") \
                from None
        have = {RENAMED.get(k, k): v for k, v in module_tensors(data["ema"]).items()}
        want = net.state_dict()
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise NvidiaImportError(f"{f.name}: its tensors do not match the network its init arguments describe "
                                    f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for k, t in have.items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise NvidiaImportError(f"{f.name}: tensor {k} is {list(t.shape)}, the network needs {list(want[k].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NvidiaImportError(f"{f.name}: tensor {k} holds non-finite values")
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        plans.append((f, as_snapshot, nimg, sigma_rel, cfg, args, have, digest,
                      data["ema"].state.get("_init_kwargs", {})))
    snap_nimgs = sorted({p[2] for p in plans if p[1]})
    interval = min((b - a for a, b in zip(snap_nimgs, snap_nimgs[1:])), default=None)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for f, as_snapshot, nimg, sigma_rel, cfg, args, tensors, digest, init_kwargs in plans:
        source = {"imported_from": "nvidia-edm2", "source_file": f.name, "source_sha256": digest,
                  "nvidia_init_kwargs": {k: _plain(v) for k, v in init_kwargs.items()}}
        meta = {"config": cfg.to_dict(), "net_args": args, "model_key": cfg.run_key(), "nimg": nimg,
                "sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel), **source}
        if as_snapshot:
            dst = out / snapshot_name(nimg, sigma_rel)
            save_safetensors({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
                             {**meta, "format": SNAPSHOT_FORMAT, "dtype": "float16", "snapshot_nimg": interval}, dst)
        else:
            dst = out / reconstruction_name(nimg, sigma_rel)
            save_safetensors({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()},
                             {**meta, "format": RECONSTRUCTION_FORMAT, "sources": [f.name]}, dst)
        log(f"{f.name} -> {dst} ({'snapshot' if as_snapshot else 'model'}, nimg {nimg}, sigma_rel {sigma_rel:.3f}, "
            f"{sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters)")
        written.append(dst)
    return written
