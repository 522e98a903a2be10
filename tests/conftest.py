import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """Fashion-MNIST encoded once per session with the default config (train + test splits)."""
    from pipeline import config as C
    from pipeline.data import encode_dataset
    out = tmp_path_factory.mktemp("fmnist")
    cfg = C.load_config(ROOT / "params.yaml")
    cache = ROOT / "data" / "raw"              # reuse a fetched .deb across runs
    return {split: (out / split, encode_dataset(cfg, out / split, split, cache_dir=cache, progress=False))
            for split in ("train", "test")}
