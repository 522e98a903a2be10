"""`python -m pipeline compare A B [...]`: a verdict between experiments (method.md 10).

Each argument names where an evaluation's records are: a records file (or a folder holding
fid_records.json), a sweep trial (`SWEEP/TRIAL`), an MLflow run id (a training run or one of its EMA
runs: their `record.json` artifacts), or a DVC experiment name or git revision (its
metrics/fid_records.json, read through dvc.api). The first argument is the baseline; every other is
compared with it, post-hoc point by post-hoc point (EMA length, guidance, guide), and best against best.

Only evaluations of one protocol are compared (feature net, mode, generated and reference images,
reference, seed sets); anything else is refused with the reason. Two records made on the same seeds
with the same half-sample indices are paired: the difference of their half-sample FIDs cancels the
noise the seeds share (stats.paired). Otherwise, and for metrics without replicates, the interval is
the unpaired normal one, sqrt(se_a^2 + se_b^2), and the output says so.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

PROTOCOL_FIELDS = {"feature_net_sha256": "feature net", "mode": "mode", "num_images": "generated images",
                   "reference_sha256": "reference", "ref_num_images": "reference images", "seed_sets": "seed sets"}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(PipelineError, ValueError):
    pass


@dataclass
class Evaluation:
    name: str              # what the user typed
    where: str             # where its records were found
    records: list[dict]


# ---------------------------------------------------------------------------------------------------
# Finding the records an argument names.

def find_evaluation(spec: str, root: Path, uri: str | None, sweeps_dir: Path) -> Evaluation:
    """The records `spec` names (tried in this order: path, sweep trial, MLflow run id, DVC revision)."""
    from .records import parse_records, read_records
    p = Path(spec)
    if p.exists():
        f = p / "fid_records.json" if p.is_dir() else p
        if p.is_dir() and not f.is_file():
            f = p / "metrics" / "fid_records.json"
        return Evaluation(spec, str(f), read_records(f))
    tried = [f"no file or folder {spec}"]
    if "/" in spec:
        sweep, _, trial = spec.partition("/")
        f = sweeps_dir / sweep / "trials" / trial / "fid_records.json"
        if f.is_file():
            return Evaluation(spec, str(f), read_records(f, "trial records"))
        tried.append(f"no sweep trial {f.parent}")
    if RUN_ID.match(spec) and uri:
        recs = _mlflow_records(spec, uri)
        if recs:
            return Evaluation(spec, f"MLflow run {spec}", recs)
        tried.append(f"no MLflow run {spec} with record.json artifacts in {uri}")
    try:
        import dvc.api
        text = dvc.api.read("metrics/fid_records.json", repo=str(root), rev=spec)
    except Exception as err:                       # not a revision, or no records in it
        tried.append(f"no DVC experiment or revision {spec} with metrics/fid_records.json "
                     f"({err.__class__.__name__})")
    else:
        where = f"metrics/fid_records.json at {spec}"
        return Evaluation(spec, where, parse_records(text.encode(), where))
    raise CompareError(f"{spec}: no evaluation found ({'; '.join(tried)})")


def _mlflow_records(run_id: str, uri: str) -> list[dict]:
    """The record.json of an EMA run, or of every EMA run under a training run (JSON only, no pickles)."""
    import mlflow.artifacts

    from .tracking.store import client_for
    client = client_for(uri, existing=True)
    try:
        run = client.get_run(run_id)
    except Exception:
        return []
    runs = [run] if run.data.tags.get("kind") == "ema" else client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    out = []
    for r in runs:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="record.json",
                                                       tracking_uri=uri)
        except Exception:                               # an EMA run logged before records were attached
            continue
        out.append(json.loads(Path(path).read_text()))
    return out


# ---------------------------------------------------------------------------------------------------
# The comparison.

def protocol(r: dict) -> dict:
    return {k: r.get(k, 1 if k == "seed_sets" else None) for k in PROTOCOL_FIELDS}


def check_same_protocol(a: Evaluation, b: Evaluation) -> None:
    """Refuse two evaluations whose numbers mean different things (the first difference named)."""
    pa, pb = protocol(a.records[0]), protocol(b.records[0])
    for ev in (a, b):
        if any(protocol(r) != protocol(ev.records[0]) for r in ev.records):
            raise CompareError(f"{ev.name}: its records use more than one protocol; compare one evaluation each")
    diffs = [f"{label} ({_show(a.records[0], k)} vs {_show(b.records[0], k)})"
             for k, label in PROTOCOL_FIELDS.items() if pa[k] != pb[k]]
    if diffs:
        raise CompareError(f"{a.name} and {b.name} are not comparable: their evaluations differ in "
                           f"{', '.join(diffs)}; evaluate both with the same metrics settings")


def _show(r: dict, key: str) -> str:
    if key == "feature_net_sha256":
        return f"{r.get('feature_net')} {str(r.get(key))[:8]}"
    if key == "reference_sha256":
        return f"{r.get('reference')} {str(r.get(key))[:8]}"
    return str(r.get(key, 1 if key == "seed_sets" else None))


def point(r: dict) -> tuple:
    """The post-hoc point a record measures: EMA length, guidance and guide, and the training length or
    the steps only when the evaluation made them an axis (otherwise the steps are what experiments
    often change, and are compared)."""
    s, extra = r.get("sampler") or {}, r.get("extra") or {}
    return (round(float(r.get("sigma_rel") or 0), 6), float(s.get("guidance", 1.0)), r.get("guide", "none"),
            r.get("nimg") if extra.get("nimg_axis") else None, s.get("steps") if extra.get("steps_axis") else None)


def metric_difference(name: str, ra: dict, rb: dict) -> dict | None:
    """B - A for one metric: value, 95 % interval, how it was made (paired / unpaired), resolved."""
    from .records import record_metrics
    from .stats import paired
    ea, eb = record_metrics(ra).get(name), record_metrics(rb).get(name)
    if ea is None or eb is None:
        return None
    diff = float(eb["value"] - ea["value"])
    if name == "fid":
        c = paired(ra, rb)
        if c is not None:
            return {"metric": name, "diff": c.diff, "ci95": list(c.ci95), "how": "paired", "resolved": c.resolved}
    if ea.get("se") is None or eb.get("se") is None:
        return {"metric": name, "diff": diff, "ci95": None, "how": "no uncertainty recorded", "resolved": None}
    half = 1.96 * math.hypot(ea["se"], eb["se"])
    lo, hi = diff - half, diff + half
    return {"metric": name, "diff": diff, "ci95": [lo, hi], "how": "unpaired", "resolved": not (lo <= 0 <= hi)}


def compare_records(ra: dict, rb: dict) -> list[dict]:
    from .records import record_metrics
    names = [n for n in record_metrics(ra) if n in record_metrics(rb)]
    return [d for d in (metric_difference(n, ra, rb) for n in names) if d is not None]


def compare(a: Evaluation, b: Evaluation) -> dict:
    """Per common post-hoc point and best vs best: every metric's difference B - A with its verdict."""
    from .records import computed
    check_same_protocol(a, b)
    ra, rb = computed(a.records), computed(b.records)
    by_a = {point(r): r for r in ra}
    pairs = [(by_a[point(r)], r) for r in rb if point(r) in by_a]
    best_a, best_b = min(ra, key=lambda r: r["fid"]), min(rb, key=lambda r: r["fid"])
    pairs.sort(key=lambda p: point(p[0]))
    from .records import metric_notes
    return {"a": a.name, "b": b.name, "where": [a.where, b.where], "notes": metric_notes(best_a, best_b),
            "points": [{"point": _label(x), "a": _setting(x), "b": _setting(y), "metrics": compare_records(x, y)}
                       for x, y in pairs],
            "best": {"point": f"{_label(best_a)} vs {_label(best_b)}", "a": _setting(best_a), "b": _setting(best_b),
                     "metrics": compare_records(best_a, best_b)}}


def _label(r: dict) -> str:
    from .records import point_label
    return point_label(r)


def _setting(r: dict) -> str:
    s = r["sampler"]
    return f"NFE {s['nfe']}, seeds {r['seeds'][0]}-{r['seeds'][1]}"


# ---------------------------------------------------------------------------------------------------
# Printing.

def verdict(d: dict) -> str:
    if d["resolved"] is None:
        return "no interval"
    if not d["resolved"]:
        return "not resolved"
    better = "lower" if d["diff"] < 0 else "higher"
    return f"resolved: B {better}"


def lines(result: dict) -> list[str]:
    out = [f"A = {result['a']} ({result['where'][0]})", f"B = {result['b']} ({result['where'][1]})",
           "B - A per metric, with its 95% interval (paired: same seeds and half-samples; unpaired otherwise)"]
    blocks = [(p["point"], p) for p in result["points"]] + [("best of each: " + result["best"]["point"], result["best"])]
    if not result["points"]:
        out.append("no post-hoc point (EMA length, guidance) is in both: only the best of each is compared")
    for title, p in blocks:
        out.append(f"{title}  [A: {p['a']}; B: {p['b']}]")
        for d in p["metrics"]:
            ci = f"95% {d['ci95'][0]:+.4g} to {d['ci95'][1]:+.4g}" if d["ci95"] else "no interval"
            out.append(f"  {d['metric']:<10} {d['diff']:+.4g}  ({ci}, {d['how']})  {verdict(d)}")
    out += [f"note: {', '.join(names)}: {note}" for note, names in result.get("notes", {}).items()]
    return out
