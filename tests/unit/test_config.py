"""The one config schema: params.yaml and every preset load; bad values fail in one line."""
import pytest

from pipeline import config as C
from pipeline.__main__ import main


def test_params_yaml_and_all_presets_load(root):
    cfg = C.load_config(root / "params.yaml")
    assert cfg.data.source == "fashion-mnist" and cfg.data.resolution == 32 and cfg.data.channels == 1
    for name in C.presets():
        p = C.resolve({"preset": name})
        assert p.preset == name
    xs = C.resolve({"preset": "img64-xs"})
    assert (xs.network.model_channels, xs.network.channel_mult, xs.loss.P_mean) == (128, [1, 2, 3, 4], -0.8)
    # `base:` inheritance is a deep merge: fields the child does not name come from the base.
    s = C.resolve({"preset": "img512-s"})
    assert (s.network.model_channels, s.loss.P_std, s.train.checkpoint_nimg) == (192, 1.0, xs.train.checkpoint_nimg)


def test_file_values_override_preset_and_overrides_override_file():
    cfg = C.resolve({"preset": "img64-xs", "train": {"ref_lr": 0.005}}, ["train.ref_lr=0.002", "loss.P_std=1.2"])
    assert cfg.train.ref_lr == 0.002 and cfg.loss.P_std == 1.2 and cfg.train.ref_batches == 35000


@pytest.mark.parametrize("override, message", [
    ("ema.targets=[0.05, 0.1, 0.31]", "ema.targets[2]=0.31: sigma_rel must be in (0, 0.2887)"),
    ("ema.stds=[0.0]", "ema.stds[0]=0.0: sigma_rel must be in (0, 0.2887)"),
    ("loss.P_std=0", "loss.P_std=0: must be > 0"),
    ("train.ref_lr=-0.01", "train.ref_lr=-0.01: must be > 0"),
    ("data.resolution=48", "data.resolution=48: must be a power of two >= 4"),
    ("train.ref_lrr=0.01", "train.ref_lrr: unknown key"),
    ("sampler.sigma_min=100", "sampler.sigma_min=100.0 must be < sampler.sigma_max=80.0"),
    ("network.attn_resolutions=[12]", "network.attn_resolutions[0]=12: must be one of the U-Net resolutions"),
    ("train.batch_gpu=48", "train.batch_gpu=48: must divide train.batch_size=64"),
])
def test_invalid_values_fail_with_one_line(root, override, message):
    with pytest.raises(C.ConfigError) as info:
        C.load_config(root / "params.yaml", [override])
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text, "one broken rule -> one line"


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.resolve({"preset": "nope"})
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(bad)


def test_hash_flatten_and_diff():
    a = C.resolve({})
    b = C.resolve({}, {"loss.P_mean": -1.2})
    assert a.hash() != b.hash() and a.hash(("network",)) == b.hash(("network",))
    assert C.diff(a, b) == {"loss.P_mean": (-0.8, -1.2)}
    assert a.flat()["ema.stds"] == [0.05, 0.1]


def test_cli_reports_config_errors(root, capsys):
    assert main(["config", "--params", str(root / "params.yaml"), "-S", "loss.P_std=-1"]) == 2
    assert "loss.P_std=-1: must be > 0" in capsys.readouterr().err
    assert main(["config", "--preset", "img64-s"]) == 0
    assert "model_channels: 192" in capsys.readouterr().out


# The EDM2 paper's configuration table (NVIDIA's published training configs): channels, ref_lr,
# ref_batches, duration in Mi (2^20) images, dropout, P_mean, P_std; batch 2048 and a 10M-image
# learning-rate ramp-up throughout.
EDM2_TABLE = {
    "img512-xxs": (64, 0.0170, 70000, 2048, 0.00, -0.4, 1.0), "img512-xs": (128, 0.0120, 70000, 2048, 0.00, -0.4, 1.0),
    "img512-s": (192, 0.0100, 70000, 2048, 0.00, -0.4, 1.0), "img512-m": (256, 0.0090, 70000, 2048, 0.10, -0.4, 1.0),
    "img512-l": (320, 0.0080, 70000, 1792, 0.10, -0.4, 1.0), "img512-xl": (384, 0.0070, 70000, 1280, 0.10, -0.4, 1.0),
    "img512-xxl": (448, 0.0065, 70000, 896, 0.10, -0.4, 1.0),
    "img64-xs": (128, 0.0120, 35000, 1024, 0.00, -0.8, 1.6), "img64-s": (192, 0.0100, 35000, 1024, 0.00, -0.8, 1.6),
    "img64-m": (256, 0.0090, 35000, 2048, 0.10, -0.8, 1.6), "img64-l": (320, 0.0080, 35000, 1024, 0.10, -0.8, 1.6),
    "img64-xl": (384, 0.0070, 35000, 640, 0.10, -0.8, 1.6),
}


@pytest.mark.parametrize("name", sorted(EDM2_TABLE))
def test_presets_equal_the_edm2_table(name):
    c = C.resolve({"preset": name})
    ch, lr, ref_batches, dur_mi, dropout, p_mean, p_std = EDM2_TABLE[name]
    got = (c.network.model_channels, c.train.ref_lr, c.train.ref_batches, c.train.duration_nimg, c.network.dropout,
           c.loss.P_mean, c.loss.P_std, c.train.batch_size, c.train.rampup_nimg)
    assert got == (ch, lr, ref_batches, dur_mi * 2**20, dropout, p_mean, p_std, 2048, 10_000_000)
    assert {n for n in C.presets() if n.startswith(("img64-", "img512-")) and not n.endswith("-base")} == set(EDM2_TABLE)


def test_renamed_keys_still_work_with_one_note_naming_the_new_key(tmp_path, root, capsys):
    """`fid:` became `metrics:` (and fid.metrics metrics.names): old params files, presets, sweep files and
    -S overrides resolve to the same config, each old key noted once, in one line naming the new one."""
    import yaml

    from pipeline.config.loading import renamed
    assert renamed("fid") == "metrics" and renamed("fid.metrics") == "metrics.names"
    assert renamed("fid.num_images") == "metrics.num_images" and renamed("fidelity.x") == "fidelity.x"
    new = C.load_config(root / "params.yaml", ["metrics.num_images=12"])
    raw = yaml.safe_load((root / "params.yaml").read_text())
    old = {**{k: v for k, v in raw.items() if k != "metrics"}, "fid": {**raw["metrics"]}}
    old["fid"]["metrics"] = old["fid"].pop("names")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    capsys.readouterr()
    got = C.load_config(tmp_path / "old.yaml", ["fid.num_images=12"])
    assert got.to_dict() == new.to_dict() and got.run_key() == new.run_key()
    err = capsys.readouterr().err.splitlines()
    assert any(f"{tmp_path / 'old.yaml'}: fid is now metrics" in line for line in err), err
    assert any("fid.metrics is now metrics.names" in line for line in err), err
    assert any("override: fid.num_images is now metrics.num_images" in line for line in err), err
    C.load_config(tmp_path / "old.yaml")
    assert "fid is now metrics" not in capsys.readouterr().err           # once per key and place
    # SLURM's own settings moved under launcher.slurm.
    old_launcher = C.resolve({"launcher": {"partition": "gpu", "gpus_per_node": 4, "nnodes": 2}}, where="x.yaml")
    assert (old_launcher.launcher.slurm.partition, old_launcher.launcher.slurm.gpus_per_node,
            old_launcher.launcher.nnodes) == ("gpu", 4, 2)
    assert "x.yaml: launcher.partition is now launcher.slurm.partition" in capsys.readouterr().err
    # Two different values under both names are refused in a params file; a stored config keeps the current one.
    both = {**old, "metrics": {"num_images": 7}}
    assert C.resolve(both, where=None).metrics.num_images == 7
    with pytest.raises(C.ConfigError, match="x.yaml: launcher.cpus_per_task=1 and launcher.slurm.cpus_per_task=2 are "
                                            "the same setting under its old and new name: keep only launcher.slurm"):
        C.resolve({"launcher": {"cpus_per_task": 1, "slurm": {"cpus_per_task": 2}}}, where="x.yaml")
    same = C.resolve({"launcher": {"cpus_per_task": 3, "slurm": {"cpus_per_task": 3}}}, where="x.yaml")
    assert same.launcher.slurm.cpus_per_task == 3
    # A sweep file with old keys in its overrides and search axes.
    from pipeline.sweep.schema import load_sweep
    sweep_raw = yaml.safe_load((root / "sweeps" / "tiny.yaml").read_text())
    sweep_raw["base"] = str(root / "params.yaml")
    sweep_raw["overrides"] = {("fid." + k[len("metrics."):] if k.startswith("metrics.") else k): v
                              for k, v in sweep_raw["overrides"].items()}
    sweep_raw["search"] = {"fid.seed": {"grid": [0, 1]}}
    (tmp_path / "old_sweep.yaml").write_text(yaml.safe_dump(sweep_raw))
    sweep, base = load_sweep(tmp_path / "old_sweep.yaml")
    assert base.metrics.num_images == 4 and list(sweep.search) == ["metrics.seed"]
    assert "old_sweep.yaml: search: fid.seed is now metrics.seed" in capsys.readouterr().err
