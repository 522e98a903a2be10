"""method.md 6: power-function EMA tracking, snapshots and post-hoc reconstruction."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import config as C
from pipeline import phema, reconstruction, snapshots
from pipeline.config import loss_config
from pipeline.edm import edm2_loss
from pipeline.io import read_safetensors_header
from pipeline.networks import Precond
from pipeline.phema import (PHEMAError, PowerFunctionEMA, gamma_to_sigma_rel, sigma_rel_to_gamma, snapshot_meta,
                            snapshot_name, solve_weights)
from pipeline.reconstruction import reconstruct
from pipeline.snapshots import load_reconstruction
from stages.reconstruct import main as reconstruct_cli

REFERENCE = [(0.010, 96.994898), (0.050, 16.972199), (0.100, 6.937204), (0.150, 3.557869), (0.250, 0.719824)]


@pytest.mark.parametrize("sigma_rel, gamma", REFERENCE)
def test_sigma_rel_gamma_reference_values_and_round_trip(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=1e-5)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, abs=1e-5)
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, abs=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.31])
def test_sigma_rel_out_of_range(bad):
    with pytest.raises(PHEMAError, match=r"must be in \(0, 0.2887\)"):
        sigma_rel_to_gamma(bad)


def test_golden_example():
    t, g = [], []
    for i in range(1, 9):
        for s in (0.05, 0.10):
            t.append(i)
            g.append(sigma_rel_to_gamma(s))
    sol = solve_weights(t, g, [8], [sigma_rel_to_gamma(0.15)])
    X = sol.X[:, 0]
    assert X.sum() == pytest.approx(1.0, abs=1e-12)
    assert X[-1] == pytest.approx(0.940654, abs=1e-5)
    assert X[-2] == pytest.approx(-0.173043, abs=1e-5)


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros([], dtype=torch.float64))


def _drive(batch, updates, every=1, sigma_rel=(0.05, 0.10, 0.2), naive=False):
    """theta = nimg after every step; the EMA is updated every `every` steps."""
    net = Scalar()
    ema = PowerFunctionEMA(net, sigma_rel)
    nimg = 0
    for step in range(1, updates * every + 1):
        nimg += batch
        net.theta.data.fill_(float(nimg))
        if step % every == 0:
            ema.update(net, nimg, batch if naive else batch * every)
    return nimg, [e["theta"].item() for e in ema.emas], ema.gammas


@pytest.mark.parametrize("batch, every", [(1, 1), (7, 1), (64, 1), (7, 5), (64, 3)])
def test_tracked_average_is_the_power_function_profile(batch, every):
    T, values, gammas = _drive(batch, 2000, every)
    for v, g in zip(values, gammas):
        closed_form = (g + 1) / (g + 2) * T          # mean of tau under p_T(tau)
        assert v == pytest.approx(closed_form, rel=1e-3)


def test_step_counter_rule_tracks_the_wrong_profile():
    # The rule method.md warns against: dt = one batch while updating every k steps.
    T, values, gammas = _drive(64, 2000, every=5, naive=True)
    errors = [abs(v / ((g + 1) / (g + 2) * T) - 1) for v, g in zip(values, gammas)]
    assert max(errors) > 1e-2


def test_reconstruction_equals_direct_tracking(tmp_path):
    torch.manual_seed(0)
    net = Precond(8, 1, 0, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                  channels_per_head=16)
    data = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))
    snaps = PowerFunctionEMA(net, [0.05, 0.10])
    direct = PowerFunctionEMA(net, [0.15])
    batch, steps, every = 16, 300, 10
    g = torch.Generator().manual_seed(2)
    for step in range(1, steps + 1):
        idx = torch.randint(0, 64, (batch,), generator=g)
        loss, _ = edm2_loss(net, data[idx], None, loss_config(), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nimg = step * batch
        snaps.update(net, nimg, batch)
        direct.update(net, nimg, batch)
        if step % every == 0:
            snaps.save_snapshots(tmp_path / "snaps", nimg, {"model_key": "k", "snapshot_nimg": every * batch})
    summary = reconstruct(tmp_path / "snaps", [0.15], out_dir=tmp_path / "out")
    rec = load_reconstruction(tmp_path / "out" / summary["targets"][0]["file"])["state"]
    keys = [k for k, v in direct.emas[0].items() if v.is_floating_point() and k in dict(net.named_parameters())]
    flat = lambda state: torch.cat([state[k].flatten().float() for k in keys])  # noqa: E731
    ref = flat(direct.emas[0])
    rel = (flat(rec) - ref).norm() / ref.norm()
    spread = (flat(snaps.emas[1]) - ref).norm() / ref.norm()    # tracked 0.10 vs direct 0.15
    print(f"reconstruction rel L2 error {rel:.2e}; 0.10-vs-0.15 difference {spread:.2e}")
    assert rel < 1e-2
    assert spread > 5 * rel, "the profiles barely differ: the comparison would prove nothing"


def make_snapshots(d, times=8, interval=100, lr=0.01, width=64):
    cfg = C.resolve({}, {"ema.snapshot_nimg": interval, "train.ref_lr": lr, "train.batch_size": 4})
    net = torch.nn.Linear(width, width)
    ema = PowerFunctionEMA(net, cfg.ema.stds)
    for i in range(1, times + 1):
        with torch.no_grad():
            net.weight.add_(0.1)
        ema.update(net, i * interval, interval)
        ema.save_snapshots(d, i * interval, snapshot_meta(cfg))
    return cfg


def test_stream_combine_equals_an_in_memory_sum(tmp_path):
    """Reading snapshots chunk by chunk at the byte ranges of their safetensors headers gives
    sum_i X_ij theta_i, across group and chunk boundaries."""
    make_snapshots(tmp_path / "s")
    infos = snapshots.scan_snapshots(tmp_path / "s")
    X = np.random.default_rng(0).normal(size=(len(infos), 3))
    states = [load_file(i.path) for i in infos]
    for group, chunk in ((3, 1000), (None, 1 << 16)):
        got = reconstruction.stream_combine(infos, X, group=group, chunk_elems=chunk)
        for j in range(X.shape[1]):
            for key in ("weight", "bias"):
                want = sum(X[i, j] * s[key].double() for i, s in enumerate(states))
                torch.testing.assert_close(got.state(j)[key].double(), want, rtol=1e-5, atol=1e-5)


def test_stage_writes_models_json_figure_and_skips_up_to_date(tmp_path, capsys):
    make_snapshots(tmp_path / "s")
    out = tmp_path / "out"
    args = ["--params", str(tmp_path / "none.yaml"), "--snapshots", str(tmp_path / "s"), "--out", str(out),
            "--targets", "0.05", "0.12", "0.2"]
    assert reconstruct_cli(args) == 0
    summary = json.loads((out / "reconstruct.json").read_text())
    assert [t["file"] for t in summary["targets"]] == ["ema-0000000800-0.050.safetensors",
                                                       "ema-0000000800-0.120.safetensors",
                                                       "ema-0000000800-0.200.safetensors"]
    for t in summary["targets"]:
        assert sum(t["coefficients"]) == pytest.approx(1.0)
        assert (out / t["file"]).is_file() and not t["skipped"]
    assert (out / "ema_profiles.png").stat().st_size > 10_000
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("ema-*.safetensors")}
    capsys.readouterr()
    assert reconstruct_cli(args) == 0
    assert "skipped (up to date)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("ema-*.safetensors")} == mtimes
    # New snapshots -> the reconstruction at the new last time is made afresh.
    assert reconstruct(tmp_path / "s", [0.05], target_nimg=400, out_dir=out)["target_nimg"] == 400


def test_targets_at_several_times_in_one_pass_equal_separate_reconstructions(tmp_path, monkeypatch):
    """An autoguidance guide (an earlier time, a shorter EMA) and the main models come from one
    streaming pass; each equals its own reconstruction, which uses only the snapshots up to its time."""
    make_snapshots(tmp_path / "s")
    passes = []
    real = reconstruction.stream_combine
    monkeypatch.setattr(reconstruction, "stream_combine", lambda *a, **k: passes.append(1) or real(*a, **k))
    both = reconstruct(tmp_path / "s", [(400, 0.05), 0.10, 0.15], out_dir=tmp_path / "one")
    assert len(passes) == 1
    assert [t["file"] for t in both["targets"]] == ["ema-0000000400-0.050.safetensors",
                                                    "ema-0000000800-0.100.safetensors",
                                                    "ema-0000000800-0.150.safetensors"]
    early = both["targets"][0]
    assert all(c == 0 for c, s in zip(early["coefficients"], both["snapshots"]) if s["nimg"] > 400)
    alone = reconstruct(tmp_path / "s", [0.05], target_nimg=400, out_dir=tmp_path / "alone")
    a = load_reconstruction(tmp_path / "one" / early["file"])
    b = load_reconstruction(tmp_path / "alone" / alone["targets"][0]["file"])
    for key in ("weight", "bias"):
        torch.testing.assert_close(a["state"][key], b["state"][key], rtol=1e-6, atol=1e-6)
    assert a["nimg"] == 400 and a["sources_digest"] == b["sources_digest"]
    with pytest.raises(phema.PHEMAError, match="nimg=450 has no snapshot"):
        reconstruct(tmp_path / "s", [(450, 0.05)])


def test_reconstruct_at_a_snapshot_reproduces_it(tmp_path):
    make_snapshots(tmp_path / "s")
    summary = reconstruct(tmp_path / "s", [0.10], target_nimg=500, out_dir=tmp_path / "o")
    rec = load_reconstruction(tmp_path / "o" / summary["targets"][0]["file"])["state"]
    snap = load_file(tmp_path / "s" / snapshot_name(500, 0.10))
    assert torch.allclose(rec["weight"], snap["weight"].float(), atol=1e-5)
    assert summary["targets"][0]["rel_error"] < 1e-6
    # Snapshots and reconstructions describe themselves: resolved config, run key, git revision.
    for f in (tmp_path / "s" / snapshot_name(500, 0.10), tmp_path / "o" / summary["targets"][0]["file"]):
        _, data = read_safetensors_header(f)
        assert data["config"]["ema"]["snapshot_nimg"] == 100 and data["model_key"] and data["git"]
    assert load_file(tmp_path / "s" / snapshot_name(500, 0.10))["weight"].dtype == torch.float16


def test_ill_conditioned_target_warns(tmp_path):
    make_snapshots(tmp_path / "s")
    summary = reconstruct(tmp_path / "s", [0.01, 0.15])
    assert any("0.010 is ill-conditioned" in w for w in summary["warnings"])
    assert not any("0.150" in w for w in summary["warnings"])


def _assert_fails_and_keeps(out, fn, match):
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    with pytest.raises(PHEMAError, match=match):
        fn()
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    assert after == before, "a failed call must not touch existing outputs"


def test_bad_input_clear_errors_nothing_overwritten(tmp_path):
    s, out = tmp_path / "s", tmp_path / "out"
    make_snapshots(s)
    reconstruct(s, [0.05, 0.10], out_dir=out)
    _assert_fails_and_keeps(out, lambda: reconstruct(s, [0.05, 0.31], out_dir=out), r"targets\[1\]=0.31")
    _assert_fails_and_keeps(out, lambda: reconstruct(s, [0.1], target_nimg=450, out_dir=out),
                            "target time nimg=450 has no snapshot")
    (tmp_path / "empty").mkdir()
    _assert_fails_and_keeps(out, lambda: reconstruct(tmp_path / "empty", [0.1], out_dir=out), "holds no snapshots")
    # Missing file: one profile gone at one time.
    (s / snapshot_name(300, 0.10)).rename(tmp_path / "aside.safetensors")
    _assert_fails_and_keeps(out, lambda: reconstruct(s, [0.1], out_dir=out), "missing at nimg=300 for sigma_rel 0.100")
    # A whole time gone.
    (s / snapshot_name(300, 0.05)).unlink()
    _assert_fails_and_keeps(out, lambda: reconstruct(s, [0.1], out_dir=out), "snapshots missing for nimg 300")
    (tmp_path / "aside.safetensors").rename(s / snapshot_name(300, 0.10))
    make_snapshots(tmp_path / "other", lr=0.02)       # another run configuration
    (tmp_path / "other" / snapshot_name(300, 0.05)).rename(s / snapshot_name(300, 0.05))
    _assert_fails_and_keeps(out, lambda: reconstruct(s, [0.1], out_dir=out), "mixed configurations")
    # Corrupt (truncated) file.
    make_snapshots(tmp_path / "c")
    f = tmp_path / "c" / snapshot_name(200, 0.05)
    f.write_bytes(f.read_bytes()[:100])
    _assert_fails_and_keeps(out, lambda: reconstruct(tmp_path / "c", [0.1], out_dir=out), "not a safetensors file")
    f.write_bytes((tmp_path / "s" / snapshot_name(200, 0.05)).read_bytes()[:-10])   # header intact, data cut short
    _assert_fails_and_keeps(out, lambda: reconstruct(tmp_path / "c", [0.1], out_dir=out), "is truncated")
