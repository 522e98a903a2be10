"""`pipeline share on|off` flips exactly the outputs dvc.yaml marks `# share:` (off by default)."""
import shutil

import pytest

from conftest import ROOT
from pipeline.share import ShareError, set_sharing, shared_outputs


def test_share_flips_only_the_marked_outputs_and_back(tmp_path):
    marked = shared_outputs((ROOT / "dvc.yaml").read_text())
    assert [(s, p) for s, p, _ in marked] == [("fetch", "data/raw/fashion-mnist"), ("train", "${train.run_dir}/snapshots"),
                                              ("train", "${train.run_dir}/train_summary.json"),
                                              ("train", "${train.run_dir}/metrics.jsonl")]
    assert not any(cached for _, _, cached in marked)                # the default: snapshots outside the cache
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    out = set_sharing(tmp_path / "dvc.yaml", True, commit=False)
    assert "runs/default/snapshots (train)" in out[0] and "now in DVC's cache" in out[0]
    text = (tmp_path / "dvc.yaml").read_text()
    assert all(cached for _, _, cached in shared_outputs(text))
    before, after = (ROOT / "dvc.yaml").read_text().splitlines(), text.splitlines()
    assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 4     # nothing else touched
    assert set_sharing(tmp_path / "dvc.yaml", True, commit=False) == ["share on: dvc.yaml already says so"]
    set_sharing(tmp_path / "dvc.yaml", False)
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    (tmp_path / "plain.yaml").write_text("stages: {}\n")
    with pytest.raises(ShareError, match="no output is marked"):
        set_sharing(tmp_path / "plain.yaml", True)
