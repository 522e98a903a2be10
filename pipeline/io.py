"""Files the pipeline writes and reads: crash-safe writes (temp file in the same folder + fsync +
rename), safetensors with JSON metadata, pickle-free checkpoint loading, the run-folder lock, and
the metrics log.

Nothing read here can run code: tensors come from safetensors (a JSON header and raw bytes) or from
`torch.load(weights_only=True)`, which refuses any pickled object other than tensors and plain
values. A refused file is reported in one line and never executed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import PipelineError

TEMP_RE = re.compile(r"^\..+\.tmp$")        # `.<name>.<random>.tmp`: atomic_write's own temp names


class UnsafeFileError(PipelineError):
    """A file holds something that could run code when loaded; it was not loaded."""


class RunLockedError(PipelineError):
    """Another live process writes into the same run folder."""


def _atomic_path(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` for a temp file next to `path`, fsync it, then rename it over `path`.

    A crash or a full disk leaves the previous file untouched (the temp file is removed)."""
    path = Path(path)
    if path.exists() and not path.is_file():                 # a folder, /dev/null, a socket: never replaced
        raise PipelineError(f"{path} exists and is not a regular file: not replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:                           # name the file the caller wanted, not the temp name
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())                 # mkstemp makes 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            raise OSError(err.errno, err.strerror, str(path)) from None   # name the file, not the temp
        raise
    return path


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through `write(fileobj)`, atomically (see _atomic_path)."""
    def to_path(tmp: Path) -> None:
        with open(tmp, mode) as f:
            write(f)
    return _atomic_path(path, to_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrors:
    """A file object that keeps the first OSError of its writes: torch.save reports a failed write
    (a full disk) as RuntimeError('unexpected pos ...'); the caller re-raises the OSError instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        return self.f.flush()


@contextlib.contextmanager
def published_folder(out: Path, replace: bool = False, theirs_complete: Callable[[Path], bool] | None = None):
    """A folder written whole or not at all: yields a temp folder beside `out`, renamed to `out` when
    the block ends (an existing `out` replaced only with `replace`); removed if the block raises.
    theirs_complete: when another process publishes `out` first (two stages or sweep workers writing the
    same folder at once), keep theirs if theirs_complete(out) says it is whole, and drop ours."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if replace and out.is_dir():
            shutil.rmtree(out, ignore_errors=theirs_complete is not None)   # theirs may go at the same time
        try:
            tmp.rename(out)
        except OSError:
            if theirs_complete is None or not out.is_dir() or not theirs_complete(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """For checkpoints only: tensors and plain values, read back with weights_only=True."""
    def write(f) -> None:
        rec = _WriteErrors(f)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is not None:
                raise OSError(rec.error.errno, rec.error.strerror, str(path)) from None
            raise
    return atomic_write(path, write)


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def load_torch_file(path: str | Path, what: str = "file", error: type[Exception] = PipelineError) -> Any:
    """torch.load(weights_only=True) on CPU: tensors, dicts, lists and plain values only.

    A file that holds any other pickled object raises UnsafeFileError (nothing of it runs); a missing,
    truncated or corrupt file raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong format, refused globals: never a traceback
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text:
            raise UnsafeFileError(f"{what} {path} holds Python objects other than tensors and plain values: "
                                  f"refused, not loaded (a crafted or foreign file)") from None
        raise error(f"{what} {path} is unreadable ({err.__class__.__name__}: {text.splitlines()[0][:120] if text else ''})") from None


def check_writable(path: str | Path, what: str, folder: bool = True) -> Path:
    """Refuse, before any compute, an output location that cannot be created or written: a path
    below a regular file, a read-only folder, a folder where a file belongs (and the reverse).
    Only a probe file is made (and removed) in the nearest existing folder."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise PipelineError(f"{what} {path} is a file, not a folder")
        if not folder and not path.is_file():
            raise PipelineError(f"{what} {path} is {'a folder, not a file' if path.is_dir() else 'not a regular file'}")
        target = path if path.is_dir() else path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise PipelineError(f"{what} {path} cannot be created: {target} is a file, not a folder")
    try:                                             # a real probe: read-only mounts fool os.access (and root)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PipelineError(f"{what} {path} is not writable ({target}: {err.strerror})") from None
    return path


def files_in(paths, match: Callable[[Path], bool], error: type[Exception], nothing: str) -> list[Path]:
    """The files named in `paths`, and the files of the folders named there that `match` accepts (sorted
    per folder); a path that does not exist, or finding no file at all, is `error` (`nothing`: what was
    looked for, for its message)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and match(f))
        elif p.is_file():
            files.append(p)
        else:
            raise error(f"{p} does not exist")
    if not files:
        raise error(f"no {nothing} in {', '.join(map(str, paths))}")
    return files


def remove_stale_temps(*folders: str | Path) -> list[Path]:
    """Delete leftovers of atomic_write (`.<name>.<random>.tmp`) from a killed writer. Call only
    while holding the folder's run lock: a live writer's temp file looks the same."""
    gone = []
    for folder in folders:
        d = Path(folder)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if TEMP_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


# ----------------------------------------------------------------------------------------------
# safetensors: tensors plus string metadata; here every metadata value is JSON.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20


def save_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Path:
    """Atomically write contiguous CPU tensors and `meta` (each value JSON-encoded)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    strings = {k: json.dumps(v) for k, v in meta.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=strings)
        except Exception as err:                     # the Rust writer's I/O errors: an OSError like any other
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    return _atomic_path(path, write)


def read_safetensors_header(path: str | Path, what: str = "file", error: type[Exception] = PipelineError
                            ) -> tuple[dict[str, tuple[int, int, torch.dtype, list[int]]], dict[str, Any]]:
    """Parse a safetensors header without reading any tensor data.

    Returns ({name: (byte offset in the file, numel, dtype, shape)}, metadata with JSON values
    decoded). Every byte range is checked against the file size, so a truncated file is reported here.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    size = path.stat().st_size
    bad = f"{what} {path} is not a safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{bad} (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise error(f"{bad} (header length {n} does not fit a {size}-byte file; a pickled .pt file "
                        f"renamed, or a truncated write)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise error(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise error(f"{bad} (its header is not a mapping)")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise error(f"{bad} (its __metadata__ is a {type(raw_meta).__name__}, not a mapping of strings)")
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            meta[k] = v
    start, spans = 8 + n, {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise error(f"{bad} (entry {name!r} is malformed)")
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{bad} (entry {name!r} is malformed)") from None
        numel = 1
        for s in shape:
            numel *= s
        if hi - lo != numel * dtype.itemsize or lo < 0:
            raise error(f"{bad} (tensor {name!r}: {hi - lo} bytes for shape {shape} {info['dtype']})")
        if start + hi > size:
            raise error(f"{what} {path} is truncated: tensor {name!r} ends at byte {start + hi}, the file has {size}")
        spans[name] = (start + lo, numel, dtype, shape)
    ranges = sorted((lo, lo + n * dt.itemsize, name) for name, (lo, n, dt, _) in spans.items())
    for (_, hi_a, a), (lo_b, _, b) in zip(ranges, ranges[1:]):
        if lo_b < hi_a:                                 # two tensors over the same bytes: a crafted file
            raise error(f"{bad} (tensors {a!r} and {b!r} overlap in the file)")
    return spans, meta


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path, what: str = "file",
                 error: type[Exception] = PipelineError) -> None:
    """Every floating-point tensor finite, or `error` naming the file and the first bad tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise error(f"{what} {path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); refused "
                        f"(a diverged run or a damaged file)")


def load_safetensors(path: str | Path, what: str = "file", error: type[Exception] = PipelineError
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors (CPU) and the decoded metadata; a file that is not safetensors, or that holds a
    non-finite value, raises `error`."""
    from safetensors.torch import load_file
    _, meta = read_safetensors_header(path, what, error)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:                         # the Rust reader's own checks
        raise error(f"{what} {path} is unreadable ({err.__class__.__name__}: {str(err)[:120]})") from None
    check_finite(tensors, path, what, error)
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# One writer per run folder: an advisory lock held for the writer's lifetime.

class RunLock:
    """`<folder>/.lock`, held with flock(2) by the one process that writes the folder.

    The kernel drops the lock when its holder dies (SIGKILL included), so a lock left by a killed
    process is simply taken over; the file's text (pid, host, start time) only names the holder."""

    def __init__(self, folder: str | Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.what = what
        self.fd: int | None = None

    def acquire(self, wait: bool = False, log=print) -> "RunLock":
        """Take the lock; held by another process: refuse in one line, or with `wait` say so once and
        block until the holder ends (queued DVC experiments of one training share its folder)."""
        import fcntl
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = self.path.read_text(errors="replace").strip() or "another process"
            if not wait:
                os.close(fd)
                raise RunLockedError(f"{self.what} {self.folder} is in use by {holder}; wait for it, stop it, or "
                                     f"use another folder (one writer per run folder)") from None
            log(f"{self.what} {self.folder} is in use by {holder}: waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                        # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# The metrics log (JSON lines): appends are all-or-nothing, a torn last line is dropped on read.

_write = os.write                                    # the one write call of append_line (tests inject a full disk)


def read_json(path: Path) -> dict:
    """A small JSON object from `path`, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def append_line(path: str | Path, line: str) -> None:
    """Append one line; on failure (disk full) cut the file back to where it was, then raise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += _write(fd, data[done:])
        except OSError as err:
            os.ftruncate(fd, before)
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


def read_jsonl(path: str | Path, repair: bool = False) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file, and notes on lines that were dropped (a torn last line from
    a kill or a full disk). repair=True rewrites the file without them (atomically)."""
    p = Path(path)
    if not p.is_file():
        return [], []
    text = p.read_bytes().decode("utf-8", errors="replace")
    rows, notes, keep = [], [], []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            where = "last line" if i >= len(lines) - 2 else f"line {i + 1}"
            notes.append(f"{p}: dropped an unreadable {where} ({line[:60]!r}...)")
            continue
        rows.append(rec)
        keep.append(line)
    if repair and notes:
        atomic_write_text("".join(f"{line}\n" for line in keep), p)
    return rows, notes
