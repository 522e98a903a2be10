"""Measurement records: what a stored metric value depends on, its identity, and how it is printed.

A record carries the value with its uncertainty and everything it depends on (feature network and
its hash, mode, number of generated images, reference identity and n, sampler, seeds, model file,
EMA length); values are compared only when their records match.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PipelineError

COMPARE_FIELDS = ("feature_net", "feature_net_sha256", "mode", "num_images", "reference", "ref_num_images",
                  "sampler")
SAMPLER_AXES = ("steps", "nfe", "guidance")   # post-hoc axes: points that differ in them are compared


class RecordError(PipelineError, ValueError):
    pass


def read_records(path: str | Path, what: str = "records file") -> list[dict]:
    """The FID records of a fid_records.json, each checked for the fields readers use; a missing, corrupt
    or foreign file is a RecordError naming the file (never a traceback, never an empty result)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{what} {path} is missing (run the evaluate stage)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecordError(f"{what} {path} is corrupt ({err.__class__.__name__}: {str(err)[:80]}); "
                          f"rerun the evaluate stage") from None
    return parse_records(data, f"{what} {path}")


def parse_records(data: bytes, where: str) -> list[dict]:
    """The records of a fid_records.json's bytes (a file, or a file at a DVC revision), checked as
    read_records says; `where` names them in the one-line error."""
    import math
    try:
        recs = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RecordError(f"{where} is corrupt ({err.__class__.__name__}: {str(err)[:80]}); "
                          f"rerun the evaluate stage") from None
    if not isinstance(recs, list) or not recs:
        raise RecordError(f"{where} holds no records (expected a non-empty JSON list)")
    for i, r in enumerate(recs):
        ok = (isinstance(r, dict) and isinstance(r.get("fid"), (int, float)) and not isinstance(r.get("fid"), bool)
              and math.isfinite(r["fid"]) and isinstance(r.get("sampler"), dict)
              and isinstance(r.get("seeds"), list) and len(r["seeds"]) == 2 and isinstance(r.get("model_file"), str)
              and all(k in r["sampler"] for k in ("nfe", "steps", "guidance")))
        if not ok:
            raise RecordError(f"{where}: record {i} is malformed (needs a finite fid, sampler, seeds, "
                              f"model_file); rerun the evaluate stage")
    return recs


@dataclass
class FIDRecord:
    fid: float
    feature_net: str
    feature_net_sha256: str
    mode: str
    num_images: int
    reference: str
    reference_sha256: str
    ref_num_images: int
    sampler: dict                      # steps, nfe, solver, churn, rho, sigma_min, sigma_max, guidance
    seeds: list[int]                   # [first, last]
    model_file: str
    sigma_rel: float | None = None
    nimg: int | None = None
    fid_se: float | None = None        # bootstrap standard error over the generated images
    fid_ci95: list[float] | None = None
    kid: float | None = None           # clean-fid's unbiased KID, same features
    kid_std: float | None = None
    bootstrap: dict | None = None      # resamples, seed, what was resampled, replicates
    guide: str = "none"                # the guiding model of sampler.guidance (none, unconditional, ema ..., file ...)
    seed_sets: int = 1                 # K disjoint seed sets: fid is their mean, fid_se its standard error
    fid_sets: list[float] | None = None  # the FID of each seed set (K > 1)
    fid_min: float | None = None       # the minimum over the sets: EDM/EDM2's reporting (K > 1)
    # Every metric as an equal entry {name: {value, se, interval, feature_net, ...}}: fid and kid (the
    # fields above are the same numbers, kept for readers of earlier records), fd_dinov2, precision, recall.
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_key"] = eval_key(d)
        return d


# Sampler fields added after records existed: left out of the record at their defaults, so the records
# (and eval_keys) of earlier evaluations stay valid.
SAMPLER_LATER_DEFAULTS = {"S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0, "seeding": "portable"}


def sampler_record(s) -> dict:
    """Every sampler setting that changes the samples (config.key_values: all fields but those marked
    off_key, e.g. batch_size), plus the NFE. A new sampler field is in the record, and so in the
    eval_key, without touching this function: cached results are never reused across it."""
    from .config import key_values
    rec = {"nfe": s.nfe, **key_values(s)}
    return {k: v for k, v in rec.items() if not (k in SAMPLER_LATER_DEFAULTS and v == SAMPLER_LATER_DEFAULTS[k])}


def eval_key(record: dict) -> str:
    """Identity of one evaluation: the model (file name and EMA length) and everything the number
    depends on. Re-evaluating with other settings gives another key (a new MLflow child run)."""
    ident = {k: record.get(k) for k in ("feature_net_sha256", "mode", "num_images", "reference_sha256",
                                        "ref_num_images", "sampler", "seeds", "sigma_rel", "nimg")}
    if record.get("guide", "none") != "none":         # unguided records keep their earlier keys
        ident["guide"] = record["guide"]
    if record.get("seed_sets", 1) != 1:               # so do single-set records
        ident["seed_sets"] = record["seed_sets"]
    ident["model"] = Path(record.get("model_file") or "").name
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def check_comparable(records) -> None:
    """Raise when records differ in anything that changes the FID's meaning."""
    if not records:
        return
    def fields(r):
        out = {k: r.get(k) for k in COMPARE_FIELDS}
        out["seed_sets"] = r.get("seed_sets", 1)      # mean of K sets and one set's value: other protocols
        out["sampler"] = {k: v for k, v in (r.get("sampler") or {}).items() if k not in SAMPLER_AXES}
        return out
    first = fields(records[0])
    for r in map(fields, records[1:]):
        diffs = [f"{k}: {first[k]!r} vs {r[k]!r}" for k in (*COMPARE_FIELDS, "seed_sets") if first[k] != r[k]]
        if diffs:
            raise RecordError("FIDs are not comparable, their records differ in " + "; ".join(diffs))


def point_label(r: dict) -> str:
    """The post-hoc point of a record: its EMA length, and its guidance weight and guide when it is
    guided (its steps are in the NFE printed beside it)."""
    s = r["sampler"]
    text = f"sigma_rel {r['sigma_rel']:.3f}"
    if s.get("guidance", 1.0) != 1.0 or r.get("guide", "none") != "none":
        text += f", w {s.get('guidance', 1.0):g} guide {r.get('guide', 'none')}"
    if (r.get("extra") or {}).get("nimg_axis"):
        text += f", nimg {r.get('nimg')}"
    return text


def point_key(r: dict) -> str:
    """A record's key in metrics/fid.json: `ema_<sigma_rel>`, extended by w, guide and steps when the
    point is guided or not at the first steps of the grid (DVC metric names: no spaces)."""
    s = r["sampler"]
    key = f"ema_{r['sigma_rel']:.3f}"
    if s["guidance"] != 1.0 or r.get("guide", "none") != "none":
        key += f"_w{s['guidance']:g}_{r.get('guide', 'none').replace(' ', '-')}"
    if (r.get("extra") or {}).get("steps_axis"):
        key += f"_n{s['steps']}"
    if (r.get("extra") or {}).get("nimg_axis"):
        key += f"_t{r.get('nimg')}"
    return key


def is_plain(r: dict) -> bool:
    """An unguided point at the grid's only steps: keyed `ema_<sigma_rel>` like before grids existed."""
    return point_key(r) == f"ema_{r['sigma_rel']:.3f}"


def is_grid(records) -> bool:
    """Records of a post-hoc grid (some point guided, or several step counts)."""
    return not all(is_plain(r) for r in records)


def computed(records) -> list:
    """One record per computation: the points marked `same_as` (no guide, or w = 1: the unguided
    model sampled once) are left out, so rankings, curves and tables count each result once."""
    return [r for r in records if not (r.get("extra") or {}).get("same_as")]


def protocol_text(r: dict, with_min: bool = True) -> str:
    """How the FID was measured, for every printed number: one set, or K seed sets (mean and minimum)."""
    k = r.get("seed_sets", 1)
    if k == 1:
        return f"{r['num_images']} images, one seed set"
    text = f"mean +- SE over {k} seed sets of {r['num_images']} images"
    return text + (f"; min {r['fid_min']:.2f} (EDM/EDM2 report the min over 3 sets of 50,000)" if with_min else "")


def record_metrics(r: dict) -> dict:
    """A record's metrics as equal entries {name: {value, se, interval, ...}}; records written before
    `metrics` existed are read from their fid / kid fields and extra.metrics."""
    if r.get("metrics"):
        return r["metrics"]
    out = {"fid": {"value": r["fid"], "se": r.get("fid_se"), "interval": r.get("fid_ci95"),
                   **({"sets": r["fid_sets"], "min": r.get("fid_min")} if r.get("fid_sets") else {})}}
    if r.get("kid") is not None:
        out["kid"] = {"value": r["kid"], "se": r.get("kid_std"), "interval": None}
    for name, e in ((r.get("extra") or {}).get("metrics") or {}).items():
        out[name] = {"se": e.get("se"), "interval": e.get("ci95") or e.get("interval"), **e}
    return out


def to_row(r: dict) -> dict:
    """One flat row per record, the one shape every table reads (the sweep table, metrics/fid.json,
    `pipeline runs`, the reports, MLflow): the post-hoc point (EMA length, guidance, guide, steps, NFE),
    the protocol (images, reference, seeds, feature net), and every metric as `<name>`, `<name>_se`,
    `<name>_lo`, `<name>_hi`."""
    s = r.get("sampler") or {}
    row = {"sigma_rel": r.get("sigma_rel"), "nimg": r.get("nimg"), "guidance": s.get("guidance"),
           "guide": r.get("guide", "none"), "steps": s.get("steps"), "nfe": s.get("nfe"), "churn": s.get("churn"),
           "num_images": r.get("num_images"), "ref_num_images": r.get("ref_num_images"),
           "seed_sets": r.get("seed_sets", 1), "seeds": "-".join(str(x) for x in r.get("seeds") or []),
           "feature_net": r.get("feature_net"), "model_file": r.get("model_file"),
           "eval_key": r.get("eval_key") or eval_key(r), "same_as": (r.get("extra") or {}).get("same_as"),
           "samples": (r.get("extra") or {}).get("samples")}
    for name, e in record_metrics(r).items():
        lo, hi = e.get("interval") or (None, None)
        row.update({name: e["value"], f"{name}_se": e.get("se"), f"{name}_lo": lo, f"{name}_hi": hi})
        if e.get("min") is not None:
            row[f"{name}_min"] = e["min"]
    return row


def reference_text(r: dict) -> str:
    """'500 reference' or, for published statistics (no image count in the file), their file name."""
    return f"{r['ref_num_images']} reference" if r.get("ref_num_images") else f"{r.get('reference')} (published)"


def result_line(r: dict) -> str:
    lo, hi = r.get("fid_ci95") or (float("nan"), float("nan"))
    kid_part = f", KID {r['kid'] * 1e3:.2f}e-3 +- {r['kid_std'] * 1e3:.2f}e-3" if r.get("kid") is not None else ""
    return (f"{point_label(r)}: FID {r['fid']:.2f} +- {r.get('fid_se') or float('nan'):.2f} "
            f"(95% {lo:.1f}-{hi:.1f}){kid_part}  [{r['num_images']} images vs {reference_text(r)}, "
            f"NFE {r['sampler']['nfe']}{' bf16' if r['sampler'].get('amp') == 'bf16' else ''}, {r['feature_net']}"
            f"{'; ' + protocol_text(r) if r.get('seed_sets', 1) > 1 else ''}]" + _others_text(r))


def metric_notes(*records: dict) -> dict[str, list[str]]:
    """{note: [metric names]} of the records' metric entries that carry a note (e.g. precision and recall
    on too few images), each note once, in order: what every printed table says below its numbers."""
    notes: dict[str, list[str]] = {}
    for r in records:
        for name, e in record_metrics(r).items():
            if e.get("note") and name not in notes.setdefault(e["note"], []):
                notes[e["note"]].append(name)
    return notes


def _others_text(r: dict) -> str:
    """The metrics beyond FID and KID, each with its standard error."""
    parts = [f"{name} {e['value']:.4g} +- {e['se']:.2g}" if e.get("se") is not None else f"{name} {e['value']:.4g}"
             for name, e in record_metrics(r).items() if name not in ("fid", "kid")]
    return (("; " + ", ".join(parts)) if parts else "") + "".join(f" ({n})" for n in metric_notes(r))
