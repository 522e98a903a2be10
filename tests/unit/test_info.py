"""`pipeline info` checks own data before any work: the reference choice, and label_dim against the
data's classes (taken from the data when the params leave it null)."""
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT


def _info(tmp_path, *sets):
    args = [a for s in sets for a in ("-S", s)]
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")       # outside git: no params note on stderr
    return subprocess.run([sys.executable, "-m", "pipeline", "info", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})


def test_info_checks_the_reference_and_takes_label_dim_from_the_data(tmp_path):
    data = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(data / cls / f"{i}.png")
    folder = ["data.source=folder", f"data.path={data}", "data.channels=3"]
    r = _info(tmp_path, *folder)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "metrics.reference=fashion-mnist-test, but data.source=folder" in r.stderr
    held = [*folder, "metrics.reference=held-out", "data.reference_split=0.25"]
    r = _info(tmp_path, *held)
    assert r.returncode == 0, r.stderr
    assert "label_dim=2 (the data's classes)" in r.stdout and "data.reference_split=0.25 held out" in r.stdout, r.stdout
    r = _info(tmp_path, *held, "network.label_dim=1")
    assert r.returncode == 2 and "network.label_dim=1, but the data has 2 classes" in r.stderr, r.stderr
    r = _info(tmp_path, *held, "data.use_labels=false")
    assert r.returncode == 0 and "label_dim=0 (data.use_labels=false: unconditional)" in r.stdout, r.stdout
    r = _info(tmp_path, "metrics.reference=held-out")
    assert r.returncode == 2 and "needs data.reference_split" in r.stderr, r.stderr
