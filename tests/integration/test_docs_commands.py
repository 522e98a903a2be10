"""docs/gpu-cluster.md: every `python -m ...` command in it exists and parses with this project's own
argument parsers (run with EDM2_PARSE_ONLY=1: parsed, nothing executed), and its params block loads."""
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT
from unit.test_docs_commands import DOC, _commands  # noqa: F401, F811 (shared with the unit tier)


@pytest.mark.integration
@pytest.mark.parametrize("line", _commands())
def test_each_command_parses(line, tmp_path):
    argv = shlex.split(line.split("#")[0])[2:]             # drop `python -m`
    r = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "EDM2_PARSE_ONLY": "1"})
    assert r.returncode == 0, r.stderr[-1500:]
