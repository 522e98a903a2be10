"""FID (method.md 8): clean-fid features, eigen-route Frechet distance, reference cache, generation, records."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config as C
from unit.test_gpu import DEVICES
from pipeline.data.encoded import EncodedDataset
from pipeline.generation import generate
from pipeline.records import RecordError, check_comparable
from pipeline.fid import (CLEANFID_WEIGHTS, FIDError, array_features, fid_from_features,
                          folder_features, frechet_distance, load_feature_net, reference_stats, statistics)


@pytest.fixture(scope="module")
def feat():
    return load_feature_net("auto")


def _to_folder(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(folder / f"{i:05d}.png")
    return folder


def test_auto_feature_net_is_offline_inception(feat):
    expected = "clean-fid" if CLEANFID_WEIGHTS.is_file() else "fid-helper"
    assert feat.name == expected and len(feat.sha256) == 64
    out = feat.fn(torch.zeros(1, 3, 299, 299))
    assert out.shape == (1, 2048)


def test_eigen_route_equals_scipy_sqrtm():
    from cleanfid.fid import frechet_distance as cleanfid_fd      # scipy.linalg.sqrtm inside
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 256)), rng.normal(size=(600, 256)) @ rng.normal(size=(256, 256)) * 0.2
    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b + 0.3)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), cleanfid_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, abs=1e-3, rel=1e-9)


@pytest.mark.slow
def test_project_fid_equals_cleanfid_compute_fid(fmnist, feat, tmp_path):
    from cleanfid import fid as cfid
    a = EncodedDataset(fmnist["train"][0]).uint8_images(40)
    b = EncodedDataset(fmnist["test"][0]).uint8_images(40)
    fa, fb = _to_folder(a, tmp_path / "a"), _to_folder(b, tmp_path / "b")
    feats_a, feats_b = folder_features(fa, feat), folder_features(fb, feat)
    ours = frechet_distance(*statistics(feats_a), *statistics(feats_b))
    theirs = cfid.compute_fid(str(fa), str(fb), mode="clean", custom_feat_extractor=feat.fn, num_workers=0,
                              batch_size=32, device=torch.device("cpu"), verbose=False)
    print(f"FID 40 vs 40: project {ours:.6f}, clean-fid {theirs:.6f}")
    assert ours == pytest.approx(theirs, abs=1e-3)
    # The array path (used for generated images) equals clean-fid's folder loader on the same images.
    assert np.allclose(array_features(a, feat), feats_a, atol=1e-4)


@pytest.mark.slow
def test_fid_sanity_on_real_data(fmnist, feat):
    from sklearn.datasets import load_digits
    n = 100
    train = array_features(EncodedDataset(fmnist["train"][0]).uint8_images(n), feat)
    test = array_features(EncodedDataset(fmnist["test"][0]).uint8_images(n), feat)
    digits = load_digits().images[:n]                                   # 8x8, values 0..16
    digits = np.kron((digits * 255 / 16).round().astype(np.uint8), np.ones((4, 4), np.uint8))[..., None]
    other = array_features(digits, feat)
    same = frechet_distance(*statistics(train), *statistics(train))
    near = frechet_distance(*statistics(train), *statistics(test))
    far = frechet_distance(*statistics(train), *statistics(other))
    print(f"FID(A, A) {same:.2e}, FID(train, test) {near:.1f}, FID(fashion, digits) {far:.1f} (n={n})")
    assert abs(same) < 1e-3
    assert far > 3 * near


def test_generation_does_not_depend_on_batch_size():
    from pipeline.networks import Precond
    torch.manual_seed(0)
    net = Precond(8, 1, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                  channels_per_head=16)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    s = C.resolve({}).sampler.model_copy(update={"steps": 4})
    a = generate(net, 5, 100, s, batch_size=5)
    b = generate(net, 5, 100, s, batch_size=2)
    c = generate(net, 5, 101, s, batch_size=5)
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b), "images must not depend on the sampler batch size"
    assert np.array_equal(a[1:], c[:4]) and not np.array_equal(a, c)


def test_generation_halves_the_batch_when_the_gpu_runs_out_of_memory(monkeypatch, capsys):
    """Batches as large as memory allows: an out-of-memory batch is retried at half the size, with the
    same images (per-image seeds). The OOM is simulated here; the CUDA path itself runs in gpu_check."""
    import pipeline.edm as edm
    from pipeline.networks import Precond
    torch.manual_seed(0)
    net = Precond(8, 1, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                  channels_per_head=16)
    s = C.resolve({}).sampler.model_copy(update={"steps": 3})
    want = generate(net, 6, 0, s, batch_size=6)
    real, sizes = edm.sample_images, []

    def small_memory(net_, seeds, *a, **k):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(net_, seeds, *a, **k)
    monkeypatch.setattr(edm, "sample_images", small_memory)
    got = generate(net, 6, 0, s, batch_size=8)
    assert np.array_equal(got, want) and sizes == [6, 4, 2, 2, 2]                 # 8 -> 4 -> 2 images per batch
    assert "sampling 2 images per batch" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare for a network namespace")
def test_offline_inception_with_networking_disabled(tmp_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    script = ("import socket, numpy as np\n"
              "from pipeline.fid import load_feature_net, array_features\n"
              "try:\n    socket.create_connection(('pypi.org', 443), timeout=3); print('ONLINE')\n"
              "except OSError:\n    print('OFFLINE')\n"
              "f = load_feature_net('auto')\n"
              "x = array_features(np.full((2, 32, 32, 1), 128, np.uint8), f)\n"
              "print(f.name, x.shape)\n")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OFFLINE" in r.stdout and "(2, 2048)" in r.stdout


def test_reference_cache_records_and_comparability(fmnist, feat, tmp_path):
    ds = EncodedDataset(fmnist["test"][0])
    r1 = reference_stats(ds, feat, 6, tmp_path, progress=False)
    r2 = reference_stats(ds, feat, 6, tmp_path, progress=False)
    assert not r1["cached"] and r2["cached"] and np.array_equal(r1["sigma"], r2["sigma"])
    r3 = reference_stats(ds, feat, 7, tmp_path, progress=False)
    assert r3["key"] != r1["key"] and len(list(tmp_path.glob("ref-*.npz"))) == 2
    with pytest.raises(FIDError, match="only 3 generated images, 5 asked"):
        fid_from_features(np.zeros((3, 2048)), r1, asked=5)
    rec = {"feature_net": "fid-helper", "feature_net_sha256": "x", "mode": "clean", "num_images": 100,
           "reference": "r", "ref_num_images": 10, "sampler": {"nfe": 35}}
    check_comparable([rec, dict(rec)])
    with pytest.raises(RecordError, match="num_images: 100 vs 50"):
        check_comparable([rec, {**rec, "num_images": 50}])


@pytest.mark.slow
def _params_and_models(fmnist, tmp_path, root, **fid):
    """A shrunken params.yaml and two reconstructed models of an untrained network."""
    import yaml

    from pipeline.networks import build_network
    from pipeline.phema import PowerFunctionEMA, snapshot_meta
    from pipeline.reconstruction import reconstruct
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = str(fmnist["train"][0].parent)
    raw["metrics"].update({"num_images": 4, "ref_num_images": 8, "batch_size": 8, **fid})
    raw["sampler"].update({"steps": 4, "batch_size": 4})
    params = tmp_path / "params.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    params.write_text(yaml.safe_dump(raw))
    cfg = C.load_config(params)
    torch.manual_seed(0)
    net = build_network(cfg, 32, 1, 10)
    ema = PowerFunctionEMA(net, cfg.ema.stds)
    for i in (1, 2):
        with torch.no_grad():                       # the weights move: the EMA lengths give different models
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ema.update(net, i * cfg.ema.snapshot_nimg, cfg.ema.snapshot_nimg)
        ema.save_snapshots(tmp_path / "snaps", i * cfg.ema.snapshot_nimg,
                           snapshot_meta(cfg, {"img_resolution": 32, "img_channels": 1, "label_dim": 10}))
    reconstruct(tmp_path / "snaps", [0.05, 0.1], out_dir=tmp_path / "models")
    return params


def test_reference_and_evaluate_stages_end_to_end(fmnist, tmp_path, root):
    from stages.evaluate import main as evaluate_main
    from stages.reference import main as reference_main

    params = _params_and_models(fmnist, tmp_path, root)
    ref = ["--params", str(params), "--out", str(tmp_path / "ref")]
    assert reference_main(ref) == 0 and len(list((tmp_path / "ref").glob("ref-*.npz"))) == 1
    assert evaluate_main(["--params", str(params), "--models", str(tmp_path / "models"), "--ref-cache",
                          str(tmp_path / "ref"), "--metrics", str(tmp_path / "metrics"),
                          "--samples", str(tmp_path / "samples")]) == 0
    metrics = json.loads((tmp_path / "metrics/fid_points.json").read_text())
    assert set(metrics["fid"]) == {"ema_0.050", "ema_0.100"} and metrics["num_images"] == 4
    head = json.loads((tmp_path / "metrics/fid.json").read_text())
    assert head["fid"] == round(metrics["best_fid"], 2) and head["sigma_rel"] == metrics["best_sigma_rel"]
    assert (tmp_path / "metrics/fid_vs_ema.csv").read_text().splitlines()[0] == "sigma_rel,fid,fid_lo,fid_hi,kid,guidance,guide,steps"
    assert metrics["best_fid_se"] > 0 and metrics["best_sigma_rel"] in (0.05, 0.1) and "tied_with_best" in metrics
    records = json.loads((tmp_path / "metrics/fid_records.json").read_text())
    for r in records:
        assert r["fid"] > 0 and r["ref_num_images"] == 8 and r["sampler"]["nfe"] == 7 and r["seeds"] == [0, 3]
        assert r["fid_ci95"][0] <= r["fid"] + 1e-6 or r["fid_se"] > 0          # interval and KID on every record
        assert r["kid"] is not None and r["kid_std"] >= 0 and len(r["bootstrap"]["replicates"]) == 200
        assert r["bootstrap"]["reference"] == "held fixed" and r["eval_key"]
        assert r["feature_net_sha256"] and r["reference_sha256"] == fmnist["test"][1]["sha256"]
    assert len(list((tmp_path / "samples").glob("samples-ema-*.png"))) == 2
    # No models: a clear error.
    assert evaluate_main(["--params", str(params), "--models", str(tmp_path / "none")]) == 2


def test_seed_sets_paper_protocol_beside_ours(fmnist, tmp_path, root):
    """metrics.seed_sets: K disjoint seed sets, every value recorded; the record's FID is their mean (with the
    standard error of the mean), fid_min the minimum (EDM/EDM2's reporting); set k is exactly the
    single-set evaluation at seed metrics.seed + k * num_images; other protocols are never compared."""
    from pipeline.metrics import references
    from pipeline.evaluate import evaluate_models
    from pipeline.records import RecordError, check_comparable, result_line
    params = _params_and_models(fmnist, tmp_path, root)
    model = sorted((tmp_path / "models").glob("ema-*.safetensors"))[:1]
    cfg = C.load_config(params, ["metrics.seed_sets=2"])
    refs = references(cfg, "cpu", tmp_path / "ref", progress=False)
    [rec] = [r.to_dict() for r in evaluate_models(model, cfg, refs, progress=False, log=None)]
    assert rec["seed_sets"] == 2 and len(rec["fid_sets"]) == 2 and rec["seeds"] == [0, 7]
    assert rec["fid"] == pytest.approx(sum(rec["fid_sets"]) / 2) and rec["fid_min"] == min(rec["fid_sets"])
    assert len(rec["bootstrap"]["replicates"]) == 200 and rec["fid_se"] > 0
    assert "min" in result_line(rec) and "2 seed sets" in result_line(rec)
    second = C.load_config(params, ["metrics.seed=4"])                       # set 2 alone: seeds 4..7
    [one] = [r.to_dict() for r in evaluate_models(model, second, refs, progress=False, log=None)]
    assert one["fid"] == pytest.approx(rec["fid_sets"][1], rel=1e-9) and one["seed_sets"] == 1
    with pytest.raises(RecordError, match="seed_sets"):
        check_comparable([rec, {**one, "seeds": rec["seeds"]}])


@pytest.mark.parametrize("device", DEVICES)
def test_reference_and_evaluate_stages_take_the_device_from_params(fmnist, tmp_path, root, device, capsys):
    from stages.evaluate import main as evaluate_main
    from stages.reference import main as reference_main
    params = _params_and_models(fmnist, tmp_path, root, device=device)
    assert reference_main(["--params", str(params), "--out", str(tmp_path / "ref")]) == 0
    assert f"computed on {device}" in capsys.readouterr().out
    assert evaluate_main(["--params", str(params), "--models", str(tmp_path / "models"), "--ref-cache",
                          str(tmp_path / "ref"), "--metrics", str(tmp_path / "metrics"),
                          "--samples", str(tmp_path / "samples")]) == 0
    assert f"sampling and features on {device}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_missing_gpu_is_one_clear_line_naming_the_field(fmnist, tmp_path, root, capsys):
    from stages.reference import main as reference_main
    params = _params_and_models(fmnist, tmp_path, root, device="cuda:1")
    assert reference_main(["--params", str(params), "--out", str(tmp_path / "ref")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.device=cuda:1" in err[0] and "no CUDA device" in err[0], err
    assert not (tmp_path / "ref").exists()                               # nothing computed
    with pytest.raises(C.ConfigError, match="cuda:N"):
        C.resolve({}, {"train.device": "gpu0"})
    assert C.resolve({}, {"train.device": "cuda:3"}).train.device == "cuda:3"


# ----------------------------------------------------------------------------------------------
# Uncertainty (pipeline/stats.py).

def _gaussian_reference(d=32, seed=0):
    from pipeline.stats import ReferenceStats
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    cov = A @ A.T + 0.5 * np.eye(d)
    return rng, cov, ReferenceStats(np.zeros(d), cov)


def test_fast_fid_replicate_equals_the_frechet_distance():
    from pipeline.stats import fid_replicates
    rng, cov, ref = _gaussian_reference()
    x = rng.multivariate_normal(np.full(32, 0.3), cov * 1.2, size=100)
    mu, sigma = statistics(x)
    direct = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    assert fid_replicates(x, ref, np.arange(100)[None])[0] == pytest.approx(direct, rel=1e-5)


def test_bootstrap_standard_error_matches_the_spread_over_independent_draws():
    """Synthetic Gaussian features: the bootstrap SE from one set of n images agrees within 25 % with
    the standard deviation of the FID over independent sets of the same size."""
    from pipeline.stats import fid_replicates, fid_uncertainty
    rng, cov, ref = _gaussian_reference()
    n, mean = 128, np.full(32, 0.2)
    draws = [rng.multivariate_normal(mean, cov * 1.3, size=n) for _ in range(300)]
    spread = np.std([fid_replicates(x, ref, np.arange(n)[None])[0] for x in draws], ddof=1)
    ses = [fid_uncertainty(x, ref)["fid_se"] for x in draws[:10]]
    print(f"bootstrap SE {np.mean(ses):.4f} (median over 10 sets) vs spread over 300 draws {spread:.4f}")
    assert abs(np.median(ses) / spread - 1) < 0.25


def test_kid_equals_cleanfid_on_full_subsets():
    from cleanfid.fid import kernel_distance
    from pipeline.stats import kid
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 16)), rng.normal(0.3, 1.1, size=(60, 16))
    value, std = kid(a, b, subsets=3)
    assert value == pytest.approx(kernel_distance(a, b, num_subsets=2), rel=1e-9)   # every subset is the full set
    assert std == pytest.approx(0.0, abs=1e-12)
    assert kid(rng.normal(size=(200, 16)), rng.normal(size=(300, 16)), subsets=20, max_subset=50)[1] > 0


def test_paired_comparison_cancels_shared_seed_noise():
    """Two models on the same seeds: the paired interval of their FID difference is much narrower
    than the unpaired one, and resolves a small real difference the separate intervals overlap on."""
    from pipeline.stats import fid_uncertainty, paired, rank
    rng, cov, ref = _gaussian_reference()
    z = rng.normal(size=(128, 32))                       # the shared seeds
    L = np.linalg.cholesky(cov)
    a, b = z @ L.T + 0.30, z @ L.T + 0.40                 # model b is slightly further from the reference
    ra = {"fid": fid_replicates_point(a, ref), "seeds": [0, 127], "num_images": 128, **fid_uncertainty(a, ref)}
    rb = {"fid": fid_replicates_point(b, ref), "seeds": [0, 127], "num_images": 128, **fid_uncertainty(b, ref)}
    c = paired(ra, rb)
    assert c.resolved and c.diff > 0 and c.ci95[0] > 0
    assert ra["fid_ci95"][1] > rb["fid_ci95"][0]          # the separate intervals overlap
    assert rank([rb, ra])["best"] == 1 and rank([rb, ra])["tied"] == [1]
    assert paired(ra, {**rb, "seeds": [1, 128]}) is None  # other seeds: not paired


def fid_replicates_point(x, ref):
    from pipeline.stats import fid_replicates
    return float(fid_replicates(x, ref, np.arange(len(x))[None])[0])


def test_edge_note():
    from pipeline.stats import edge_note
    assert "smallest" in edge_note([0.04, 0.08, 0.12], 0.04, "sigma_rel")
    assert "largest" in edge_note([1, 2], 3.0, "lr", 1, 3)
    assert edge_note([0.04, 0.08, 0.12], 0.08, "sigma_rel") is None
    # A post-hoc grid: the best at the largest guidance weight is flagged too.
    from pipeline.records import point_label
    from pipeline.stats import ranking
    recs = [{"fid": f, "fid_se": 1.0, "sigma_rel": s, "guide": g, "sampler": {"guidance": w}}
            for f, s, g, w in [(10, 0.05, "none", 1.0), (8, 0.1, "ema", 1.5), (6, 0.1, "ema", 2.0), (7, 0.05, "ema", 2.0)]]
    assert "guidance w=2 is the largest searched" in ranking(recs, label=point_label)["lines"][-1]
    recs[2]["sampler"]["guidance"] = 1.75                # the best inside the range: no guidance note
    assert "guidance" not in (ranking(recs, label=point_label)["edge"] or "")


def test_sample_export_cli_seeds_guidance_and_formats(fmnist, tmp_path, root):
    from PIL import Image

    from pipeline.__main__ import main as pipeline_main
    params = _params_and_models(fmnist, tmp_path, root)
    model = sorted((tmp_path / "models").glob("ema-*.safetensors"))[0]
    guide = sorted((tmp_path / "models").glob("ema-*.safetensors"))[1]
    base = ["sample", "--params", str(params), "--model", str(model)]
    assert pipeline_main([*base, "--num", "4", "--out", str(tmp_path / "a.npz")]) == 0
    a = np.load(tmp_path / "a.npz")
    assert a["images"].shape == (4, 32, 32, 1) and a["images"].dtype == np.uint8
    assert a["seeds"].tolist() == [0, 1, 2, 3] and a["labels"].tolist() == [0, 1, 2, 3]
    # Per-image seeds: images 2 and 3 again, alone, in another batch size, into a folder of PNGs.
    assert pipeline_main([*base, "--num", "2", "--seed", "2", "--batch", "1", "--out", str(tmp_path / "png")]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["000002.png", "000003.png"]
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), a["images"][2:, ..., 0])
    # Guidance: w = 1 with a guide is the unguided result; w = 2 (autoguidance, unconditional) is not.
    for guide_arg, w, same in ((str(guide), "1", True), (str(guide), "2", False)):
        out = tmp_path / f"g-{Path(guide_arg).stem}-{w}.npz"
        assert pipeline_main([*base, "--num", "4", "--guide", guide_arg, "--guidance", w, "--out", str(out)]) == 0
        assert np.array_equal(np.load(out)["images"], a["images"]) == same, (guide_arg, w)
    # The unconditional guide of a run trained without label dropout: refused (its zero label was never
    # learned); tests/integration/test_posthoc.py samples it from a run trained with label_dropout > 0.
    assert pipeline_main([*base, "--num", "4", "--guide", "unconditional", "--guidance", "2",
                          "--out", str(tmp_path / "u.npz")]) == 2
    assert not (tmp_path / "u.npz").exists()
    # Guidance without a guide, or a missing model: one line, exit 2, nothing written.
    assert pipeline_main([*base, "--num", "2", "--guidance", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert pipeline_main(["sample", "--params", str(params), "--model", str(tmp_path / "nope.safetensors"),
                          "--num", "2", "--out", str(tmp_path / "y.npz")]) == 2
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


def _tiny_dinov2(path):
    """A randomly initialised DINOv2-layout ViT (2 blocks, 64 wide), saved as DINOv2's own checkpoints are:
    a plain state dict at 518 pixels with a mask token."""
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, depth=2,
                            embed_dim=64, num_heads=1)
    state = {k: v for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 64)
    torch.save(state, path)
    return path


def test_metrics_as_equals_fd_dinov2_precision_recall_features_once_per_network(fmnist, tmp_path, root, capsys,
                                                                                monkeypatch):
    """metrics.names [fid, fd_dinov2, precision_recall]: every metric an entry of the record's `metrics`
    (value, se, interval, feature net); Inception features computed once per image set and shared by
    FID, KID, precision and recall; every entry reaches metrics/fid.json, to_row and the report."""
    import pipeline.fid as fid_mod
    from pipeline.records import to_row
    from stages.evaluate import main as evaluate_main
    from stages.reference import main as reference_main
    weights = _tiny_dinov2(tmp_path / "dinov2_tiny.pth")
    params = _params_and_models(fmnist, tmp_path, root, names=["fid", "fd_dinov2", "precision_recall"],
                                dinov2_weights=str(weights))
    assert reference_main(["--params", str(params), "--out", str(tmp_path / "ref")]) == 0
    assert len(list((tmp_path / "ref").glob("ref-*.npz"))) == 2          # one cache entry per feature network
    passes = []
    real = fid_mod.array_features
    monkeypatch.setattr(fid_mod, "array_features", lambda images, feat, *a, **k: passes.append(feat.name) or
                        real(images, feat, *a, **k))
    assert evaluate_main(["--params", str(params), "--models", str(tmp_path / "models"), "--ref-cache",
                          str(tmp_path / "ref"), "--metrics", str(tmp_path / "metrics"),
                          "--samples", str(tmp_path / "samples")]) == 0
    assert sorted(passes) == sorted(["dinov2-vit64x2"] * 2 + [passes[0]] * 2) and len(set(passes)) == 2   # 2 models
    records = json.loads((tmp_path / "metrics/fid_records.json").read_text())
    for r in records:
        m = r["metrics"]
        assert set(m) == {"fid", "kid", "fd_dinov2", "precision", "recall"}
        assert m["fid"]["value"] == r["fid"] and m["fid"]["se"] == r["fid_se"] and m["kid"]["value"] == r["kid"]
        fd = m["fd_dinov2"]
        assert fd["value"] > 0 and fd["se"] > 0 and fd["interval"][0] <= fd["value"] <= fd["interval"][1] + 1e-9
        assert fd["feature_net"] == "dinov2-vit64x2" and len(fd["feature_net_sha256"]) == 64
        assert fd["value"] != r["fid"]
        for name in ("precision", "recall"):
            e = m[name]
            assert 0 <= e["interval"][0] <= e["value"] <= e["interval"][1] <= 1 and e["feature_net"] == r["feature_net"]
        row = to_row(r)
        assert {"precision", "precision_se", "recall_lo", "fd_dinov2_hi", "fid_se", "kid"} <= set(row)
    metrics = json.loads((tmp_path / "metrics/fid_points.json").read_text())
    assert set(metrics["fd_dinov2"]) == set(metrics["fid"]) == set(metrics["precision"]) == set(metrics["recall"])
    # The features are the tiny ViT's CLS token: 64 numbers per image.
    from pipeline.metrics import FEATURES
    ex = FEATURES["dinov2"](C.load_config(params), "cpu")
    assert ex.fn(torch.rand(3, 3, 299, 299) * 255).shape == (3, 64)
    # No weights file: one line naming the field, before any sampling; no unknown metric either.
    capsys.readouterr()
    missing = _params_and_models(fmnist, tmp_path / "b", root, names=["fid", "fd_dinov2"],
                                 dinov2_weights=str(tmp_path / "absent.pth"))
    assert evaluate_main(["--params", str(missing), "--models", str(tmp_path / "b/models"), "--ref-cache",
                          str(tmp_path / "b/ref"), "--metrics", str(tmp_path / "b/metrics")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.dinov2_weights=" in err[0] and "nothing is downloaded" in err[0], err
    assert not (tmp_path / "b/metrics").exists()
    with pytest.raises(C.ConfigError, match="fid first"):
        C.resolve({}, {"metrics.names": ["fd_dinov2"]})


def test_published_table_appears_only_for_the_papers_preset_and_protocol():
    from pipeline.published import PUBLISHED, paper_lines
    rec = {"num_images": 50000, "seed_sets": 3, "sampler": {"guidance": 1.0, "steps": 32, "solver": "heun"},
           "sigma_rel": 0.12, "fid": 3.9, "mode": "legacy", "reference": "img512.pkl", "ref_num_images": 0,
           "fid_min": 3.71, "extra": {"metrics": {"fd_dinov2": {"value": 110.0, "min": 105.5}}}}
    guided = {**rec, "sampler": {"guidance": 1.4}, "guide": "unconditional", "fid_min": 3.1, "sigma_rel": 0.05}
    lines = paper_lines("img512-xs", [rec, guided])
    assert len(lines) == 3 and "FID 3.53 at sigma_rel 0.135" in lines[0] and "3.71 at sigma_rel 0.120" in lines[0]
    assert "FD-DINOv2 103.39 at sigma_rel 0.200" in lines[1] and "105.50" in lines[1]
    assert "2.91 at sigma_rel 0.045, w 1.4" in lines[2] and "3.10 at sigma_rel 0.050, w 1.4" in lines[2]
    assert all("min over 3 seed sets" in line for line in lines)
    for change, why in (({"seed_sets": 1, "fid_min": None}, "metrics.seed_sets is 1, the paper's 3"),
                        ({"num_images": 10000}, "metrics.num_images is 10000"), ({"mode": "clean"}, "metrics.mode is clean"),
                        ({"reference": "imagenet-val", "ref_num_images": 5000}, "the reference is imagenet-val"),
                        ({"sampler": {"guidance": 1.0, "steps": 18}}, "sampler.steps is 18, the paper's 32")):
        [line] = paper_lines("img512-xs", [{**rec, **change}])      # another protocol: why, and no numbers
        assert "not compared" in line and why in line and "3.53" not in line, line
    assert paper_lines("fmnist-small", [rec]) == [] and paper_lines(None, [rec]) == []    # no published number
    assert all(0 < v[1] < 0.2887 for e in PUBLISHED.values() for v in e.values())          # valid EMA lengths
