"""Issue: nothing executes, nothing hangs, nothing is silently wrong.

Full disks at every writer (a small tmpfs filled to the byte), bounded network calls, output
locations checked before compute, non-finite numbers refused, the strict boundary (the tracebacks a
hostile user found, one line each now), checkpoint fallback, and stages killed mid-way."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_params
from safetensors.torch import load_file, save_file
from integration.test_safety import ENV, Payload, one_line_exit_2, run_cli

from pipeline import config as C
from pipeline import io as pio

PAGE = 4096


@contextmanager
def small_disk(path: Path, free_pages: int | None = 0, size: str = "16m", read_only: bool = False):
    """A tmpfs at `path` with `free_pages` pages left (a filler file takes the rest; None: not filled
    yet, see fill), or mounted read-only. Needs root and a permitted mount; skipped with the reason
    otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()[:120]})")
    try:
        if not read_only and free_pages is not None:
            fill(path, free_pages)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, free_pages: int = 0) -> None:
    st = os.statvfs(path)
    with open(path / ".filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - free_pages * PAGE))
    assert os.statvfs(path).f_bavail == free_pages


def free_disk(path: Path) -> None:
    (path / ".filler").unlink()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fmnist):
    """A finished tiny run (tracking off) and its reconstructed EMA models; every test copies what it changes."""
    d = tmp_path_factory.mktemp("tiny")
    params = tiny_params(d, fmnist, tracking={"enabled": False})
    for args in (("-m", "stages.train", "--params", str(params), "--no-progress"),
                 ("-m", "stages.reconstruct", "--params", str(params), "--out", str(d / "models")),
                 ("-m", "stages.evaluate", "--params", str(params), "--models", str(d / "models"), "--metrics",
                  str(d / "metrics"), "--samples", str(d / "samples"), "--ref-cache", str(d / "ref"))):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "params": params, "run": d / "run", "models": d / "models", "metrics": d / "metrics",
            "samples": d / "samples", "model": sorted((d / "models").glob("ema-*.safetensors"))[0]}


def timed(*args, timeout=120):
    t0 = time.time()
    r = run_cli(*args, timeout=timeout)
    return r, time.time() - t0


def call(*args):
    """A command line run in this process (`-m module args...`): its exit code and output, as run_cli
    gives them, without a new interpreter's start-up (the one-line contract is cli.run's, the same here)."""
    import contextlib
    import importlib
    import io
    import types
    assert args[0] == "-m"
    main = importlib.import_module(args[1] + (".__main__" if args[1] == "pipeline" else "")).main
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args[2:]))
        except SystemExit as e:                   # argparse
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue()), time.time() - t0


TRAIN_WRITERS = {   # which writer meets the full disk first, and the settings that make it so
    "metrics-log": (2, {"checkpoint_nimg": 64}),        # lock + config.yaml fit, the first metrics line does not
    "checkpoint": (16, {"checkpoint_nimg": 16}),        # the checkpoint at nimg 16 comes before any snapshot
    "snapshot": (16, {"checkpoint_nimg": 64}),          # the snapshots at nimg 32 come first
    "snapshot-thread": (16, {"checkpoint_nimg": 64, "async_snapshots": True}),   # written in the background
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(TRAIN_WRITERS))
def test_full_disk_at_each_training_writer_ends_in_one_line_then_resumes(tmp_path, fmnist, writer):
    pages, train = TRAIN_WRITERS[writer]
    with small_disk(tmp_path / "disk", free_pages=pages) as disk:
        params = tiny_params(tmp_path, fmnist, tracking={"enabled": False},
                             train={"run_dir": str(disk / "run"), **train})
        r, seconds = timed("-m", "stages.train", "--params", str(params), "--no-progress")
        one_line_exit_2(r, "No space left on device", str(disk / "run"))
        assert seconds < 60, seconds
        assert not [p for p in (disk / "run").rglob("*.tmp")], "a temp file was left behind"
        assert C.load_config(disk / "run" / "config.yaml")          # what was written before is whole
        if writer not in ("checkpoint", "snapshot-thread"):         # the resume is the same for every writer
            return
        free_disk(disk)                                                # room again: the same command resumes
        r = run_cli("-m", "stages.train", "--params", str(params), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((disk / "run" / "train_summary.json").read_text())
        assert summary["status"] == "finished" and summary["nimg"] == 128


@pytest.mark.slow
def test_full_disk_at_reconstruct_evaluate_sample_and_report(tmp_path, tiny):
    models = tmp_path / "models"
    shutil.copytree(tiny["models"], models)
    with small_disk(tmp_path / "disk", free_pages=None) as disk:
        # reconstruct: one target already there (kept byte for byte), a new one meets the full disk
        out = disk / "models"
        shutil.copytree(tiny["models"], out, ignore=shutil.ignore_patterns("*0.100*", "*0.150*", "*.png", "*.json"))
        fill(disk)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        r, seconds = timed("-m", "stages.reconstruct", "--params", str(tiny["params"]), "--out", str(out))
        one_line_exit_2(r, "No space left on device")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before and seconds < 60
        # evaluate: the metrics folder is full (its samples and reference cache elsewhere)
        r, seconds = timed("-m", "stages.evaluate", "--params", str(tiny["params"]), "--models", str(models),
                           "--metrics", str(disk / "metrics"), "--samples", str(tmp_path / "samples"),
                           "--ref-cache", str(tmp_path / "ref"), timeout=300)
        one_line_exit_2(r, "No space left on device", str(disk / "metrics"))
        assert seconds < 120
        # the report (of the tiny run's evaluation), and exported samples
        r, seconds = timed("-m", "stages.report", "--params", str(tiny["params"]), "--metrics", str(tiny["metrics"]),
                           "--models", str(models), "--samples", str(tiny["samples"]), "--out", str(disk / "reports"))
        one_line_exit_2(r, "No space left on device")
        r, seconds = timed("-m", "pipeline", "sample", "--params", str(tiny["params"]), "--model", str(tiny["model"]),
                           "--num", "2", "--out", str(disk / "s.npz"))
        one_line_exit_2(r, "MiB of free disk", "s.npz")        # found before sampling (generation.check_sample_size)
        assert not (disk / "s.npz").exists()


@pytest.mark.integration
def test_full_disk_at_the_sweep_results_is_one_line(tmp_path):
    import pandas as pd

    from pipeline import cli
    from pipeline.sweep.results import write_results
    from pipeline.sweep.schema import SweepConfig
    sweep = SweepConfig.model_validate({"name": "x", "ema_lengths": [0.1]})
    df = pd.DataFrame([{"trial_id": "t0000", "status": "interrupted", "fid": None, "sigma_rel": None}])
    with small_disk(tmp_path / "disk", free_pages=0) as disk:
        assert cli.run("sweep", lambda: write_results(df, disk / "x", sweep)) == 2
        assert not (disk / "x" / "results.csv").exists()


def test_a_failed_background_snapshot_write_stops_the_loop(tmp_path, fmnist, monkeypatch):
    """Without a tmpfs too: the snapshot thread's error reaches the training loop, which stops at once."""
    from pipeline import training
    calls = []

    def full(items):
        calls.append(len(items))
        raise OSError(28, "No space left on device", "snapshots")
    monkeypatch.setattr(training, "write_snapshots", full)
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False},
                         train={"async_snapshots": True, "checkpoint_nimg": 128})
    with pytest.raises(OSError, match="No space left"):
        training.train(C.load_config(params), training.TrainHooks(progress=False))
    assert len(calls) == 1                      # the first failed write ended training: no second one queued
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) <= 64                     # stopped within a snapshot interval or two, not at the end


@pytest.mark.integration
@pytest.mark.parametrize("uri,needle", [("http://127.0.0.1:1", "unreachable"), ("foo://bar", "unknown scheme")])
def test_tracking_uri_that_cannot_answer_is_one_line_within_15_s(uri, needle):
    r, seconds = timed("-m", "pipeline", "runs", "--uri", uri, timeout=60)
    one_line_exit_2(r, needle)
    assert seconds < 15, seconds


def test_output_locations_are_checked_before_any_compute(tmp_path, tiny):
    afile = tmp_path / "afile"
    afile.write_text("x")
    p = str(tiny["params"])
    cases = [
        (("-m", "stages.evaluate", "--params", p, "--models", str(tiny["models"]), "--metrics", str(afile),
          "--ref-cache", str(tmp_path / "ref")), "is a file, not a folder"),
        (("-m", "pipeline", "sample", "--params", p, "--model", str(tiny["model"]), "--num", "2",
          "--out", str(afile / "x.npz")), "is a file, not a folder"),
        (("-m", "stages.report", "--params", p, "--metrics", str(tmp_path), "--out", str(afile / "r")),
         "cannot be created"),
        (("-m", "stages.reconstruct", "--params", p, "--out", str(afile)), "is a file"),
        (("-m", "stages.train", "--params", p, "-S", f"train.run_dir={afile}/run"), "cannot be created"),
    ]
    for args, needle in cases:
        r, seconds = call(*args)
        one_line_exit_2(r, needle)
        assert seconds < 30, (args, seconds)
    assert not (tmp_path / "ref").exists()                       # no reference statistics were computed
    with small_disk(tmp_path / "ro", read_only=True) as ro:       # a read-only folder (root is refused too)
        r, seconds = timed("-m", "stages.evaluate", "--params", p, "--models", str(tiny["models"]), "--metrics",
                           str(ro / "metrics"), "--ref-cache", str(tmp_path / "ref"))
        one_line_exit_2(r, "not writable", "Read-only file system")
        assert seconds < 30 and not (tmp_path / "ref").exists()


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a safetensors file with its header metadata, tensors changed by change(dict)."""
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    change(tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_snapshots_and_models_are_refused_naming_file_and_tensor(tmp_path, tiny, value):
    snaps = tmp_path / "snaps"
    shutil.copytree(tiny["run"] / "snapshots", snaps)
    victim = sorted(snaps.glob("*.safetensors"))[2]
    key = sorted(load_file(str(victim)))[5]

    def poison(t):
        t[key].view(-1)[3] = value
    _rewrite(victim, victim, poison)
    r = run_cli("-m", "stages.reconstruct", "--snapshots", str(snaps), "--targets", "0.1", "--out",
                str(tmp_path / "out"), "--params", "none.yaml")
    one_line_exit_2(r, victim.name, key, "non-finite")
    assert not list((tmp_path / "out").glob("ema-*"))
    model = _rewrite(tiny["model"], tmp_path / "m" / tiny["model"].name, poison)
    one_line_exit_2(run_cli("-m", "pipeline", "sample", "--params", str(tiny["params"]), "--model", str(model),
                            "--num", "2", "--out", str(tmp_path / "s.npz")), model.name, key, "non-finite")
    assert not (tmp_path / "s.npz").exists()


def test_overlapping_tensors_in_a_snapshot_are_refused(tmp_path, tiny):
    import struct
    snaps = tmp_path / "snaps"
    shutil.copytree(tiny["run"] / "snapshots", snaps)
    victim = sorted(snaps.glob("*.safetensors"))[0]
    raw = victim.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__" and header[k]["shape"]]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
    if header[b]["data_offsets"][1] - header[b]["data_offsets"][0] == size:
        header[b]["data_offsets"] = list(header[a]["data_offsets"])   # b reads a's bytes
    else:
        header[b]["shape"], header[b]["data_offsets"] = header[a]["shape"], list(header[a]["data_offsets"])
    text = json.dumps(header).encode()
    victim.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    r = run_cli("-m", "stages.reconstruct", "--snapshots", str(snaps), "--targets", "0.1", "--out",
                str(tmp_path / "out"), "--params", "none.yaml")
    one_line_exit_2(r, victim.name, "overlap")


def test_samples_that_come_out_non_finite_stop_instead_of_black_images(tiny):
    from pipeline.fid import FIDError
    from pipeline.generation import generate, load_model
    net, _ = load_model(tiny["model"])
    with torch.no_grad():                      # finite weights whose outputs overflow: a diverged model
        net.unet.out_gain.fill_(3e38)
    with pytest.raises(FIDError, match="came out non-finite"):
        generate(net, 2, 0, C.SamplerConfig(steps=2), 2)


def _bad_sources(tmp_path, tiny):
    """Files for the cases below: broken manifests, a corrupt records file, a metrics log with garbage."""
    import numpy as np

    from pipeline.data.manifest import sha256_files
    enc = Path(C.load_config(tiny["params"]).data.dataset_dir)
    out = {}
    for kind in ("empty", "nosha", "notutf8", "objdtype"):
        d = tmp_path / f"enc-{kind}"
        shutil.copytree(enc / "train", d / "train")
        m = d / "train" / "manifest.json"
        if kind == "empty":
            m.write_text("[]")
        elif kind == "nosha":
            man = json.loads(m.read_text())
            del man["sha256"]
            m.write_text(json.dumps(man))
        elif kind == "notutf8":
            m.write_bytes(b"\xff\xfe{")
        else:                                  # an object array, with the manifest's hash made to match
            np.save(d / "train" / "images.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
            man = json.loads(m.read_text())
            man["sha256"] = sha256_files([d / "train" / "images.npy", d / "train" / "labels.npy"])
            m.write_text(json.dumps(man))
        out[kind] = d
    (tmp_path / "recs").mkdir()
    (tmp_path / "recs" / "fid_records.json").write_text('[{"fid": ')
    run2 = tmp_path / "run2"
    shutil.copytree(tiny["run"], run2, ignore=shutil.ignore_patterns("checkpoints", "snapshots"))
    with open(run2 / "metrics.jsonl", "a") as f:
        f.write("garbage{\n")
    return out, run2


def test_the_reported_tracebacks_and_silent_exits_are_one_line_exit_2(tmp_path, tiny):
    p, model = str(tiny["params"]), tiny["model"]
    enc, run2 = _bad_sources(tmp_path, tiny)
    from safetensors import safe_open
    with safe_open(str(model), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(model))
    key = "unet.conv_out.weight"
    (tmp_path / "m").mkdir()
    save_file({**tensors, key: torch.zeros(3, 5)}, str(tmp_path / "m" / "shape.safetensors"), metadata=meta)
    save_file({**tensors, key: tensors[key].to(torch.int32)}, str(tmp_path / "m" / "dtype.safetensors"), metadata=meta)
    save_file(tensors, str(tmp_path / "m" / "garbage.safetensors"), metadata={**meta, "config": '"garbage"'})
    other = json.loads(meta["config"])
    other["network"]["model_channels"] = 32
    save_file(tensors, str(tmp_path / "m" / "other.safetensors"), metadata={**meta, "config": json.dumps(other)})
    (tmp_path / "afile").write_text("x")
    sample = ("-m", "pipeline", "sample", "--params", p, "--num", "2", "--out", str(tmp_path / "x.npz"))
    cases = {
        "encode --splits nope": (("-m", "stages.encode", "--params", p, "--splits", "nope"), "--splits nope"),
        "runs foo://bar": (("-m", "pipeline", "runs", "--uri", "foo://bar"), "unknown scheme"),
        "submit sweep without a file": (("-m", "pipeline", "submit", "sweep", "--executor", "local"), "one sweep file"),
        "results on corrupt records": (("-m", "pipeline", "results", "--params", p, "--metrics", str(tmp_path / "recs")),
                                       "corrupt"),
        "report on corrupt records": (("-m", "stages.report", "--params", p, "--metrics", str(tmp_path / "recs"),
                                       "--out", str(tmp_path / "rep")), "corrupt"),
        "report without inputs": (("-m", "stages.report", "--params", p, "--metrics", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "rep")), "missing"),
        "sample --model of another shape": ((*sample, "--model", str(tmp_path / "m" / "shape.safetensors")), key),
        "sample --model of another dtype": ((*sample, "--model", str(tmp_path / "m" / "dtype.safetensors")), "int32"),
        "sample --model with a garbage config": ((*sample, "--model", str(tmp_path / "m" / "garbage.safetensors")),
                                                 "config"),
        "sample --model describing another network": ((*sample, "--model", str(tmp_path / "m" / "other.safetensors")),
                                                      key),
        "sample --guidance nan": ((*sample, "--model", str(model), "--guidance", "nan", "--guide", "unconditional"),
                                  "sampler.guidance"),
        "sample --guidance -1": ((*sample, "--model", str(model), "--guidance", "-1", "--guide", "unconditional"),
                                 "must be >= 0"),
        "sample unconditional guide without label dropout": (
            (*sample, "--model", str(model), "--guidance", "2", "--guide", "unconditional"), "label_dropout"),
        "train --nproc-per-node 0": (("-m", "stages.train", "--params", p, "--nproc-per-node", "0"), "must be >= 1"),
        "-S train.batch_size=true": (("-m", "pipeline", "config", "--params", p, "-S", "train.batch_size=true"),
                                     "boolean"),
        "-S train.compile=1": (("-m", "pipeline", "config", "--params", p, "-S", "train.compile=1"), "true or false"),
    }
    for kind, d in enc.items():
        cases[f"train on manifest {kind}"] = (("-m", "stages.train", "--params", p, "-S", f"data.dataset_dir={d}",
                                               "-S", f"train.run_dir={tmp_path / ('r-' + kind)}"),
                                              "images.npy" if kind == "objdtype" else "manifest.json")
    failed = []
    for name, (args, needle) in cases.items():
        r, seconds = call(*args)
        try:
            one_line_exit_2(r, needle)
            assert seconds < 30, seconds
        except AssertionError as err:
            failed.append(f"{name}: {str(err)[:300]}")
    assert not failed, "\n".join(failed)
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "rep").exists()
    # A garbage line inside the metrics log is dropped with a note; the report is written.
    r = run_cli("-m", "stages.report", "--params", p, "-S", f"train.run_dir={run2}", "--metrics", str(tiny["metrics"]),
                "--models", str(tiny["models"]), "--samples", str(tiny["samples"]), "--out", str(tmp_path / "rep2"))
    assert r.returncode == 0 and "dropped an unreadable" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "rep2" / "report.html").is_file()


@pytest.mark.integration
def test_sweep_dry_run_checks_cpus_gpus_and_storage(tmp_path, fmnist, monkeypatch):
    import yaml
    tiny_params(tmp_path, fmnist)
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    (tmp_path / "afile").write_text("x")

    def dry(extra_args=(), **changes):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({**base, **changes}))
        return call("-m", "pipeline", "sweep", "s.yaml", "--dry-run", *extra_args)[0]
    one_line_exit_2(dry(["--num-cpus", "0"]), "--num-cpus", ">= 1")
    one_line_exit_2(dry(["--num-cpus", "1"], resources={"cpus": 2}), "this machine has 1")
    one_line_exit_2(dry(resources={"cpus": 64, "gpus": 8}), "resources.cpus=64")
    one_line_exit_2(dry(storage="afile"), "sweep storage", "is a file")
    one_line_exit_2(dry(resources={"cpus": 0}), "resources.cpus")
    ok = dry()
    assert ok.returncode == 0 and "trial 4:" in ok.stdout, ok.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["crafted", "truncated", "non-finite"])
def test_a_bad_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, fmnist, tiny, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False})            # tiny's run, in tmp_path
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*.pt"))
    newest, reference = ckpts[-1], torch.load(ckpts[-1], weights_only=True)
    marker = tmp_path / "EXECUTED"
    if damage == "crafted":
        torch.save({"format": reference["format"], "evil": Payload(marker)}, newest)
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:1000])
    else:
        bad = dict(reference)
        bad["net"] = {k: v.clone() for k, v in reference["net"].items()}
        next(iter(bad["net"].values())).view(-1)[0] = float("nan")
        torch.save(bad, newest)
    for f in ("train_summary.json",):
        (run / f).unlink()
    lines = run_cli("-m", "stages.train", "--params", str(params), "--no-progress")
    assert lines.returncode == 0, lines.stderr[-2000:]
    out = lines.stdout + lines.stderr
    assert out.count("falling back to the previous checkpoint") == 1, out
    assert f"resuming from {ckpts[-2]}" in out and (newest.parent / (newest.name + ".refused")).is_file()
    again = torch.load(newest, weights_only=True)           # the same step retrained: the same weights
    for k, v in reference["net"].items():
        assert torch.equal(again["net"][k], v), k
    assert not marker.exists()


def _complete(folder: Path) -> dict:
    """Every output file in `folder`: readable and whole (safetensors with finite tensors, JSON, PNG)."""
    seen = {}
    for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not f.is_file() or f.name == ".lock" or pio.TEMP_RE.match(f.name):   # a killed writer's temp file
            continue
        if f.suffix == ".safetensors":
            pio.load_safetensors(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".png":
            from PIL import Image
            Image.open(f).verify()
        seen[f.relative_to(folder)] = f.stat().st_size
    return seen


@pytest.mark.slow
def test_stages_killed_mid_way_leave_whole_outputs_and_rerun_to_the_same_result(tmp_path, tiny):
    p = str(tiny["params"])
    stages = {
        "reconstruct": lambda out: ("-m", "stages.reconstruct", "--params", p, "--out", str(out)),
        "evaluate": lambda out: ("-m", "stages.evaluate", "--params", p, "--models", str(tiny["models"]),
                                 "--metrics", str(out / "metrics"), "--samples", str(out / "samples"),
                                 "--ref-cache", str(tmp_path / "ref")),
        "report": lambda out: ("-m", "stages.report", "--params", p, "--metrics", str(tiny["metrics"]),
                               "--models", str(tiny["models"]), "--samples", str(tiny["samples"]), "--out", str(out)),
    }
    kill_at = {"reconstruct": 0.5, "evaluate": 0.8, "report": 0.65}     # fractions of an uninterrupted run
    for name, cmd in stages.items():
        ref_out = tmp_path / f"{name}-ref"
        r, seconds = timed(*cmd(ref_out), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        want = _complete(ref_out)
        for frac in (kill_at[name],):
            out = tmp_path / f"{name}-{frac}"
            proc = subprocess.Popen([sys.executable, *cmd(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(seconds * frac)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _complete(out)                                      # nothing torn, whatever the moment
            r = run_cli(*cmd(out), timeout=300)                  # the rerun completes
            assert r.returncode == 0, r.stderr[-2000:]
            assert set(_complete(out)) == set(want), (name, frac)
        if name == "reconstruct":                                # and gives the same models, bit for bit
            for f in ref_out.glob("ema-*.safetensors"):
                (a, ma), (b, mb) = pio.load_safetensors(f), pio.load_safetensors(tmp_path / f"{name}-0.5" / f.name)
                assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f.name
                assert ma["sources_digest"] == mb["sources_digest"] and ma["coefficients"] == mb["coefficients"]
        if name == "evaluate":
            for f in ("fid.json", "fid_points.json"):
                a = json.loads((ref_out / "metrics" / f).read_text())
                b = json.loads((tmp_path / "evaluate-0.8" / "metrics" / f).read_text())
                assert a == b, f


def test_existing_folders_and_special_files_are_left_as_they_are(tmp_path, fmnist):
    import stat

    from pipeline.data.encode import encode_dataset
    from pipeline.data.pixels import DataError
    from pipeline.sweep.driver import make_private
    with pytest.raises(pio.PipelineError, match="not a regular file"):
        pio.atomic_write_text("x", "/dev/null")                  # never renamed over a device
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    make_private(shared / "sweep")                               # `storage:` an existing folder
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and stat.S_IMODE((shared / "sweep").stat().st_mode) == 0o700
    mine = tmp_path / "train"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an encoded dataset"):
        encode_dataset(C.load_config(ROOT / "params.yaml", ["data.max_images=8"]), mine, "train", progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_sample_says_which_sampler_it_used_and_prefers_the_models_record(tmp_path, tiny):
    """Params whose sampler differs from the model's recorded one: `pipeline sample` says so and uses the
    model's; a sampler value given on the command line wins (and is said too)."""
    import yaml
    raw = yaml.safe_load(tiny["params"].read_text())
    recorded_steps = raw["sampler"]["steps"]
    raw["sampler"]["steps"] = recorded_steps + 2                  # e.g. left behind by a `dvc exp run -S`
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    common = ("-m", "pipeline", "sample", "--params", str(params), "--model", str(tiny["model"]), "--num", "2")
    r = run_cli(*common, "--out", str(tmp_path / "a.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    nfe = 2 * recorded_steps - 1
    assert f"the model's recorded settings (NFE {nfe}" in r.stderr and f"NFE {nfe}" in r.stdout, (r.stdout, r.stderr)
    r = run_cli(*common, "-S", "sampler.steps=3", "--out", str(tmp_path / "b.npz"))
    assert r.returncode == 0 and "the command line's settings (NFE 5)" in r.stderr and "NFE 5" in r.stdout, r.stderr
