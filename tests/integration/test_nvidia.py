"""NVIDIA EDM2's network pickles and raw snapshots, imported without running anything in them.

The tests write files in NVIDIA's on-disk layout themselves (no download, no NVIDIA code): the network is
this project's, its modules pickled the way EDM2's persistence does it (a call of
torch_utils.persistence._reconstruct_persistent_obj with the class name, the module source and the
state). The module source and the reconstructor both write a marker file if anything ever runs them."""
import subprocess
import sys

import pytest
from conftest import ROOT
from unit.test_nvidia import NET, _forget, _nvidia_tree, _Persistent, nvidia_modules, our_net, write_nvidia_pickle  # noqa: F401, F811 (shared with the unit tier)

from pipeline.nvidia import import_files


@pytest.mark.integration
def test_cli_one_line_and_exit_2(tmp_path, nvidia_modules):
    path = write_nvidia_pickle(tmp_path / "edm2-img16-xs-0000001-0.100.pkl", our_net(), nvidia_modules,
                               extra_kwargs={"resample_filter": [1, 3, 3, 1]})
    r = subprocess.run([sys.executable, "-m", "pipeline", "import-nvidia", str(path), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "resample_filter=[1, 3, 3, 1]" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_imported_model_goes_through_the_evaluate_stage(tmp_path, nvidia_modules, fmnist):
    """An imported released model is evaluated like the project's own (FID against the reference, its
    record naming the imported file)."""
    import json

    import yaml

    from stages.evaluate import main as evaluate_main
    src = write_nvidia_pickle(tmp_path / "edm2-img16-xs-0000002-0.135.pkl", our_net(), nvidia_modules)
    _forget("torch_utils.persistence", "dnnlib.util")
    import_files([src], tmp_path / "models", log=lambda *_: None)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = str(fmnist["train"][0].parent)
    raw["metrics"].update({"num_images": 4, "ref_num_images": 8, "batch_size": 8})
    raw["sampler"].update({"steps": 4, "batch_size": 4})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert evaluate_main(["--params", str(tmp_path / "params.yaml"), "--models", str(tmp_path / "models"),
                          "--ref-cache", str(tmp_path / "ref"), "--metrics", str(tmp_path / "metrics"),
                          "--samples", str(tmp_path / "samples")]) == 0
    [rec] = json.loads((tmp_path / "metrics/fid_records.json").read_text())
    assert rec["fid"] > 0 and rec["sigma_rel"] == 0.135 and rec["model_file"].endswith("ema-0000002048-0.135.safetensors")
