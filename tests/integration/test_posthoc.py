"""Post-hoc axes from one training (method.md 5, 6): a grid of EMA lengths x guides x guidance
weights, every main model and guide reconstructed in one pass over the snapshots, one record and
one MLflow child run per point, the heat-map figure."""
import json

import pytest

from conftest import tiny_params
from pipeline import config as C
from pipeline import reconstruction
from pipeline.training import TrainHooks, train

pytestmark = pytest.mark.slow

GRID = {"sigma_rel": [0.1, 0.15], "guide": ["none", {"nimg": 64, "sigma_rel": 0.05}], "guidance": [1.0, 2.0]}


def test_grid_of_guides_and_weights_from_one_training(tmp_path, fmnist, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stages.evaluate import main as evaluate_main
    from stages.reconstruct import main as reconstruct_main
    params = tiny_params(tmp_path, fmnist, evaluate={"grid": GRID}, train={"label_dropout": 0.1})
    cfg = C.load_config(params)
    res = train(cfg, TrainHooks(progress=False))
    passes = []
    real = reconstruction.stream_combine
    monkeypatch.setattr(reconstruction, "stream_combine", lambda *a, **k: passes.append(1) or real(*a, **k))
    common = ["--params", str(params)]
    assert reconstruct_main([*common, "--out", str(tmp_path / "models")]) == 0
    assert len(passes) == 1                                     # main models and the guide: one pass
    made = sorted(p.name for p in (tmp_path / "models").glob("ema-*.safetensors"))
    assert made == ["ema-0000000064-0.050.safetensors", "ema-0000000128-0.100.safetensors",
                    "ema-0000000128-0.150.safetensors"]
    assert evaluate_main([*common, "--models", str(tmp_path / "models"), "--ref-cache", str(tmp_path / "ref"),
                          "--metrics", str(tmp_path / "metrics"), "--samples", str(tmp_path / "samples")]) == 0
    records = json.loads((tmp_path / "metrics/fid_records.json").read_text())
    assert len(records) == 8                                    # 2 EMA lengths x 2 guides x 2 weights
    axes = {(r["sigma_rel"], r["guide"], r["sampler"]["guidance"]) for r in records}
    assert axes == {(s, g, w) for s in (0.1, 0.15) for g in ("none", "ema 0.050 at 64 img") for w in (1.0, 2.0)}
    # No guide or w = 1 is the unguided model: computed once per EMA length, the others point to it.
    computed = [r for r in records if not r["extra"].get("same_as")]
    assert len(computed) == 4
    by = {(r["sigma_rel"], r["guide"], r["sampler"]["guidance"]): r for r in records}
    for s in (0.1, 0.15):
        plain = by[(s, "none", 1.0)]
        assert not plain["extra"].get("same_as")
        for other in ((s, "none", 2.0), (s, "ema 0.050 at 64 img", 1.0)):
            assert by[other]["extra"]["same_as"] == plain["eval_key"] and by[other]["fid"] == plain["fid"]
        guided = by[(s, "ema 0.050 at 64 img", 2.0)]
        assert guided["fid"] != plain["fid"] and guided["extra"]["guide_file"].endswith("ema-0000000064-0.050.safetensors")
        assert (tmp_path / "samples" / guided["extra"]["samples"]).is_file()
    metrics = json.loads((tmp_path / "metrics/fid_points.json").read_text())
    assert len(metrics["fid"]) == 8 and "ema_0.100_w2_ema-0.050-at-64-img" in metrics["fid"]
    # The run report: the heat map (EMA length x w per guide) and one row per computed point.
    from stages.report import main as report_main
    assert report_main([*common, "--metrics", str(tmp_path / "metrics"), "--models", str(tmp_path / "models"),
                        "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports/figures/fid_grid.png").stat().st_size > 10_000
    html = (tmp_path / "reports/report.html").read_text()
    assert "FID over EMA length x guidance" in html and html.count("w 2 guide ema 0.050 at 64 img</td>") == 2
    # MLflow: one child run per point under the training run, every axis a param.
    client = MlflowClient(cfg.tracking.uri)
    kids = client.search_runs([client.get_run(res.mlflow_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    assert len(kids) == 8
    got = {(float(k.data.params["sigma_rel"]), k.data.params["guide"], float(k.data.params["guidance"])) for k in kids}
    assert got == axes
    assert sum("same_as" in k.data.tags for k in kids) == 4
    from pipeline.tracking.runs import load_runs
    df = load_runs(cfg.tracking.experiment, cfg.tracking.uri)
    assert len(df) == 8 and set(zip(df["sigma_rel"], df["guide"], df["guidance"])) == axes


def test_grid_config_is_checked_before_any_work():
    with pytest.raises(C.ConfigError, match="either {file"):
        C.resolve({}, {"evaluate.grid": {"guide": [{"file": "g.safetensors", "nimg": 64}]}})
    with pytest.raises(C.ConfigError, match="expected none, unconditional"):
        C.resolve({}, {"evaluate.grid": {"guide": ["shorter"]}})
    with pytest.raises(C.ConfigError, match="sigma_rel"):
        C.resolve({}, {"evaluate.grid": {"sigma_rel": [0.3]}})
    with pytest.raises(C.ConfigError, match="label_dropout"):
        C.resolve({}, {"train.label_dropout": 1.0})


def test_training_length_is_a_post_hoc_axis(tmp_path, fmnist):
    """evaluate.grid.nimg: EMA lengths at several training lengths from one training (EDM2's figure: FID
    over EMA length, one curve per training length), through reconstruct, evaluate, the report and MLflow."""
    from mlflow.tracking import MlflowClient

    from stages.evaluate import main as evaluate_main
    from stages.reconstruct import main as reconstruct_main
    from stages.report import main as report_main
    params = tiny_params(tmp_path, fmnist, evaluate={"grid": {"sigma_rel": [0.05, 0.1], "nimg": [64, 128]}})
    cfg = C.load_config(params)
    res = train(cfg, TrainHooks(progress=False))
    common = ["--params", str(params)]
    assert reconstruct_main([*common, "--out", str(tmp_path / "models")]) == 0
    assert sorted(p.name for p in (tmp_path / "models").glob("ema-*.safetensors")) == [
        "ema-0000000064-0.050.safetensors", "ema-0000000064-0.100.safetensors",
        "ema-0000000128-0.050.safetensors", "ema-0000000128-0.100.safetensors"]
    assert evaluate_main([*common, "--models", str(tmp_path / "models"), "--ref-cache", str(tmp_path / "ref"),
                          "--metrics", str(tmp_path / "metrics"), "--samples", str(tmp_path / "samples"),
                          "--shards", str(tmp_path / "shards")]) == 0
    records = json.loads((tmp_path / "metrics/fid_records.json").read_text())
    assert {(r["nimg"], r["sigma_rel"]) for r in records} == {(t, s) for t in (64, 128) for s in (0.05, 0.1)}
    assert len({r["fid"] for r in records}) == 4 and all(r["fid_ci95"] for r in records)
    points = json.loads((tmp_path / "metrics/fid_points.json").read_text())
    assert {"ema_0.050_t64", "ema_0.100_t128"} <= set(points["fid"])
    assert report_main([*common, "--metrics", str(tmp_path / "metrics"), "--models", str(tmp_path / "models"),
                        "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "reports")]) == 0
    html = (tmp_path / "reports/report.html").read_text()
    assert "nimg 64" in html and "nimg 128" in html                       # a row per (training length, EMA length)
    assert (tmp_path / "reports/figures/fid_vs_ema.png").stat().st_size > 10_000     # one curve per training length
    assert (tmp_path / "metrics/fid_vs_ema.png").stat().st_size > 10_000
    client = MlflowClient(cfg.tracking.uri)
    kids = client.search_runs([client.get_run(res.mlflow_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    assert {(int(k.data.params["nimg"]), float(k.data.params["sigma_rel"])) for k in kids} == \
        {(t, s) for t in (64, 128) for s in (0.05, 0.1)}
    with pytest.raises(C.ConfigError, match=r"evaluate.grid.nimg\[0\]=40: a training length is a snapshot time"):
        C.resolve(cfg.to_dict(), {"evaluate.grid.nimg": [40]})
