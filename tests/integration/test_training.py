"""Training: DDP == one process, accumulation, exact resume after SIGKILL, MLflow steps once, bad input."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_close_states, assert_same_training, final_state, tiny_params
from pipeline import config as C
from pipeline.io import atomic_torch_save
from pipeline.batches import batch_indices
from pipeline.checkpoints import list_checkpoints
from pipeline.errors import TrainingError
from pipeline.training import TrainHooks, train

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_stage(params, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params), "--no-progress", *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_batch_indices_are_a_function_of_nimg():
    full = batch_indices(0, 64, 50, seed=3)
    assert sorted(full[:50].tolist()) == list(range(50))             # epoch 0 is a permutation
    assert (full[16:48] == batch_indices(16, 32, 50, seed=3)).all()  # any window of the same stream
    assert not (batch_indices(0, 50, 50, seed=4) == full[:50]).all()


@pytest.mark.slow
def test_two_gloo_processes_and_accumulation_equal_one_process(tmp_path, fmnist):
    # float32: the DDP arithmetic itself. (In bf16 autocast, the CPU default, convolutions pick their
    # blocking by batch shape, so 8 images per process round differently from 16: about 3e-4 relative.)
    fp32 = {"amp": "none"}
    one = tiny_params(tmp_path / "one", fmnist, tracking={"enabled": False}, train=fp32)
    two = tiny_params(tmp_path / "two", fmnist, tracking={"enabled": False}, train=fp32)
    acc = tiny_params(tmp_path / "acc", fmnist, tracking={"enabled": False}, train={"batch_gpu": 4, **fp32})
    r1 = run_stage(one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_stage(two, "--nproc-per-node", "2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    r3 = run_stage(acc)
    assert r3.returncode == 0, r3.stderr[-3000:]
    s1, s2, s3 = final_state(one), final_state(two), final_state(acc)
    assert s1["nimg"] == s2["nimg"] == s3["nimg"] == 128
    assert_close_states(s1["net"], s2["net"], "2 gloo processes vs 1")
    assert_close_states(s1["net"], s3["net"], "4-way accumulation vs 1")
    assert_close_states(s1["ema"]["emas"][1], s2["ema"]["emas"][1], "EMA 0.10, 2 processes vs 1")
    # and the comparison is not vacuous: training moved the weights
    assert not torch.allclose(s1["net"]["unet.out_gain"], torch.zeros([]))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, fmnist):
    from mlflow.tracking import MlflowClient
    common = dict(train={"duration_nimg": 192, "checkpoint_nimg": 32, "status_nimg": 16})
    ref = tiny_params(tmp_path / "ref", fmnist, **common)
    r = run_stage(ref)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tiny_params(tmp_path / "kill", fmnist, **common)
    run_dir = tmp_path / "kill" / "run"
    kill_at = random.Random(os.getpid()).randrange(3, 11) * 16       # a step between the checkpoints
    print(f"SIGKILL after nimg >= {kill_at}")
    p = subprocess.Popen([sys.executable, "-m", "stages.train", "--params", str(killed), "--no-progress"], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
        if len(lines) * 16 >= kill_at:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    first = final_state(killed)["mlflow_run_id"] if list_checkpoints(run_dir) else None
    r = run_stage(killed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout or first is None
    a, b = final_state(ref), final_state(killed)
    assert_same_training(a, b, "killed and resumed vs uninterrupted")
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) and torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])
               for i in oa)
    # One MLflow run across the kill, every metric step exactly once.
    assert first is None or b["mlflow_run_id"] == first
    client = MlflowClient(f"sqlite:///{tmp_path / 'kill' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("edm2").experiment_id])
    assert len(runs) == 1
    for key in ("loss", "lr", "images_per_s"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(16, 193, 16)), (key, steps)


def test_checkpoint_of_another_configuration_is_refused(tmp_path, fmnist):
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False}, train={"duration_nimg": 32})
    train(C.load_config(params), TrainHooks(progress=False))
    other = C.load_config(params, ["train.ref_lr=0.02", "loss.P_std=1.2"])
    with pytest.raises(TrainingError, match=r"loss.P_std: checkpoint 1.6, config 1.2; train.ref_lr: checkpoint 0.01"):
        train(other, TrainHooks(progress=False))
    # Extending the duration is not a different configuration: it resumes.
    longer = C.load_config(params, ["train.duration_nimg=48"])
    assert train(longer, TrainHooks(progress=False)).nimg == 48


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, fmnist, capsys):
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False}, train={"duration_nimg": 64})
    cfg = C.load_config(params)
    train(cfg, TrainHooks(progress=False, max_steps=4))                             # checkpoints at 32 and 64
    ckpts = list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["checkpoint-0000000032.pt", "checkpoint-0000000064.pt"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])              # truncated
    capsys.readouterr()
    res = train(C.load_config(params, ["train.duration_nimg=80"]), TrainHooks(progress=False))
    out = capsys.readouterr().out
    assert "checkpoint-0000000064.pt is unreadable" in out and "falling back" in out
    assert "resuming from" in out and "at nimg=32" in out and res.nimg == 80


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, fmnist):
    # sigma ~ e^60 overflows float32 in sigma^2: the loss is NaN on every step.
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False}, loss={"P_mean": 60.0, "P_std": 0.01},
                         train={"max_nonfinite_steps": 3})
    with pytest.raises(TrainingError, match="loss was non-finite for 3 consecutive steps"):
        train(C.load_config(params), TrainHooks(progress=False))


def test_dataset_manifest_mismatch_is_refused(tmp_path, fmnist):
    from pipeline.data.pixels import DataError
    params = tiny_params(tmp_path, fmnist, tracking={"enabled": False})
    cfg = C.load_config(params, ["data.channels=3"])
    with pytest.raises(DataError, match="data.channels: config 3, dataset 1"):
        train(cfg, TrainHooks(progress=False))


def test_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": 1}, target)

    def full(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"v": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["v"] == 1 and list(tmp_path.iterdir()) == [target]


def test_unreachable_tracking_server_warns_once_and_trains(tmp_path, fmnist, capsys):
    params = tiny_params(tmp_path, fmnist, tracking={"uri": "http://127.0.0.1:9"}, train={"duration_nimg": 48})
    t = time.time()
    res = train(C.load_config(params), TrainHooks(progress=False))
    err = capsys.readouterr().err
    assert res.status == "finished" and res.nimg == 48 and time.time() - t < 120
    assert err.count("MLflow logging off") == 1 and "unreachable" in err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_label_dropout_is_seeded_and_changes_training(tmp_path, fmnist):
    """train.label_dropout (method.md 5): labels zeroed with that probability, drawn from the seed and
    the image index, so the same config trains the same weights, and a different rate others."""
    states = {}
    for name, rate in (("a", 0.5), ("b", 0.5), ("c", 0.0)):
        params = tiny_params(tmp_path / name, fmnist, train={"label_dropout": rate, "duration_nimg": 64})
        assert train(C.load_config(params), TrainHooks(progress=False)).status == "finished"
        states[name] = final_state(params)["net"]
    for k in states["a"]:
        assert torch.equal(states["a"][k], states["b"][k]), k
    assert any(not torch.equal(states["a"][k], states["c"][k]) for k in states["a"])
    assert C.load_config(tiny_params(tmp_path / "d", fmnist, train={"label_dropout": 0.1})).run_key() != \
        C.load_config(tiny_params(tmp_path / "e", fmnist)).run_key()        # a different training: another run key


def test_nnodes_outside_torchrun_is_refused_with_the_recipe(tmp_path, fmnist):
    params = tiny_params(tmp_path, fmnist, launcher={"nnodes": 2}, tracking={"enabled": False})
    r = run_stage(params)
    assert r.returncode == 2 and "torchrun --nnodes 2" in r.stderr and "docs/scaling.md" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()     # before any work


def test_the_stop_line_prints_the_last_loss_before_any_status_line(tmp_path, fmnist, capsys):
    """Stopped before the first status window closes: the stop line gives the last step's loss, not None."""
    from pipeline.training import train
    params = tiny_params(tmp_path, fmnist, train={"status_nimg": 128})
    res = train(C.load_config(params), TrainHooks(progress=False, max_steps=1))
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("stopped at nimg=16/")]
    assert res.status == "stopped" and line and "loss None" not in line[0]
    assert f"last step's loss {round(res.final_loss, 4)}" in line[0], line
