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


def tiny_params(tmp_path, fmnist, name="params.yaml", **sections):
    """A shrunken copy of the real params.yaml (same schema, tiny network and run) in tmp_path."""
    import yaml
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = str(fmnist["train"][0].parent)
    raw["network"].update(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16],
                          channels_per_head=16)
    raw["train"].update(batch_size=16, duration_nimg=128, checkpoint_nimg=32, status_nimg=16, snapshot_nimg=None)
    raw["train"].pop("snapshot_nimg")
    raw["train"].update(run_dir=str(tmp_path / "run"), ref_lr=0.01, ref_batches=4, rampup_nimg=32)
    raw["ema"].update(snapshot_nimg=32, targets=[0.05, 0.1, 0.15])
    raw["sampler"].update(steps=4, batch_size=8)
    raw["fid"].update(num_images=4, ref_num_images=8, batch_size=8)
    raw["tracking"].update(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster from the project's own scripts (ports apart from a user's)."""
    import shutil
    import subprocess
    import tempfile
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None or shutil.which("munged") is None:
        pytest.skip("SLURM is not installed (as root, `make test` installs it: scripts/system-deps.sh slurm)")
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))      # short path: munge's socket name limit
    env = {**os.environ, "SLURM_ROOT": str(root), "SLURM_PORT_BASE": "16817", "SLURM_CPUS": "4",   # 3 small jobs at once
           "WITH_SLURMDBD": "1" if shutil.which("slurmdbd") and shutil.which("mariadbd") else "0"}
    r = subprocess.run(["bash", str(ROOT / "scripts/slurm_up.sh")], env=env, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        subprocess.run(["bash", str(ROOT / "scripts/slurm_down.sh")], env=env)
        pytest.fail(f"slurm_up.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    yield {"root": root, "sacct": env["WITH_SLURMDBD"] == "1"}
    subprocess.run(["bash", str(ROOT / "scripts/slurm_down.sh")], env=env, timeout=60)
    shutil.rmtree(root, ignore_errors=True)     # its MariaDB files are ~180 MB; CI disks can be small
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
