"""The files of post-hoc EMA (method.md 6): reading snapshot folders and their headers (checked, one
line per refusal), the network a header describes, reconstructed models, and converting the
pickled files of earlier versions.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import SIGMA_REL_MAX
from .io import load_safetensors, read_safetensors_header, save_safetensors
from .phema import SNAPSHOT_FORMAT, SNAPSHOT_RE, PHEMAError, snapshot_name

RECONSTRUCTION_FORMAT = "edm2-pipeline/phema-reconstruction/1"

LEGACY_RE = re.compile(r"^(phema|ema)-\d{10}-\d\.\d{3}\.pt$")     # pickled files of earlier versions

CONVERT_HINT = "python -m pipeline convert --trust {path}"


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    nimg: int
    sigma_rel: float
    size: int


def scan_snapshots(snapshot_dir: str | Path) -> list[SnapshotInfo]:
    """Snapshots in a directory, ordered by (nimg, sigma_rel); checks that the set is complete."""
    d = Path(snapshot_dir)
    if not d.is_dir():
        raise PHEMAError(f"snapshot directory {d} does not exist")
    refuse_legacy(d, "snapshot directory")
    infos = []
    for p in sorted(d.iterdir()):
        m = SNAPSHOT_RE.match(p.name)
        if m:
            infos.append(SnapshotInfo(p, int(m.group(1)), float(m.group(2)), p.stat().st_size))
    if not infos:
        raise PHEMAError(f"snapshot directory {d} holds no snapshots (phema-<nimg>-<sigma_rel>.safetensors)")
    infos.sort(key=lambda s: (s.nimg, s.sigma_rel))
    stds = sorted({s.sigma_rel for s in infos})
    by_nimg: dict[int, set] = {}
    for s in infos:
        by_nimg.setdefault(s.nimg, set()).add(s.sigma_rel)
    for nimg, have in sorted(by_nimg.items()):
        missing = [f"{x:.3f}" for x in stds if x not in have]
        if missing:
            raise PHEMAError(f"{d}: snapshot(s) missing at nimg={nimg} for sigma_rel {', '.join(missing)} "
                             f"(expected {snapshot_name(nimg, float(missing[0]))})")
    return infos


def refuse_legacy(folder: Path, what: str) -> None:
    """Pickled `.pt` snapshots and models of earlier versions can run code when loaded: never read
    them; name the conversion command (which needs an explicit --trust)."""
    old = sorted(p.name for p in folder.iterdir() if LEGACY_RE.match(p.name))
    if old:
        raise PHEMAError(f"{what} {folder} holds {len(old)} pickled .pt file(s) of an earlier version (e.g. {old[0]}), "
                         f"which are not loaded because a pickle can run code; if you trust where they come from, "
                         f"convert them with `{CONVERT_HINT.format(path=folder)}`")


def _read_header(path: Path, what: str, fmt: str) -> tuple[dict, dict]:
    spans, meta = read_safetensors_header(path, what, PHEMAError)
    if meta.get("format") != fmt:
        raise PHEMAError(f"{path}: not a {what} of this pipeline (format {meta.get('format')!r})")
    check_header_values(meta, path)
    floats = {k: v for k, v in spans.items() if not v[2].is_floating_point}
    if floats:
        k, (_, _, dtype, _) = next(iter(floats.items()))
        raise PHEMAError(f"{path}: tensor {k!r} is stored as {str(dtype).replace('torch.', '')}; a {what} holds "
                         f"floating-point tensors only (a relabelled or damaged header)")
    declared = meta.get("dtype")
    if declared is not None:
        wrong = [k for k, v in spans.items() if str(v[2]) != f"torch.{declared}"]
        if wrong:
            raise PHEMAError(f"{path}: tensor {wrong[0]!r} is stored as {str(spans[wrong[0]][2]).replace('torch.', '')}, "
                             f"the header says {declared}")
    return spans, meta


def check_header_values(meta: dict, path) -> None:
    """A header's own values typed and in range: nimg a whole number > 0, sigma_rel a number in
    (0, sqrt(1/12)), config and net_args mappings (what they describe: network_of_header)."""
    nimg, sigma_rel = meta.get("nimg"), meta.get("sigma_rel")
    if isinstance(nimg, bool) or not isinstance(nimg, int) or nimg <= 0:
        raise PHEMAError(f"{path}: header nimg={nimg!r:.40} is not a whole number of images > 0")
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise PHEMAError(f"{path}: header sigma_rel={sigma_rel!r:.40} is not a number in (0, {SIGMA_REL_MAX:.4f})")
    for k in ("config", "net_args"):
        if k in meta and not isinstance(meta[k], dict):
            raise PHEMAError(f"{path}: header {k} is a {type(meta[k]).__name__}, not a mapping (a damaged header)")


def _read_snapshot_header(info: SnapshotInfo) -> tuple[dict, dict]:
    spans, meta = _read_header(info.path, "post-hoc EMA snapshot", SNAPSHOT_FORMAT)
    if meta.get("nimg") != info.nimg or abs(float(meta.get("sigma_rel", -1)) - info.sigma_rel) > 5e-4:
        raise PHEMAError(f"{info.path}: file name says nimg={info.nimg} sigma_rel={info.sigma_rel}, "
                         f"contents say nimg={meta.get('nimg')} sigma_rel={meta.get('sigma_rel')}")
    return spans, meta

NET_ARG_RANGES = {"img_resolution": 1, "img_channels": 1, "label_dim": 0}   # build argument -> its minimum


def network_of_header(meta: dict, path, error: type[Exception] = PHEMAError):
    """(config, build arguments, {tensor: (shape, dtype)}) of the network a header describes, sized and
    checked without allocating it (networks.network_shapes); a header that describes none is refused."""
    from .config import ConfigError, resolve
    from .networks import NetworkSizeError, network_shapes
    args, raw = meta.get("net_args"), meta.get("config")
    if not isinstance(args, dict) or not args:
        raise error(f"{path}: carries no network build arguments (not written by the training stage)")
    if not isinstance(raw, dict):
        raise error(f"{path}: its header's config is not a mapping ({str(raw)[:40]!r}): not a model of this "
                    f"pipeline, or a damaged header")
    if set(args) != set(NET_ARG_RANGES) or any(isinstance(v, bool) or not isinstance(v, int) or v < NET_ARG_RANGES[k]
                                               for k, v in args.items()):
        raise error(f"{path}: its header's net_args {str(args)[:120]} are not whole numbers for "
                    f"{', '.join(NET_ARG_RANGES)}")
    try:
        cfg = resolve({k: v for k, v in raw.items() if k != "preset"}, where=None)
        shapes = network_shapes(cfg, **args)
    except ConfigError as err:
        raise error(f"{path}: its header's config is invalid ({str(err).splitlines()[0]})") from None
    except NetworkSizeError as err:
        raise error(f"{path}: {err}") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise error(f"{path}: its header's net_args {args} do not build a network ({str(err)[:120]})") from None
    return cfg, args, shapes


def check_consistent(infos: Sequence[SnapshotInfo]) -> dict:
    """All snapshots must come from one run configuration, and hold the network their header describes;
    returns the first one's metadata. Reads only each file's safetensors header (no tensor data)."""
    from .networks import check_state
    first_meta, first_key, shapes, first_path = None, None, None, None
    for info in infos:
        spans, meta = _read_snapshot_header(info)
        key = meta.get("model_key")
        layout = {k: (tuple(v[3]), v[2]) for k, v in spans.items()}
        if first_meta is None:
            first_meta, first_key, shapes, first_path = meta, key, layout, info.path
            if meta.get("net_args"):           # what the header claims, against what the file holds
                check_state(network_of_header(meta, info.path)[2], layout, str(info.path), PHEMAError)
        elif key != first_key:
            raise PHEMAError(f"mixed configurations: {info.path.name} has model_key {key}, "
                             f"{first_path.name} has {first_key}; keep one run's snapshots per directory")
        elif layout != shapes:
            raise PHEMAError(f"mixed configurations: {info.path.name} and {first_path.name} hold "
                             f"different parameter shapes or types")
    interval = (first_meta or {}).get("snapshot_nimg")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0):
        raise PHEMAError(f"{first_path}: header snapshot_nimg={interval!r:.40} is not a whole number > 0")
    if interval:
        nimgs = sorted({s.nimg for s in infos})
        expected = list(range(interval, nimgs[-1] + 1, interval))
        missing = [n for n in expected if n not in nimgs]
        if missing:
            raise PHEMAError(f"snapshots missing for nimg {', '.join(map(str, missing[:5]))}"
                             f"{' ...' if len(missing) > 5 else ''} (interval {interval} images)")
    return first_meta or {}


def sources_digest(infos: Sequence[SnapshotInfo], target_nimg: int) -> str:
    h = hashlib.sha256(f"T={target_nimg}".encode())
    for s in infos:
        h.update(f"{s.path.name}:{s.size}".encode())
    return h.hexdigest()[:16]


def check_reconstruction(path: str | Path) -> dict:
    """A reconstructed model's metadata from its header alone (cheap: check inputs before compute)."""
    path = Path(path)
    if LEGACY_RE.match(path.name):
        raise PHEMAError(f"{path} is a pickled .pt model of an earlier version, not loaded because a pickle can run "
                         f"code; if you trust it, convert it with `{CONVERT_HINT.format(path=path)}`")
    return _read_header(path, "reconstructed model", RECONSTRUCTION_FORMAT)[1]


def load_reconstruction(path: str | Path) -> dict:
    """A reconstructed model: {'state': tensors, **metadata}; anything but this pipeline's
    safetensors reconstruction (a pickled .pt included) is refused without being loaded, and so is
    one whose tensors are not the network its header describes (checked before reading them)."""
    return load_checked_reconstruction(path)[0]


def load_checked_reconstruction(path: str | Path, error: type[Exception] = PHEMAError):
    """(load_reconstruction's dict, (config, build arguments) of the network its header describes, or None
    for a header without net_args): the header's network is sized and checked against the tensors once."""
    from .networks import check_state
    meta = check_reconstruction(path)
    network = None
    if meta.get("net_args"):
        spans, _ = read_safetensors_header(path, "reconstructed model", PHEMAError)
        cfg, args, shapes = network_of_header(meta, path, error)
        check_state(shapes, {k: (v[3], v[2]) for k, v in spans.items()}, str(path), PHEMAError)
        network = (cfg, args)
    state, meta = load_safetensors(path, "reconstructed model", PHEMAError)
    return {**meta, "state": state}, network


def convert_legacy(paths: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Pickled `.pt` snapshots and reconstructions of earlier versions -> safetensors beside them.

    Read with torch.load(weights_only=True) (a file holding other objects is still refused); each
    original is renamed to `<name>.orig`, so the folder is accepted afterwards."""
    from .io import files_in, load_torch_file
    files = files_in(paths, lambda f: bool(LEGACY_RE.match(f.name)), PHEMAError,
                     "pickled snapshots or models (phema-*.pt, ema-*.pt)")
    done = []
    for src in files:
        data = load_torch_file(src, "pickled file", PHEMAError)
        if not isinstance(data, dict) or data.get("format") not in (SNAPSHOT_FORMAT, RECONSTRUCTION_FORMAT) \
                or not isinstance(data.get("state"), dict):
            raise PHEMAError(f"{src}: not a snapshot or reconstructed model of this pipeline")
        state = data.pop("state")
        dst = src.with_suffix(".safetensors")
        save_safetensors(state, data, dst)
        os.replace(src, src.with_name(src.name + ".orig"))
        done.append((src, dst))
    return done

