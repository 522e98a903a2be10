"""Issue: nothing executes from a file, nothing is lost, every failure is one line.

Crafted pickles in the four places the pipeline reads models from; one writer per run folder; a
full disk during the metrics append; a rerun of a finished run; MLflow down for part of a run; a
sweep searching the noise law itself."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_params
from pipeline import config as C
from pipeline import io as pio
from pipeline.phema import PowerFunctionEMA, snapshot_meta
from pipeline.reconstruction import reconstruct
from pipeline.checkpoints import CHECKPOINT_FORMAT
from pipeline.training import TrainHooks, train

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "evil": Payload(marker)}, path)
    return path


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_exit_2(r, *needles):
    """Exit 2 with one error line on stderr (progress-bar lines aside), no traceback."""
    err = "\n".join(line for line in r.stderr.strip().splitlines()       # splitlines also splits tqdm's \r
                     if line.strip() and not re.search(r"\d+%\|", line))
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def make_snapshots(d: Path, n: int = 3, interval: int = 32):
    cfg = C.resolve({})
    net = torch.nn.Linear(4, 4)
    ema = PowerFunctionEMA(net, [0.05, 0.10])
    for i in range(1, n + 1):
        ema.update(net, i * interval, interval)
        ema.save_snapshots(d, i * interval, {**snapshot_meta(cfg), "snapshot_nimg": interval})


def test_weights_only_false_appears_nowhere():
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if "weights_only=False" in line]
    assert not hits, hits


def test_crafted_pickles_are_refused_in_all_four_places_and_never_run(tmp_path, fmnist):
    marker = tmp_path / "EXECUTED"
    # The payload is real: plain pickle would run it.
    probe = crafted(tmp_path / "probe.pt", tmp_path / "probe-ran")
    torch.load(probe, weights_only=False)  # noqa: this test proves the payload works; the pipeline never does this
    assert (tmp_path / "probe-ran").exists()

    # 1. The newest checkpoint of a run.
    params = tiny_params(tmp_path / "train", fmnist, tracking={"enabled": False})
    crafted(tmp_path / "train" / "run" / "checkpoints" / "checkpoint-0000000032.pt", marker, format=CHECKPOINT_FORMAT)
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(params), "--no-progress"), "refused")
    # 2. A snapshot, as an old .pt name and disguised under the new name.
    snaps = tmp_path / "snaps"
    make_snapshots(snaps)
    crafted(snaps / "phema-0000000128-0.050.pt", marker)
    one_line_exit_2(run_cli("-m", "stages.reconstruct", "--snapshots", str(snaps), "--targets", "0.1",
                            "--out", str(tmp_path / "o1"), "--params", "none.yaml"), "convert --trust")
    (snaps / "phema-0000000128-0.050.pt").unlink()
    crafted(snaps / "phema-0000000064-0.100.safetensors", marker)
    one_line_exit_2(run_cli("-m", "stages.reconstruct", "--snapshots", str(snaps), "--targets", "0.1",
                            "--out", str(tmp_path / "o2"), "--params", "none.yaml"), "not a safetensors file")
    # 3. An existing model in reconstruct's output folder (old name, and disguised: then rebuilt, not read).
    good = tmp_path / "good"
    make_snapshots(good)
    out = tmp_path / "models"
    crafted(out / "ema-0000000096-0.100.pt", marker)
    one_line_exit_2(run_cli("-m", "stages.reconstruct", "--snapshots", str(good), "--targets", "0.1",
                            "--out", str(out), "--params", "none.yaml"), "convert --trust")
    (out / "ema-0000000096-0.100.pt").unlink()
    crafted(out / "ema-0000000096-0.100.safetensors", marker)
    r = run_cli("-m", "stages.reconstruct", "--snapshots", str(good), "--targets", "0.1", "--out", str(out),
                "--params", "none.yaml")
    assert r.returncode == 0, r.stderr
    assert pio.read_safetensors_header(out / "ema-0000000096-0.100.safetensors")[1]["format"].endswith("reconstruction/1")
    # 4. A model given to the evaluate stage.
    models = tmp_path / "eval-models"
    crafted(models / "ema-0000000096-0.100.pt", marker)
    one_line_exit_2(run_cli("-m", "stages.evaluate", "--params", str(params), "--models", str(models)),
                    "convert --trust")
    (models / "ema-0000000096-0.100.pt").unlink()
    crafted(models / "ema-0000000096-0.100.safetensors", marker)
    one_line_exit_2(run_cli("-m", "stages.evaluate", "--params", str(params), "--models", str(models),
                            "--ref-cache", str(tmp_path / "ref")), "not a safetensors file")
    # The conversion command reads with weights_only=True too, and wants --trust.
    legacy = crafted(tmp_path / "legacy" / "phema-0000000032-0.050.pt", marker)
    one_line_exit_2(run_cli("-m", "pipeline", "convert", str(legacy.parent)), "--trust")
    one_line_exit_2(run_cli("-m", "pipeline", "convert", "--trust", str(legacy.parent)), "refused")
    assert not marker.exists(), "a crafted pickle was executed"


def test_old_pt_snapshots_convert_with_trust_then_reconstruct(tmp_path):
    new = tmp_path / "new"
    make_snapshots(new)
    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(new.iterdir()):                     # the earlier on-disk format: a pickled dict
        tensors, meta = pio.load_safetensors(f)
        torch.save({**meta, "state": tensors}, old / f.name.replace(".safetensors", ".pt"))
    with pytest.raises(Exception, match=r"python -m pipeline convert --trust"):
        reconstruct(old, [0.1])
    r = run_cli("-m", "pipeline", "convert", "--trust", str(old))
    assert r.returncode == 0, r.stderr
    assert len(list(old.glob("*.pt.orig"))) == 6 and not list(old.glob("*.pt"))
    a, b = reconstruct(old, [0.1], out_dir=tmp_path / "a"), reconstruct(new, [0.1], out_dir=tmp_path / "b")
    assert a["targets"][0]["coefficients"] == b["targets"][0]["coefficients"]
    ta, _ = pio.load_safetensors(tmp_path / "a" / a["targets"][0]["file"])
    tb, _ = pio.load_safetensors(tmp_path / "b" / b["targets"][0]["file"])
    assert all(torch.equal(ta[k], tb[k]) for k in tb)


def test_run_lock_refuses_a_second_writer_and_is_taken_over_after_a_kill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.io import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(pio.RunLockedError, match=rf"in use by pid {holder.pid} on "):
        pio.RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = pio.RunLock(tmp_path).acquire()              # the kernel dropped the dead holder's lock
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()


@pytest.mark.slow
def test_two_trainings_into_one_folder_then_kill_and_resume(tmp_path, fmnist):
    from mlflow.tracking import MlflowClient
    params = tiny_params(tmp_path, fmnist, train={"duration_nimg": 1024, "checkpoint_nimg": 64, "status_nimg": 16})
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--no-progress"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = run_cli("-m", "stages.train", "--params", str(params), "--no-progress")
    one_line_exit_2(second, f"in use by pid {first.pid}")
    first.send_signal(signal.SIGKILL)
    first.wait()
    r = run_cli("-m", "stages.train", "--params", str(params), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1024 and len(steps) == 1024 // 16
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    hist = MlflowClient(C.load_config(params).tracking.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == steps                 # every step exactly once


def test_disk_full_during_the_metrics_append_then_resume(tmp_path, fmnist, monkeypatch, capsys):
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False})
    metrics = tmp_path / "run" / "metrics.jsonl"
    calls = {"n": 0}
    real = pio._write

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] == 4:                              # the 4th line: half of it lands, then ENOSPC
            real(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(pio, "_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(C.load_config(params), TrainHooks(progress=False))
    text = metrics.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3       # cut back to whole lines
    monkeypatch.undo()
    # A torn last line from a kill (not a caught error) is dropped at resume, with a note.
    with open(metrics, "a") as f:
        f.write('{"step": 99999, "lo')
    res = train(C.load_config(params), TrainHooks(progress=False))
    assert res.status == "finished" and "dropped an unreadable last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(16, 129, 16))


def test_rerun_of_a_finished_run_changes_nothing_and_a_lost_summary_comes_back(tmp_path, fmnist):
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False})
    r = run_cli("-m", "stages.train", "--params", str(params), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    summary_file = tmp_path / "run" / "train_summary.json"
    first = json.loads(summary_file.read_text())
    assert first["final_loss"] is not None and first["images_per_s"] > 0
    ckpts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    again = run_cli("-m", "stages.train", "--params", str(params), "--no-progress", "-S", "train.status_nimg=32")
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert json.loads(summary_file.read_text()) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()} == ckpts
    summary_file.unlink()                               # a kill between the last checkpoint and the summary
    assert run_cli("-m", "stages.train", "--params", str(params), "--no-progress").returncode == 0
    rebuilt = json.loads(summary_file.read_text())
    assert rebuilt["final_loss"] == first["final_loss"] and rebuilt["nimg"] == first["nimg"]


@pytest.mark.slow
def test_tracking_server_down_for_part_of_a_run_then_resume_logs_every_step_once(tmp_path, fmnist):
    from chromium_helpers import served_mlflow
    from mlflow.tracking import MlflowClient
    import socket
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with socket.socket() as s:                          # the same address before and after the outage
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with served_mlflow(backend, port) as url:
        params = tiny_params(tmp_path, fmnist, tracking={"uri": url},
                             train={"duration_nimg": 160, "checkpoint_nimg": 32, "status_nimg": 16})
        res = train(C.load_config(params), TrainHooks(progress=False, max_steps=3))       # server up: steps 16..48
        assert res.status == "stopped"
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    res = train(C.load_config(params), TrainHooks(progress=False, max_steps=4))           # server down: jsonl only
    assert res.status == "stopped"
    with served_mlflow(backend, port) as url2:
        assert train(C.load_config(params), TrainHooks(progress=False)).status == "finished"
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        hist = MlflowClient(url2).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in hist) == steps == list(range(16, 161, 16))
        assert MlflowClient(url2).get_run(run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------
# Every listed bad input: exit 2, one line, nothing changed.

BAD_CONFIG = [
    (["-S", "network.channel_mult=[1,2"], "not valid YAML"),
    (["-S", "train.beta1=5"], "train.beta1=5: must be in [0, 1)"),
    (["-S", "loss.P_mean=.nan"], "loss.P_mean"),
    (["-S", "train.ref_lr=.inf"], "train.ref_lr"),
    (["-S", "loss.sigma_data=.inf"], "loss.sigma_data"),
    (["-S", "train.beta2=-0.1"], "train.beta2"),
]


@pytest.mark.parametrize("args,needle", BAD_CONFIG, ids=[a[1] for a, _ in BAD_CONFIG])
def test_bad_config_values_exit_2_in_one_line(tmp_path, args, needle):
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(ROOT / "params.yaml"), *args), needle)
    assert not (tmp_path / "run").exists()


def test_bad_files_and_environment_exit_2_in_one_line_and_change_nothing(tmp_path, fmnist):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  ref_lr: 0.01 \xff\xfe\n")
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(bad)), "not UTF-8")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: x\nsearch: {train.ref_lr: {grid: [0.1, 0.2}\n")
    one_line_exit_2(run_cli("-m", "pipeline", "sweep", str(sweep)), "not valid YAML at line")
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False})
    # a manifest that is JSON but lacks fields
    broken = tmp_path / "ds"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"format": "edm2-pipeline/encoded-dataset/1"}))
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(params), "-S", f"data.dataset_dir={tmp_path}",
                            "-S", f"train.run_dir={tmp_path / 'r2'}"), "manifest")
    # run_dir is a file
    (tmp_path / "afile").write_text("x")
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(params), "-S", f"train.run_dir={tmp_path / 'afile'}"),
                    "is a file")
    # tracking URIs that can never work
    env_bad = {**ENV, "MLFLOW_TRACKING_URI": "foo://bar"}
    r = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params), "-S", "tracking.enabled=true",
                        "-S", "tracking.uri=null", "-S", f"train.run_dir={tmp_path / 'r3'}"],
                       cwd=ROOT, env=env_bad, capture_output=True, text=True, timeout=300)
    one_line_exit_2(r, "unknown scheme 'foo'")
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(params), "-S", "tracking.enabled=true", "-S",
                            f"tracking.uri=sqlite:///{tmp_path}/no/such/dir/m.db", "-S", f"train.run_dir={tmp_path / 'r4'}"),
                    "does not exist")
    # a checkpoint with the right format tag but missing fields (the only one: nothing to fall back to)
    ck = tmp_path / "run" / "checkpoints" / "checkpoint-0000000032.pt"
    ck.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "nimg": 32}, ck)
    before = ck.read_bytes()
    one_line_exit_2(run_cli("-m", "stages.train", "--params", str(params), "--no-progress"), "lacks")
    assert ck.read_bytes() == before and not (tmp_path / "run" / "snapshots").exists()
    # reconstruct --batch-targets 0 (argparse: its own one-line usage error, exit 2)
    r = run_cli("-m", "stages.reconstruct", "--snapshots", str(tmp_path), "--targets", "0.1", "--batch-targets", "0",
                "--params", "none.yaml")
    assert r.returncode == 2 and "must be >= 1" in r.stderr and "Traceback" not in r.stderr
    # submit: a flag the local executor would ignore
    one_line_exit_2(run_cli("-m", "pipeline", "submit", "train", "--params", str(params), "--executor", "local",
                            "--partition", "gpu"), "--partition only apply to SLURM jobs")


def test_truncated_reference_cache_is_recomputed(tmp_path, fmnist, capsys):
    from pipeline.data.encoded import EncodedDataset
    from pipeline.fid import load_feature_net, reference_stats
    ds = EncodedDataset(fmnist["test"][0])
    feat = load_feature_net("fid-helper")
    first = reference_stats(ds, feat, 8, tmp_path, progress=False)
    path = Path(first["path"])
    path.write_bytes(path.read_bytes()[:200])
    again = reference_stats(ds, feat, 8, tmp_path, progress=False)
    assert "unreadable" in capsys.readouterr().out and not again["cached"]
    assert (again["mu"] == first["mu"]).all()
    assert reference_stats(ds, feat, 8, tmp_path, progress=False)["cached"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root (unshare -m)")
def test_read_only_output_folder_is_one_line(tmp_path):
    snaps = tmp_path / "s"
    make_snapshots(snaps)
    out = tmp_path / "ro"
    out.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespaces here: {probe.stderr.decode()[:200]}")
    cmd = (f"mount --bind -o ro {out} {out} && {sys.executable} -m stages.reconstruct --snapshots {snaps} "
           f"--targets 0.1 --out {out} --params none.yaml")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    one_line_exit_2(r, "not writable", str(out))
    assert list(out.iterdir()) == []
