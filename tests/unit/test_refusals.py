"""Issue #35: every traceback and silent acceptance a hostile probe found, now a one-line refusal (exit 2)
or the stated behaviour; bounded work before any compute (network sizes, decompression bombs, zip
entries, links out of a data folder, outputs and disk checked first)."""
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pipeline import config as C
from unit.test_fuzz import assert_contract, run_main


def _one_line(code, err, *needles):
    err = "\n".join(x for x in err.splitlines() if not x.startswith("params: "))   # the params-differ note
    assert_contract(code, err)
    assert code == 2, err
    for n in needles:
        assert n in err, err


# ----------------------------------------------------------------------------------------------
# Values the schema accepted silently.

@pytest.mark.parametrize("override,needle", [
    ("train.seed=18446744073709551616", "train.seed=18446744073709551616: a seed must be in [0, 2^63)"),
    ("metrics.seed=-1", "metrics.seed=-1"),
    ("network.label_balance=2", "network.label_balance=2: a blend weight t must be in [0, 1]"),
    ("network.res_balance=-1", "network.res_balance=-1"),
    ("ema.stds=[0.05,0.05]", "ema.stds=[0.05, 0.05]: each tracked sigma_rel once"),
    ("sampler.S_max=-.inf", "sampler.S_max=-inf must be >= sampler.S_min=0.0"),
    ("metrics.ref_num_images=1", "metrics.ref_num_images=1: must be >= 2"),
    ("metrics.names=[fid,nope]", "unknown metric 'nope'"),
    ("network.num_blocks=1000000", "network.num_blocks=1000000: must be <= 64"),
    ("metrics.seed=9223372036854775800", "must stay below 2^63"),
    ("network.channels_per_head=24", "must divide the width 64 of attention level 2"),
])
def test_silently_accepted_values_are_refused(override, needle):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(ROOT / "params.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_floor_heads_is_nvidias_rule():
    cfg = C.load_config(ROOT / "params.yaml", ["network.channels_per_head=24", "network.attention_heads=floor"])
    assert cfg.run_key() == C.load_config(ROOT / "params.yaml", ["network.channels_per_head=24",
                                                                  "network.attention_heads=floor"]).run_key()
    base = C.load_config(ROOT / "params.yaml")
    assert base.run_key() == C.load_config(ROOT / "params.yaml", ["network.attention_heads=floor"]).run_key()


def test_empty_params_file(tmp_path):
    (tmp_path / "p.yaml").write_text("")
    code, _, err = run_main("pipeline", "config", "--params", str(tmp_path / "p.yaml"))
    _one_line(code, err, "empty (no sections)")


def test_info_refuses_a_network_too_large_before_allocating():
    start = time.monotonic()
    code, _, err = run_main("pipeline", "info", "--params", str(ROOT / "params.yaml"), "-S",
                            "network.model_channels=60000")
    _one_line(code, err, "parameters", "GiB are available")
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------------------------
# Models and snapshots whose header and tensors disagree.

def _model(path: Path, cfg=None, **header):
    """A reconstructed model file as the reconstruct stage writes it (a small network)."""
    from pipeline.io import save_safetensors
    from pipeline.networks import build_network
    from pipeline.snapshots import RECONSTRUCTION_FORMAT
    cfg = cfg or C.resolve({}, {"network.model_channels": 8, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                                "network.attn_resolutions": [16], "network.channels_per_head": 8})
    args = {"img_resolution": 32, "img_channels": 1, "label_dim": 10}
    net = build_network(cfg, **args)
    meta = {"format": RECONSTRUCTION_FORMAT, "config": cfg.to_dict(), "net_args": args, "nimg": 128,
            "sigma_rel": 0.1, "gamma": 6.9, **header}
    save_safetensors(net.state_dict(), meta, path)
    return path


def _relabel(path: Path, tensor: str, new_dtype: str):
    """The same bytes, the header saying another dtype of the same width (F16 -> I16)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[tensor]["dtype"] = new_dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


@pytest.mark.parametrize("header,needle", [
    ({"sigma_rel": "NaN"}, "header sigma_rel='NaN' is not a number"),
    ({"nimg": -5}, "header nimg=-5 is not a whole number of images > 0"),
    ({"net_args": {"img_resolution": 32.7, "img_channels": 1, "label_dim": 10}}, "are not whole numbers"),
    ({"net_args": {"img_resolution": "32", "img_channels": 1, "label_dim": 10}}, "are not whole numbers"),
])
def test_model_headers_are_typed(tmp_path, header, needle):
    from pipeline.generation import load_model
    from pipeline.errors import PipelineError
    f = _model(tmp_path / "ema-0000000128-0.100.safetensors", **header)
    with pytest.raises(PipelineError, match=needle.replace("(", r"\(")):
        load_model(f)


def test_a_model_claiming_another_network_is_refused(tmp_path):
    from pipeline.generation import load_model
    from pipeline.errors import PipelineError
    f = _model(tmp_path / "ema-0000000128-0.100.safetensors")
    raw = C.resolve({}, {"network.model_channels": 16}).to_dict()
    from pipeline.io import load_safetensors, save_safetensors
    state, meta = load_safetensors(f)
    save_safetensors(state, {**meta, "config": raw}, f)
    with pytest.raises(PipelineError, match="do not match the network its header describes|needs"):
        load_model(f)


def _snapshots(folder: Path):
    """Two snapshot times x two EMA lengths of a small network, as training writes them."""
    from pipeline.networks import build_network
    from pipeline.phema import PowerFunctionEMA, snapshot_meta
    cfg = C.resolve({}, {"network.model_channels": 8, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                         "network.attn_resolutions": [16], "network.channels_per_head": 8, "ema.snapshot_nimg": 64,
                         "train.batch_size": 32})
    args = {"img_resolution": 32, "img_channels": 1, "label_dim": 10}
    net = build_network(cfg, **args)
    ema = PowerFunctionEMA(net, cfg.ema.stds)
    for nimg in (64, 128):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        ema.update(net, nimg, 64)
        ema.save_snapshots(folder, nimg, snapshot_meta(cfg, args))
    return cfg


def test_snapshot_relabelled_f16_to_i16_is_refused(tmp_path):
    from pipeline.phema import PHEMAError
    from pipeline.reconstruction import reconstruct
    _snapshots(tmp_path / "s")
    _relabel(tmp_path / "s" / "phema-0000000128-0.100.safetensors", "unet.out_gain", "I16")
    with pytest.raises(PHEMAError, match="stored as int16; a post-hoc EMA snapshot holds floating-point tensors only"):
        reconstruct(tmp_path / "s", [0.08], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("ema-*"))


def test_snapshots_claiming_another_network_are_refused(tmp_path):
    from pipeline.io import load_safetensors, save_safetensors
    from pipeline.phema import PHEMAError
    from pipeline.reconstruction import reconstruct
    cfg = _snapshots(tmp_path / "s")
    other = C.resolve(cfg.to_dict(), {"network.model_channels": 16}).to_dict()
    for f in sorted((tmp_path / "s").glob("phema-*")):
        state, meta = load_safetensors(f)
        save_safetensors(state, {**meta, "config": other}, f)
    with pytest.raises(PHEMAError, match="do not match the network its header describes|needs"):
        reconstruct(tmp_path / "s", [0.08], out_dir=tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# Command lines that started computing before refusing, or traced back.

@pytest.mark.parametrize("extra,needle", [
    (["--seed", str(2 ** 70)], "a seed must be in [0, 2^63)"),
    (["--seed", "-1"], "a seed must be in [0, 2^63)"),
    (["--num", str(10 ** 11)], "images of 32x32x1 need 97,656,250.0 MiB, more than the"),
])
def test_sample_refuses_before_sampling(tmp_path, extra, needle):
    f = _model(tmp_path / "ema-0000000128-0.100.safetensors")
    argv = ["sample", "--params", str(ROOT / "params.yaml"), "--model", str(f), "--out", str(tmp_path / "o.npz")]
    argv += extra if "--num" in extra else ["--num", "2", *extra]
    start = time.monotonic()
    code, _, err = run_main("pipeline", *argv)
    _one_line(code, err, needle)
    assert time.monotonic() - start < 30 and not (tmp_path / "o.npz").exists()


def test_safetensors_metadata_of_the_wrong_type(tmp_path):
    from pipeline.io import read_safetensors_header
    from pipeline.errors import PipelineError
    for meta in ([1, 2], "text"):
        text = json.dumps({"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        f = tmp_path / "x.safetensors"
        f.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
        with pytest.raises(PipelineError, match="__metadata__ is a"):
            read_safetensors_header(f)


def test_outputs_are_checked_before_training_and_reference(tmp_path):
    code, _, err = run_main("stages.train", "--params", str(ROOT / "params.yaml"), "--metrics", "/proc/1/nope/t.json")
    _one_line(code, err, "--metrics")
    (tmp_path / "file").write_text("x")
    code, _, err = run_main("stages.reference", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "file"))
    _one_line(code, err, "--out", "is a file, not a folder")


def test_runs_of_an_experiment_with_training_runs_only(tmp_path):
    import mlflow

    from pipeline.tracking.runs import load_runs
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("only-training", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp, tags={"run_key": "abc", "kind": "train"}, run_name="train-abc")
    client.log_metric(run.info.run_id, "final_loss", -0.3)
    client.set_terminated(run.info.run_id)
    df = load_runs("only-training", uri)
    assert len(df) == 1 and df.loc[0, "final_loss"] == -0.3 and df.loc[0, "evaluated"] == False   # noqa: E712


# ----------------------------------------------------------------------------------------------
# Data sources: bounded before decoding, and nothing outside the folder or archive.

def _png(path_or_buf, size, mode="L"):
    from PIL import Image
    Image.new(mode, size).save(path_or_buf, format="PNG")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    from pipeline.data.pixels import DataError
    from pipeline.data.readers import read_image_folder
    d = tmp_path / "imgs"
    d.mkdir()
    _png(d / "ok.png", (8, 8))
    _png(d / "bomb.png", (9000, 9000))                     # 81 M pixels, a few hundred KB on disk
    assert (d / "bomb.png").stat().st_size < 1 << 20
    with pytest.raises(DataError, match=r"9000 x 9000 = 81,000,000 pixels, above the limit"):
        read_image_folder(d)


@pytest.mark.parametrize("names,needle", [
    (["a/ok.png", "../evil.png"], "points outside the archive"),
    (["a/ok.png", "/abs/evil2.png"], "points outside the archive"),
    (["a/ok.png", "a/ok.png"], "appears twice"),
])
def test_zip_entries_are_checked_before_reading(tmp_path, names, needle):
    import io as _io
    import warnings

    from pipeline.data.pixels import DataError
    from pipeline.data.readers import read_image_zip
    buf = _io.BytesIO()
    _png(buf, (8, 8))
    z = tmp_path / "d.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(z, "w") as zf:
        warnings.simplefilter("ignore")                    # zipfile warns about the duplicate name
        for n in names:
            zf.writestr(zipfile.ZipInfo(n), buf.getvalue())
    with pytest.raises(DataError, match=needle):
        read_image_zip(z)


def test_zip_entry_that_unpacks_too_large_is_refused_unread(tmp_path):
    from pipeline.data.pixels import DataError
    from pipeline.data.readers import MAX_ENTRY_BYTES, read_image_zip
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("a/big.png", "w", force_zip64=True) as f:
        block = b"\0" * (1 << 20)
        for _ in range(MAX_ENTRY_BYTES // len(block) + 1):
            f.write(block)
    assert z.stat().st_size < 2 << 20
    with pytest.raises(DataError, match="unpacks to .* bytes, above the limit"):
        read_image_zip(z)


def test_symlink_out_of_the_data_folder_is_refused(tmp_path):
    from pipeline.data.pixels import DataError
    from pipeline.data.readers import read_image_folder
    outside = tmp_path / "private.png"
    _png(outside, (8, 8))
    d = tmp_path / "imgs" / "cls"
    d.mkdir(parents=True)
    _png(d / "ok.png", (8, 8))
    os.symlink(outside, d / "link.png")
    with pytest.raises(DataError, match="outside the data folder"):
        read_image_folder(tmp_path / "imgs")
    os.unlink(d / "link.png")
    os.symlink(d / "ok.png", d / "inside.png")              # a link within the folder is fine
    assert len(read_image_folder(tmp_path / "imgs").images) == 2


def test_training_refuses_a_network_too_large(tmp_path, monkeypatch):
    """The memory estimate is real: with 1 MiB available the default network is refused by name."""
    from pipeline import networks
    monkeypatch.setattr(networks, "available_memory", lambda: 1 << 20)
    with pytest.raises(networks.NetworkSizeError, match="float32 cop"):
        networks.build_network(C.load_config(ROOT / "params.yaml"), 32, 1, 10)


@pytest.mark.parametrize("change,flags,needle", [
    ({}, ["--num-cpus", "1000"], "--num-cpus 1000: Ray's logical CPUs"),
    ({}, ["--address", "garbage"], "--address 'garbage': expected host:port"),
    ({"experiment": ""}, [], "experiment=''"),
    ({"tracking_server": "yes"}, [], "tracking_server='yes': expected true or false"),
    ("name: again\n", [], "key 'name' appears twice in one mapping"),
])
def test_sweep_plans_refuse(tmp_path, monkeypatch, change, flags, needle):
    import yaml
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    text = (ROOT / "sweeps" / "tiny.yaml").read_text()
    if isinstance(change, dict):
        text = yaml.safe_dump({**yaml.safe_load(text), **change})
    else:
        text += change
    (tmp_path / "s.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("pipeline", "sweep", "s.yaml", "--dry-run", *flags)
    _one_line(code, err, needle)
