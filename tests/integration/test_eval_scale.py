"""Issue #34: evaluation at the paper's scale. Reference statistics streamed (equal to the in-memory ones),
1, 2 and 3 evaluation processes giving the same records, a SIGKILLed evaluation resuming from its
shards to the identical record, shards never reused across a changed sampler, peak memory flat in
metrics.num_images, and `pipeline sample` streaming its .npz."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def project(tmp_path_factory, fmnist):
    """Params for a tiny evaluation (16 images in shards of 4, 64 reference images) and two random models."""
    from pipeline import config as C
    from pipeline.io import save_safetensors
    from pipeline.networks import build_network
    from pipeline.snapshots import RECONSTRUCTION_FORMAT
    d = tmp_path_factory.mktemp("evalscale")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = str(fmnist["train"][0].parent)
    raw["network"].update(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16],
                          channels_per_head=16)
    raw["sampler"].update(steps=2, batch_size=4)
    raw["metrics"].update(num_images=16, ref_num_images=64, batch_size=8, shard_images=4)
    raw["tracking"]["enabled"] = False
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = C.load_config(d / "params.yaml")
    torch.manual_seed(0)
    args = {"img_resolution": 32, "img_channels": 1, "label_dim": 10}
    for s in (0.05, 0.1):
        net = build_network(cfg, **args)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        save_safetensors(net.state_dict(), {"format": RECONSTRUCTION_FORMAT, "config": cfg.to_dict(), "net_args": args,
                                            "nimg": 128, "sigma_rel": s, "gamma": 1.0},
                         d / "models" / f"ema-0000000128-{s:.3f}.safetensors")
    return d


def evaluate(project, tag, *extra, popen=False, ref="shared"):
    """The evaluate stage on the project's two models; every call shares one reference cache (keyed by
    its settings: the reference statistics are computed once, as the DVC stage does)."""
    cmd = [sys.executable, "-m", "stages.evaluate", "--params", str(project / "params.yaml"), "--models",
           str(project / "models"), "--metrics", str(project / f"m-{tag}"), "--samples", str(project / f"s-{tag}"),
           "--shards", str(project / f"sh-{tag}"), "--ref-cache", str(project / f"ref-{ref}"), *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((project / f"m-{tag}" / "fid_records.json").read_text())


def test_streamed_reference_statistics_equal_the_in_memory_ones(fmnist, monkeypatch):
    from pipeline import fid
    from pipeline.data.encoded import EncodedDataset
    ds = EncodedDataset(fmnist["test"][0])
    net = fid.load_feature_net("auto", "cpu")
    feats = fid.array_features(ds.uint8_images(40), net, 8)
    mu, sigma = fid.statistics(feats)
    monkeypatch.setattr(fid, "REF_CHUNK_IMAGES", 16)          # three chunks: 16 + 16 + 8
    monkeypatch.setattr(fid, "REF_FEATURES_KEPT", 20)
    mu2, sigma2, kept = fid.streamed_statistics(ds, net, 40, 8)
    np.testing.assert_allclose(mu2, mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(kept, feats[:20].astype(np.float32))


@pytest.mark.slow
def test_one_two_and_three_processes_give_the_same_records(project):
    recs = {n: evaluate(project, f"p{n}", *(["--nproc-per-node", str(n)] if n > 1 else [])) for n in (1, 2, 3)}
    for n in (2, 3):
        for a, b in zip(recs[1], recs[n]):
            assert a["seeds"] == b["seeds"] == [0, 15] and a["num_images"] == b["num_images"] == 16
            assert a["model_file"] == b["model_file"] and a["sampler"] == b["sampler"]
            assert abs(a["fid"] - b["fid"]) <= 1e-6 * a["fid"], (n, a["fid"], b["fid"])   # float rounding only
            assert abs(a["kid"] - b["kid"]) <= 1e-6 * abs(a["kid"]) + 1e-9
    shards = sorted((project / "sh-p3").glob("*/shard-*.npz"))
    assert len(shards) == 2 * 4                              # 2 models x 16 images / 4 per shard, by 3 ranks
    assert (project / "s-p3" / "samples-ema-0000000128-0.050.png").is_file()


@pytest.mark.slow
def test_a_killed_evaluation_resumes_to_the_identical_record(project):
    whole = evaluate(project, "whole")
    p = evaluate(project, "killed", popen=True)
    shards = project / "sh-killed"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list(shards.glob("*/shard-*.npz"))) < 3:
        time.sleep(0.05)
    assert p.poll() is None, "the evaluation ended before it could be killed: " + (p.stdout.read() or "")[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(shards.glob("*/shard-*.npz")))
    assert 0 < done < 8 and not (project / "m-killed" / "fid_records.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in shards.glob("*/shard-*.npz")}
    again = evaluate(project, "killed")
    assert [r["fid"] for r in again] == [r["fid"] for r in whole]                  # bit for bit
    assert [r["metrics"] for r in again] == [r["metrics"] for r in whole]
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())              # finished shards were read
    assert not list(shards.glob("*/.*.tmp"))


@pytest.mark.slow
def test_a_changed_sampler_never_reuses_a_shard(project):
    evaluate(project, "keyed")
    before = {p.name for p in (project / "sh-keyed").iterdir()}
    evaluate(project, "keyed", "-S", "sampler.steps=3")
    after = {p.name for p in (project / "sh-keyed").iterdir()}
    assert len(before) == 2 and len(after) == 4 and before < after
    info = json.loads((project / "sh-keyed" / sorted(after - before)[0] / "computation.json").read_text())
    assert info["sampler"]["steps"] == 3


def _peak_rss_mb(project, tag, num_images):
    code = ("import resource, sys; from stages.evaluate import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--params", str(project / "params.yaml"), "--models",
                        str(project / "models"), "--metrics", str(project / f"m-{tag}"), "--samples",
                        str(project / f"s-{tag}"), "--shards", str(project / f"sh-{tag}"), "--ref-cache",
                        str(project / "ref-shared"), "-S", f"metrics.num_images={num_images}", "-S", "metrics.shard_images=16"],
                       cwd=project, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(project):
    _peak_rss_mb(project, "warm", 8)                         # the reference statistics cached (if no test did yet)
    small, large = _peak_rss_mb(project, "mem-a", 32), _peak_rss_mb(project, "mem-b", 128)
    print(f"peak RSS: 32 images {small:.0f} MB, 128 images {large:.0f} MB")
    assert large <= small * 1.10, (small, large)


def test_sample_npz_is_streamed_and_reads_as_savez(project, tmp_path):
    from pipeline import config as C
    from pipeline.generation import export_samples, generate
    from pipeline.generation import load_model
    cfg = C.load_config(project / "params.yaml")
    model = project / "models" / "ema-0000000128-0.050.safetensors"
    out = export_samples(model, 6, tmp_path / "x.npz", cfg.sampler, seed=3, batch_size=4, progress=False, cfg=cfg)
    with np.load(out, allow_pickle=False) as z:
        assert z["images"].shape == (6, 32, 32, 1) and list(z["seeds"]) == list(range(3, 9))
        want = generate(load_model(model)[0], 6, 3, cfg.sampler, 6)
        np.testing.assert_array_equal(z["images"], want)
        assert list(z["labels"]) == [s % 10 for s in range(3, 9)]


# ----------------------------------------------------------------------------------------------
# The paper's protocol: legacy features, NVIDIA's reference statistics.

def test_tf1_resize_is_tensorflow_1s_definition():
    """The legacy resize against TensorFlow 1's resize_bilinear stated directly (output pixel j reads the
    input at j * in / out, bilinear, the far edge clamped), in float64: equal to float32 rounding."""
    from pipeline.fid import tf1_resize_bilinear

    def tf1(x, size=299):
        def axis(n_in):
            src = np.arange(size) * (n_in / size)
            i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
            return i0, np.minimum(i0 + 1, n_in - 1), src - i0
        (h0, h1, wh), (w0, w1, ww) = axis(x.shape[2]), axis(x.shape[3])
        rows = x[:, :, h0] * (1 - wh)[:, None] + x[:, :, h1] * wh[:, None]
        return rows[:, :, :, w0] * (1 - ww) + rows[:, :, :, w1] * ww
    for h, w in ((32, 32), (512, 384), (64, 300)):
        x = torch.rand(2, 3, h, w) * 255
        np.testing.assert_allclose(tf1_resize_bilinear(x).double().numpy(), tf1(x.double().numpy()), atol=2e-2)


@pytest.mark.skipif(not Path("/tmp/inception-2015-12-05.pt").is_file(),
                    reason="clean-fid's copy of NVIDIA's inception-2015-12-05 detector is not on disk (no network here)")
def test_fid_helper_carries_the_detectors_weights():
    import warnings

    from pipeline.fid import fid_helper_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = torch.jit.load(str(fid_helper_weights())).net.layers.state_dict()
        theirs = torch.jit.load("/tmp/inception-2015-12-05.pt").layers.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _nvidia_refs(path, d=2048, seed=0, crafted=False):
    """dataset-refs/<name>.pkl as calculate_metrics.py writes it: a pickled {metric: {mu, sigma}}."""
    import pickle
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / d
    doc = {"fid": {"mu": rng.normal(size=d), "sigma": a @ a.T + np.eye(d) * 0.01}}
    if crafted:
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {path}.RAN",))
        doc["fid"]["extra"] = Payload()
    path.write_bytes(pickle.dumps(doc))
    return doc


@pytest.mark.slow
def test_nvidias_reference_statistics_and_the_legacy_protocol(project, tmp_path):
    from pipeline import config as C
    from pipeline.fid import FIDError, frechet_distance
    refs = tmp_path / "dataset-refs"
    refs.mkdir()
    doc = _nvidia_refs(refs / "img512.pkl")
    np.savez(refs / "edm.npz", mu=doc["fid"]["mu"], sigma=doc["fid"]["sigma"])
    legacy = ["-S", "metrics.mode=legacy", "-S", "metrics.names=[fid]"]        # published files hold no images
    recs = evaluate(project, "nvref", "-S", f"metrics.reference={refs / 'img512.pkl'}", *legacy)
    npz = evaluate(project, "edmref", "-S", f"metrics.reference={refs / 'edm.npz'}", *legacy)
    for r, name in ((recs[0], "img512.pkl"), (npz[0], "edm.npz")):
        assert r["reference"] == name and r["mode"] == "legacy" and r["ref_num_images"] == 0 and r["kid"] is None
        assert len(r["reference_sha256"]) == 64
    assert [r["fid"] for r in recs] == pytest.approx([r["fid"] for r in npz], rel=1e-12)
    # the legacy features themselves: the stored shards hold them; FID from them and the file's mu/sigma
    shard = sorted((project / "sh-nvref").glob("*/shard-*.npz"))
    assert shard and recs[0]["fid"] > 0
    clean = evaluate(project, "cleanref")
    assert clean[0]["mode"] == "clean" and abs(clean[0]["fid"] - recs[0]["fid"]) > 1e-3
    # a clean run against NVIDIA's file, a crafted file, a missing file: one line each, nothing run
    bad = _nvidia_refs(refs / "crafted.pkl", crafted=True)
    for over, needle in ((["-S", f"metrics.reference={refs / 'img512.pkl'}", "-S", "metrics.names=[fid]"],
                          "set metrics.mode=legacy"),
                         (["-S", f"metrics.reference={refs / 'img512.pkl'}", "-S", "metrics.mode=legacy"],
                          "precision_recall, which needs the reference images"),
                         (["-S", f"metrics.reference={refs / 'crafted.pkl'}", *legacy], "posix.system"),
                         (["-S", f"metrics.reference={refs / 'absent.pkl'}", *legacy],
                          "nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs")):
        r = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(project / "params.yaml"),
                            "--models", str(project / "models"), "--metrics", str(tmp_path / "m"), "--shards",
                            str(tmp_path / "sh"), "--samples", str(tmp_path / "s"), *over],
                           cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
        err = [x for x in r.stderr.splitlines() if x.strip() and "%|" not in x]
        assert r.returncode == 2 and len(err) == 1 and needle in err[0], r.stderr
    assert not (refs / "crafted.pkl.RAN").exists() and bad
    # the img512 presets resolve the paper's protocol
    cfg = C.resolve({"preset": "img512-xs"})
    assert (cfg.metrics.num_images, cfg.metrics.seed_sets, cfg.metrics.mode, cfg.sampler.steps) == (50000, 3, "legacy", 32)
    assert cfg.metrics.reference == "dataset-refs/img512.pkl"
    with pytest.raises(FIDError, match="symmetric"):
        from pipeline.fid import read_reference_file
        d = _nvidia_refs(refs / "asym.pkl", d=4)
        d["fid"]["sigma"][0, 1] += 1
        import pickle
        (refs / "asym.pkl").write_bytes(pickle.dumps(d))
        read_reference_file(refs / "asym.pkl", "inception")
    assert frechet_distance(doc["fid"]["mu"], doc["fid"]["sigma"], doc["fid"]["mu"], doc["fid"]["sigma"]) < 1e-6


@pytest.mark.slow
def test_submit_evaluate_runs_the_stage_as_a_job(project):
    """`python -m pipeline submit evaluate` (submitit's local executor here; SLURM in docs/gpu-cluster.md) runs the
    evaluate stage with its flags after --; its records equal the stage run directly."""
    direct = evaluate(project, "direct")
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "evaluate", "--params", str(project / "params.yaml"),
                        "--executor", "local", "--wait", "--folder", str(project / "jobs"), "--",
                        "--models", str(project / "models"), "--metrics", str(project / "m-job"), "--samples",
                        str(project / "s-job"), "--shards", str(project / "sh-job"), "--ref-cache",
                        str(project / "ref-shared")], cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    job = json.loads((project / "m-job" / "fid_records.json").read_text())
    assert [x["fid"] for x in job] == [x["fid"] for x in direct]


@pytest.mark.slow
def test_reference_stage_memory_does_not_grow_with_its_images(project):
    """The reference statistics stream (a batch of pixels at a time, running sums): peak RSS of the
    reference stage for 64 and 160 reference images within 3/4 of what the 96 more images held at the
    detector's 299 x 299 x 3 in float32 would add (98 MiB; the old bound, 10 % of the stage's RSS, was
    about the same). Measured differences: 0 to 18 MiB. 32 images peaked 50 MiB lower than 128, not yet
    the stage's steady state, so the small run has 64."""
    def peak(n):
        code = ("import resource, sys; from stages.reference import main; rc = main(sys.argv[1:]); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
        r = subprocess.run([sys.executable, "-c", code, "--params", str(project / "params.yaml"), "--out",
                            str(project / f"refmem-{n}"), "-S", f"metrics.ref_num_images={n}", "-S", "metrics.names=[fid]"],
                           cwd=project, env=ENV, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.split("PEAK")[-1])
    small, large = peak(64), peak(160)
    held = 96 * 299 * 299 * 3 * 4 / 2 ** 20
    print(f"reference peak RSS: 64 images {small:.0f} MB, 160 images {large:.0f} MB (holding the 96 more: +{held:.0f} MiB)")
    assert large - small < held * 0.75, (small, large)
