"""Crash-safe file writing (temp file in the same folder + fsync + rename) and guarded loading."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through `write(fileobj)` to a temp file next to `path`, then rename over it.

    A crash or a full disk leaves the previous file untouched (the temp file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())                 # mkstemp makes 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: f.write(text), mode="w")


def load_torch_file(path: str | Path, what: str = "file", error: type[Exception] = ValueError,
                    mmap: bool = False) -> Any:
    """torch.load on CPU with a clear error for a missing, truncated or corrupt file.

    mmap=True maps tensor storages from the file instead of copying them into memory."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, wrong format, pickling errors: all mean 'unreadable'
        raise error(f"{what} {path} is unreadable ({err.__class__.__name__}: {str(err)[:120]})") from None
