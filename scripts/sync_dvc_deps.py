"""Rewrite each dvc.yaml stage's code deps to its script's import closure (tests/system/test_dvc.py checks
the same closure): run after adding an import. Usage: python scripts/sync_dvc_deps.py"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from deps_helpers import closure  # noqa: E402


def main() -> int:
    lines = (ROOT / "dvc.yaml").read_text().splitlines()
    out, stage_script, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s+cmd: python -m (stages\.\w+)", line)
        if m:
            stage_script = ROOT / (m.group(1).replace(".", "/") + ".py")
        code = re.match(r"(\s+)- (stages|pipeline)/\S+$", line)
        if code and stage_script is not None:
            indent = code.group(1)
            while i < len(lines) and re.match(r"\s+- (stages|pipeline)/\S+$", lines[i]):
                i += 1
            files = sorted(str(p.relative_to(ROOT)) for p in closure(stage_script))
            files = [f for f in files if f.startswith("stages/")] + [f for f in files if f.startswith("pipeline/")]
            out += [f"{indent}- {f}" for f in files] + [f"{indent}- pipeline/presets.yaml"]
            stage_script = None
            continue
        out.append(line)
        i += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
