"""Where a result came from: the project's git revision. Neutral ground: the mathematics, the
training and the tracking all record it, and it imports nothing of theirs.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def git_revision(cwd: str | None = None) -> str:
    """The project's git revision (with '-dirty' when the tree has changes), or 'unknown'."""
    cwd = cwd or str(Path.cwd())
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"

