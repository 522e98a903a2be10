"""docs/gpu-cluster.md: every `python -m ...` command in it exists and parses with this project's own
argument parsers (run with EDM2_PARSE_ONLY=1: parsed, nothing executed), and its params block loads."""
import re

import yaml
from conftest import ROOT

DOC = ROOT / "docs" / "gpu-cluster.md"


def _commands():
    text = DOC.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("python -m")]


def test_the_recipe_has_every_step():
    cmds = " ".join(_commands())
    for step in ("pipeline config", "stages.encode", "submit train", "stages.reconstruct", "submit evaluate",
                 "stages.evaluate", "pipeline results", "import-nvidia"):
        assert step in cmds, step


def test_the_params_block_loads(tmp_path):
    from pipeline import config as C
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    cfg = C.resolve(yaml.safe_load(block))
    assert cfg.preset == "img512-xs" and cfg.metrics.mode == "legacy" and cfg.metrics.seed_sets == 3
    assert cfg.launcher.nnodes == 4 and cfg.launcher.nproc_per_node == 8 and cfg.launcher.slurm.gpus_per_node == 8
