"""The one config schema: params.yaml and every preset load; bad values fail in one line."""
import pytest

from pipeline import config as C


@pytest.mark.integration
def test_commands_say_which_params_differ_from_the_committed_file(tmp_path):
    """After `dvc exp run -S sampler.steps=8` the workspace keeps steps=8: every CLI that reads params.yaml
    says so (stderr), with the committed value; nothing is said when nothing differs or outside git."""
    import subprocess

    from conftest import ROOT

    from pipeline.cli import params_diff_line
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    assert params_diff_line(p, C.load_config(p)) is None                    # not in a repository
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": __import__("os").environ["PATH"]}
    subprocess.run("git init -q && git add params.yaml && git commit -qm p", shell=True, cwd=tmp_path, env=env, check=True)
    assert params_diff_line(p, C.load_config(p)) is None
    steps = C.load_config(p).sampler.steps
    p.write_text(p.read_text().replace(f"  steps: {steps}\n", "  steps: 8\n"))
    line = params_diff_line(p, C.load_config(p, ["train.ref_lr=0.02"]))
    assert line.startswith("params: 2 value(s) differ") and f"sampler.steps=8 (committed: {steps})" in line
    assert "train.ref_lr=0.02" in line
