import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test's code exports into os.environ (a local sweep's Ray settings, say) ends with the test:
    the next test, and every process it starts, sees the environment the suite started with. A Ray the
    test left running in this process is a leak (the next ray.init would fail): it is shut down, and the
    test fails."""
    import sys
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("the test left Ray initialized in the test process (run_sweep and tests shut down what they "
                    "start)")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """Fashion-MNIST encoded once per session with the default config (train + test splits)."""
    from pipeline import config as C
    from pipeline.data.encode import encode_dataset
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
    raw["metrics"].update(num_images=4, ref_num_images=8, batch_size=8)
    raw["tracking"].update(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def final_state(params):
    """The newest checkpoint of the run that a params file describes."""
    import torch

    from pipeline import config as C
    from pipeline.checkpoints import list_checkpoints
    return torch.load(list_checkpoints(Path(C.load_config(params).train.run_dir))[-1], weights_only=True)


def assert_close_states(a: dict, b: dict, what: str, rel=1e-5, atol=1e-3):
    """Float tolerance: summation order differs (gloo all-reduce, accumulation) and Adam amplifies
    it where gradients are near zero; relative L2 over all parameters stays at float-noise level."""
    import torch
    assert a.keys() == b.keys()
    fa = torch.cat([a[k].float().flatten() for k in a])
    fb = torch.cat([b[k].float().flatten() for k in a])
    err = ((fa - fb).norm() / fa.norm()).item()
    print(f"{what}: relative L2 difference {err:.2e}, max abs {(fa - fb).abs().max().item():.2e}")
    assert err < rel and (fa - fb).abs().max() < atol
    return err


def assert_same_training(a: dict, b: dict, what: str = "") -> None:
    """Two final checkpoints bit for bit: the network and every EMA."""
    import torch
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), (what, k)
    for ea, eb in zip(a["ema"]["emas"], b["ema"]["emas"], strict=True):
        for k in ea:
            assert torch.equal(ea[k], eb[k]), (what, k)


def interrupt_at_first_checkpoint(jobs: dict, timeout: float = 300) -> dict:
    """jobs: {name: (Submitted, params file, command)}; runs `command + [job id]` (e.g. scancel
    --signal=USR2, scontrol requeue) once the job's first checkpoint is on disk, while it still trains.
    Returns {name: the run's MLflow run id at that moment}."""
    import subprocess
    import time

    from pipeline import config as C
    from pipeline.checkpoints import list_checkpoints
    run_ids, t = {}, time.time()
    while len(run_ids) < len(jobs) and time.time() - t < timeout:
        for name, (s, params, command) in jobs.items():
            run = Path(C.load_config(params).train.run_dir)
            if name in run_ids:
                continue
            assert not (run / "train_summary.json").is_file(), f"{name} finished before it could be interrupted"
            if list_checkpoints(run):
                subprocess.run([*command, s.job_id], check=True)
                run_ids[name] = (run / "mlflow_run_id").read_text().strip()
        time.sleep(0.1)
    assert len(run_ids) == len(jobs), f"only {sorted(run_ids)} reached a checkpoint mid-run in {timeout} s"
    return run_ids


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


# ----------------------------------------------------------------------------------------------
# Tiers by folder: tests/unit (pure: no subprocess, Ray, server or encoded dataset; `make test-unit`,
# under 2 minutes on 2 cores), tests/integration (processes, services, compilers, small trainings on
# real data), tests/system (the whole pipeline: dvc repro, SLURM, several nodes, Ray sweeps). The folder
# gives the marker; a unit test that asks for what only the other tiers may use is a collection error.
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "system")
HEAVY_FIXTURES = {"fmnist", "tiny", "tiny_sweep", "slurm_cluster", "plain", "plain_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        heavy = HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if tier == "unit" and (heavy or item.get_closest_marker("slow") or item.get_closest_marker("integration")):
            what = sorted(heavy) if heavy else "a slow/integration marker"
            raise pytest.UsageError(f"{item.nodeid} is in tests/unit but uses {what}: move it to tests/integration")
