"""`python -m pipeline share on|off`: keep a finished run's training outputs in DVC's cache, so that
`dvc push` shares it and a teammate's `dvc pull` + `dvc repro` trains nothing (docs/pipeline.md,
"Sharing").

By default the raw snapshots stay out of DVC's cache (`cache: false` in dvc.yaml): at ImageNet-512
they are large, and a copy in the cache doubles the disk they take. DVC reads `cache:` before it
interpolates params, so the switch cannot be a value in params.yaml; it is the `cache:` of the outputs
that dvc.yaml marks `# share:` (the fetched data, the snapshots, the run summary), flipped in place,
followed by `dvc commit` of their stages (the outputs on disk go into the cache; nothing reruns).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .errors import PipelineError

SHARE_LINE = re.compile(r"^(\s*cache:\s*)(true|false)(\s*# share:.*)$")


class ShareError(PipelineError, RuntimeError):
    pass


def shared_outputs(dvc_yaml: str) -> list[tuple[str, str, bool]]:
    """(stage, output, cached) for every output marked `# share:` in dvc.yaml's text."""
    out, stage, path = [], None, None
    for line in dvc_yaml.splitlines():
        if m := re.match(r"^  (\w[\w-]*):\s*$", line):
            stage = m.group(1)
        elif m := re.match(r"^\s*- (.+):\s*$", line):
            path = m.group(1)
        elif m := SHARE_LINE.match(line):
            out.append((stage, path, m.group(2) == "true"))
    return out


def set_sharing(dvc_yaml: Path, on: bool, commit: bool = True) -> list[str]:
    """Flip the marked outputs' `cache:` and `dvc commit` their stages; returns the lines to print."""
    if not dvc_yaml.is_file():
        raise ShareError(f"{dvc_yaml}: no such file (run from the project folder)")
    text = dvc_yaml.read_text()
    marked = shared_outputs(text)
    if not marked:
        raise ShareError(f"{dvc_yaml}: no output is marked `# share:` (an edited dvc.yaml?)")
    value = "true" if on else "false"
    new = "\n".join(SHARE_LINE.sub(lambda m: m.group(1) + value + m.group(3), line) for line in text.splitlines())
    changed = [(stage, _resolved(path, dvc_yaml.parent / "params.yaml")) for stage, path, cached in marked
               if cached != on]
    lines = [f"share {'on' if on else 'off'}: " + (", ".join(f"{p} ({s})" for s, p in changed) + (
        " now in DVC's cache" if on else " out of DVC's cache") if changed else "dvc.yaml already says so")]
    if not changed:
        return lines
    from .io import atomic_write_text
    atomic_write_text(new + ("\n" if text.endswith("\n") else ""), dvc_yaml)
    stages = sorted({s for s, _ in changed})
    if on and commit:                         # the outputs on disk into the cache: nothing reruns
        r = subprocess.run(["dvc", "commit", "-f", "-q", *stages], cwd=dvc_yaml.parent, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no message)"]
            lines.append(f"note: `dvc commit -f {' '.join(stages)}` did not finish ({last[0]}); run it after the "
                         f"stages have run")
        else:
            lines.append(f"dvc commit -f {' '.join(stages)}: the outputs on disk are in the cache")
    lines.append("next: commit dvc.yaml, dvc.lock and the .gitignore files DVC wrote (git status), then dvc push "
                 "(a remote first: dvc remote add -d shared /path/or/s3://bucket/edm2)" if on else
                 "next: git commit -m 'runs not shared' dvc.yaml (the cache keeps its copies: dvc gc)")
    return lines


def _resolved(path: str, params: Path) -> str:
    """An output path with its ${params} filled in from params.yaml (as DVC does), for printing."""
    if "${" not in path or not params.is_file():
        return path
    from .config import load_config
    flat = load_config(params).flat()
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(flat.get(m.group(1).strip(), m.group(0))), path)
