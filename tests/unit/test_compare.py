"""`pipeline compare`: paired verdicts between evaluations on the same seeds, unpaired otherwise, and a
refusal naming what differs when two evaluations are not comparable."""
import json

import numpy as np
import pytest

from pipeline.compare import CompareError, Evaluation, compare, find_evaluation, lines
from pipeline.fid import measure, statistics
from pipeline.records import FIDRecord

D = 16


def _ref(seed=0):
    x = np.random.default_rng(seed).normal(size=(400, D))
    mu, sigma = statistics(x)
    return {"mu": mu, "sigma": sigma, "features": x[:64]}


def _record(feats, ref, sigma_rel=0.1, seeds=(0, 63), reference_sha="r" * 64, steps=8):
    m = measure(feats, ref, len(feats))
    metrics = {"fid": {"value": m["fid"], "se": m["fid_se"], "interval": m["fid_ci95"], "bootstrap": m["bootstrap"]},
               "kid": {"value": m["kid"], "se": m["kid_std"], "interval": None}}
    return FIDRecord(fid=m["fid"], feature_net="fid-helper", feature_net_sha256="f" * 64, mode="clean",
                     num_images=len(feats), reference="fashion-mnist:test", reference_sha256=reference_sha,
                     ref_num_images=400, sampler={"steps": steps, "nfe": 2 * steps - 1, "guidance": 1.0},
                     seeds=list(seeds), model_file=f"ema-{sigma_rel:.3f}.safetensors", sigma_rel=sigma_rel,
                     fid_se=m["fid_se"], fid_ci95=m["fid_ci95"], kid=m["kid"], kid_std=m["kid_std"],
                     bootstrap=m["bootstrap"], metrics=metrics).to_dict()


def test_same_seeds_are_paired_and_a_real_shift_is_resolved():
    ref = _ref()
    x = np.random.default_rng(1).normal(size=(64, D))           # the same seeds: the same noise in both
    a = Evaluation("A", "a", [_record(x, ref), _record(x * 1.02, ref, sigma_rel=0.2)])
    b = Evaluation("B", "b", [_record(x + 0.6, ref, steps=10), _record(x * 1.02 + 0.01, ref, sigma_rel=0.2, steps=10)])
    res = compare(a, b)
    assert [p["point"] for p in res["points"]] == ["sigma_rel 0.100", "sigma_rel 0.200"]
    shifted, same = (next(d for d in p["metrics"] if d["metric"] == "fid") for p in res["points"])
    assert shifted["how"] == "paired" and shifted["resolved"] and shifted["diff"] > 0
    assert shifted["diff"] == pytest.approx(b.records[0]["fid"] - a.records[0]["fid"])
    assert shifted["ci95"][0] <= shifted["diff"] <= shifted["ci95"][1]
    assert same["how"] == "paired" and not same["resolved"] and same["ci95"][0] < 0 < same["ci95"][1]
    kid = next(d for d in res["points"][0]["metrics"] if d["metric"] == "kid")
    assert kid["how"] == "unpaired"                             # no replicates: said so
    text = "\n".join(lines(res))
    assert "resolved: B higher" in text and "not resolved" in text and "NFE 19" in text and "paired" in text
    # The paired interval is narrower than the unpaired one would be for the same pair.
    se = np.hypot(a.records[0]["fid_se"], b.records[0]["fid_se"])
    assert shifted["ci95"][1] - shifted["ci95"][0] < 2 * 1.96 * se


def test_other_seeds_are_compared_unpaired_and_other_protocols_refused():
    ref = _ref()
    rng = np.random.default_rng(2)
    a = Evaluation("A", "a", [_record(rng.normal(size=(64, D)), ref)])
    b = Evaluation("B", "b", [_record(rng.normal(size=(64, D)), ref, seeds=(64, 127))])
    fid = next(d for d in compare(a, b)["points"][0]["metrics"] if d["metric"] == "fid")
    assert fid["how"] == "unpaired" and not fid["resolved"]
    other_ref = Evaluation("C", "c", [_record(rng.normal(size=(64, D)), ref, reference_sha="s" * 64)])
    with pytest.raises(CompareError, match=r"A and C are not comparable: their evaluations differ in reference"):
        compare(a, other_ref)
    fewer = Evaluation("E", "e", [_record(rng.normal(size=(32, D)), ref)])
    with pytest.raises(CompareError, match=r"generated images \(64 vs 32\)"):
        compare(a, fewer)


def test_records_are_found_from_files_folders_and_sweep_trials(tmp_path):
    ref = _ref()
    rec = _record(np.random.default_rng(3).normal(size=(64, D)), ref)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "fid_records.json").write_text(json.dumps([rec]))
    trial = tmp_path / "runs/sweeps/lr/trials/t0"
    trial.mkdir(parents=True)
    (trial / "fid_records.json").write_text(json.dumps([rec]))
    for spec in (str(tmp_path / "metrics" / "fid_records.json"), str(tmp_path), "lr/t0"):
        ev = find_evaluation(spec, tmp_path, None, tmp_path / "runs/sweeps")
        assert ev.records[0]["fid"] == rec["fid"], spec
    with pytest.raises(CompareError, match="nothere: no evaluation found"):
        find_evaluation("nothere", tmp_path, None, tmp_path / "runs/sweeps")


def test_a_metric_note_is_printed_once_under_the_comparison():
    ref = _ref()
    x = np.random.default_rng(4).normal(size=(64, D))
    a, b = _record(x, ref), _record(x + 0.1, ref)
    note = "k-NN manifolds of 64 generated and 400 reference images are too sparse"
    for r in (a, b):
        r["metrics"]["precision"] = {"value": 0.0, "se": 0.0, "interval": [0.0, 0.0], "note": note}
        r["metrics"]["recall"] = {"value": 0.0, "se": 0.0, "interval": [0.0, 0.0], "note": note}
    text = lines(compare(Evaluation("A", "a", [a]), Evaluation("B", "b", [b])))
    assert [ln for ln in text if ln.startswith("note:")] == [f"note: precision, recall: {note}"]
