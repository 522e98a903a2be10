"""Evaluating models: generate images from each model, measure them against one reference (FID with
its bootstrap interval, KID), and rank the results saying what is resolved. The evaluate stage and
every sweep trial call this one module.

Every stored result is a record carrying what it depends on (feature network and its hash, mode,
number of generated images, reference identity and n, sampler, seeds, model file, EMA length) and
its uncertainty; results are compared only when their records match.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .fid import FIDError
from .io import atomic_write_text
from .records import (FIDRecord, check_comparable, computed, is_grid, is_plain, point_key, point_label,
                      record_metrics, result_line, sampler_record)
from .stats import ranking

from .generation import check_unconditional_guide, decoder_for, generate_batches, load_model


def evaluation_points(cfg) -> list[dict]:
    """The post-hoc points of cfg.evaluate.grid, every combination of its axes (default: ema.targets
    at the sampler's settings, unguided). guide none, or w = 1, is the unguided model (method.md 5)."""
    g = cfg.evaluate.grid
    sigma = (g.sigma_rel if g is not None and g.sigma_rel else cfg.ema.targets)
    weights = g.guidance if g is not None else [cfg.sampler.guidance]
    guides = g.guide if g is not None else ["none"]
    steps = g.steps if g is not None and g.steps else [cfg.sampler.steps]
    lengths = g.nimg if g is not None and g.nimg else [None]          # None: the final training time
    return [{"sigma_rel": float(s), "guide": gd, "guidance": float(w), "steps": int(n), "nimg": t}
            for t in lengths for s in sigma for gd in guides for w in weights for n in steps]


def reconstruction_targets(cfg) -> list:
    """What the reconstruct stage makes for the grid, in one pass: each main EMA length at the final
    time, and each guide that is a reconstruction of the run ((nimg, sigma_rel), or sigma_rel)."""
    from .config import GuideSpec
    out = []
    for p in evaluation_points(cfg):
        t = p.get("nimg")                                   # a training length of the grid, else the final time
        out.append((t, p["sigma_rel"]) if t is not None else p["sigma_rel"])
        g = p["guide"]
        if isinstance(g, GuideSpec) and g.file is None:
            nimg, s = g.target(p["sigma_rel"])
            nimg = nimg if nimg is not None else t
            out.append((nimg, s) if nimg is not None else s)
    return list(dict.fromkeys(out))


def _guide_label(guide) -> str:
    return guide if isinstance(guide, str) else guide.label()


def _files(point: dict, models_dir: Path, T: int) -> tuple[Path, object]:
    """(main model file, guide: None | "unconditional" | model file) of one point."""
    from .config import GuideSpec
    from .reconstruction import reconstruction_name
    T = point.get("nimg") or T                          # a point at an earlier training length
    main = models_dir / reconstruction_name(T, point["sigma_rel"])
    g = point["guide"]
    if g == "none" or point["guidance"] == 1.0:
        return main, None
    if g == "unconditional":
        return main, "unconditional"
    assert isinstance(g, GuideSpec)
    if g.file is not None:
        return main, Path(g.file)
    nimg, s = g.target(point["sigma_rel"])
    return main, models_dir / reconstruction_name(nimg if nimg is not None else T, s)


def evaluate_points(points: Sequence[dict], models_dir: str | Path, cfg, refs: Sequence[tuple],
                    samples_dir=None, device="cpu", progress: bool = True, log=print,
                    target_nimg: int | None = None, shards_dir: str | Path | None = None,
                    ranks: tuple[int, int] = (0, 1), barrier=None) -> list[FIDRecord]:
    """One record per post-hoc point (EMA length, guide, guidance weight, steps) against one
    reference: metrics.num_images samples (seeds metrics.seed ...), features, FID with its bootstrap interval
    and KID, and every further metric of `refs` (metrics.references: feature groups, Inception first),
    all in the record's `metrics`; features are computed once per feature network.
    Points that are the same computation (no guide or w = 1: the unguided model) are sampled once;
    their records carry `extra.same_as`. Each result is printed when known ("k of n").

    Images stream into features batch by batch, in shards written to `shards_dir` (default: beside the
    training run, `eval-shards/`) that a rerun reuses (pipeline/shards.py). `ranks` = (rank, world): under
    torchrun each rank computes its shards, `barrier` joins them, and rank 0 alone measures and returns
    the records (the others return [])."""
    models_dir = Path(models_dir)
    if target_nimg is None:
        target_nimg = _final_nimg(models_dir)
    plan = [(p, *_files(p, models_dir, target_nimg)) for p in points]
    _check_models(plan)                                  # every header before any compute
    run = _Evaluation(cfg, refs, device, progress, ranks, barrier, samples_dir,
                      Path(shards_dir) if shards_dir is not None else Path(cfg.train.run_dir).parent / "eval-shards")
    keys = list(dict.fromkeys(_computation(*x) for x in plan))
    axes = {**({"steps_axis": True} if len({q["steps"] for q in points}) > 1 else {}),
            **({"nimg_axis": True} if any(q.get("nimg") for q in points) else {})}   # training length as an axis
    results: dict = {}                                 # computation -> (measurements, model header, grid name)
    first_key: dict = {}                               # computation -> eval_key of its first record
    records = []
    for p, main, guide in plan:
        key = _computation(p, main, guide)
        k = keys.index(key) + 1
        sampler = cfg.sampler.model_copy(update={"steps": p["steps"], "guidance": p["guidance"]})
        if key not in results:
            tag = (f"point {k}/{len(keys)} ({main.name}" + (f", w {p['guidance']:g} guide "
                   f"{_guide_label(p['guide'])}" if guide is not None else "") + ")")
            results[key] = run.measure(p, main, guide, sampler, tag)
        if run.rank != 0:
            continue
        rec = _record(cfg.metrics, refs[0], p, main, guide, sampler, *results[key], axes)
        if key in first_key:
            rec.extra["same_as"] = first_key[key]          # the same computation as an earlier point
        else:
            first_key[key] = rec.to_dict()["eval_key"]
            if log is not None:
                log(f"[{k}/{len(keys)}] {result_line(rec.to_dict())}")
        records.append(rec)
    check_comparable([r.to_dict() for r in records])
    return records


def _final_nimg(models_dir: Path) -> int:
    """The training length the reconstructed models of a folder are at (its reconstruct.json, else the newest)."""
    from .snapshots import check_reconstruction
    summary = models_dir / "reconstruct.json"
    if summary.is_file():
        return json.loads(summary.read_text())["target_nimg"]
    return max(check_reconstruction(p)["nimg"] for p in models_dir.glob("ema-*.safetensors"))


def _check_models(plan) -> None:
    """Every model and guide file of the plan exists and has a valid header (before any compute)."""
    from .snapshots import check_reconstruction
    for _, main, guide in plan:
        for path in (main, guide):
            if isinstance(path, Path):
                if not path.is_file():
                    raise FIDError(f"{path}: no such model (reconstruct the grid's EMA lengths and guides first: "
                                   f"the reconstruct stage makes them from evaluate.grid)")
                meta = check_reconstruction(path)
                if guide == "unconditional" and path == main:
                    check_unconditional_guide(meta, path)


def _computation(p: dict, main: Path, guide) -> tuple:
    """What a point's samples depend on: points with the same tuple share one computation."""
    return str(main), str(guide), p["steps"], p["guidance"] if guide is not None else 1.0


@dataclass
class _Evaluation:
    """One evaluate_points call's settings and what it keeps loaded between points."""
    cfg: object
    refs: Sequence
    device: object
    progress: bool
    ranks: tuple[int, int]                             # (rank, world) under torchrun
    barrier: Callable | None
    samples_dir: str | Path | None
    shards_root: Path
    nets: dict = field(default_factory=dict)           # model file -> (network, header): a model and its guide
    decoders: dict = field(default_factory=dict)       # by the models' data settings (latents: one VAE)

    @property
    def rank(self) -> int:
        return self.ranks[0]

    def net_of(self, path):
        if str(path) not in self.nets:
            if len(self.nets) >= 2:                     # a model and its guide in memory, no more
                self.nets.clear()
            self.nets[str(path)] = load_model(path, self.device)
        return self.nets[str(path)]

    def measure(self, p: dict, main: Path, guide, sampler, tag: str):
        """One computation: its seed sets sampled into feature shards, measured (rank 0), the first set's
        sample grid saved. Returns (measurements, model header, grid name); None on other ranks."""
        from .fid import array_features
        from .images import save_image_grid
        from .metrics import combine_sets, group_key, measure_features
        from .shards import computation_key, file_digest, set_features, write_key_file
        f, (rank, world) = self.cfg.metrics, self.ranks
        net, data = self.net_of(main)
        guide_obj = guide if guide in (None, "unconditional") else self.net_of(guide)[0]
        decoder = decoder_for(data, self.cfg, self.device, self.decoders)
        extract = {group_key(g): (lambda imgs, g=g: array_features(imgs, g.extractor, f.batch_size)) for g in self.refs}
        plain = guide is None and p["steps"] == self.cfg.sampler.steps
        grid_name = f"samples-{main.stem}" + ("" if plain else f"-{_slug(p, guide)}") + ".png"
        sets = []
        for k_set in range(f.seed_sets):                 # disjoint seed sets (method.md 8)
            set_tag = tag + (f" set {k_set + 1}/{f.seed_sets}" if f.seed_sets > 1 else "")
            seed0 = f.seed + k_set * f.num_images
            parts = {"format": 1, "model": file_digest(main), "sampler": sampler_record(sampler),
                     "guide": file_digest(guide) if isinstance(guide, Path) else guide,
                     "decoder": [(data.get("config") or {}).get("data", {}).get(k) for k in
                                 ("encoder", "latent_convention")] + [self.cfg.data.vae_path],
                     "features": sorted(extract), "seed": seed0, "num_images": f.num_images,
                     "shard_images": f.shard_images}
            folder = self.shards_root / computation_key(parts)
            if rank == 0:
                write_key_file(folder, {**parts, "model_file": str(main), "set": k_set})

            def batches(lo, hi, seed0=seed0):
                return generate_batches(net, hi - lo, seed0 + lo, sampler, self.cfg.sampler.batch_size, self.device,
                                        guide=guide_obj, decoder=decoder, work=f.num_images)
            feats, grid = set_features(folder, f.num_images, f.shard_images, batches, extract, rank, world,
                                       self.progress and rank == 0,
                                       f"{set_tag}: sample NFE {sampler.nfe} + features", self.barrier)
            if rank != 0:
                continue
            sets.append(measure_features(feats, self.refs, f.num_images))
            if k_set == 0 and self.samples_dir is not None and grid is not None:
                save_image_grid(grid, Path(self.samples_dir) / grid_name)
        return (combine_sets(sets), data, grid_name) if rank == 0 else None


def _record(f, ref_group, p: dict, main: Path, guide, sampler, m: dict, data: dict, grid_name: str,
            axes: dict) -> FIDRecord:
    """The record of one point: its measurements `m` with everything they depend on."""
    feat, ref = ref_group.extractor, ref_group.ref
    fid_, kid_ = m["fid"], m.get("kid") or {}
    return FIDRecord(
        fid=fid_["value"], feature_net=feat.name, feature_net_sha256=feat.sha256, mode=f.mode,
        num_images=f.num_images, reference=ref["reference"], reference_sha256=ref["reference_sha256"],
        ref_num_images=ref["ref_num_images"], sampler=sampler_record(sampler),
        seeds=[f.seed, f.seed + f.seed_sets * f.num_images - 1], model_file=str(main), seed_sets=f.seed_sets,
        fid_sets=fid_.get("sets"), fid_min=fid_.get("min"), sigma_rel=data.get("sigma_rel"), nimg=data.get("nimg"),
        fid_se=fid_["se"], fid_ci95=fid_["interval"], kid=kid_.get("value"), kid_std=kid_.get("se"),
        bootstrap=fid_["bootstrap"], guide=_guide_label(p["guide"]),
        metrics={name: {k: v for k, v in e.items() if k != "bootstrap"} for name, e in m.items()},
        extra={"guide_file": str(guide) if isinstance(guide, Path) else None, "samples": grid_name, **axes})


def _slug(point: dict, guide) -> str:
    g = "none" if guide is None else ("uncond" if guide == "unconditional" else Path(str(guide)).stem)
    return f"w{point['guidance']:g}-{g}-n{point['steps']}"


def evaluate_models(model_files: Sequence[str | Path], cfg, refs: Sequence[tuple], samples_dir=None,
                    device="cpu", progress: bool = True, log=print, shards_dir=None, ranks=(0, 1),
                    barrier=None) -> list[FIDRecord]:
    """One record per model file at the sampler's settings, unguided (evaluate_points over them)."""
    from .snapshots import check_reconstruction
    records = []
    folders: dict = {}
    for path in model_files:
        folders.setdefault(Path(path).parent, []).append(check_reconstruction(path))
    for folder, metas in folders.items():
        for T in sorted({m["nimg"] for m in metas}):
            points = [{"sigma_rel": m["sigma_rel"], "guide": "none", "guidance": 1.0, "steps": cfg.sampler.steps}
                      for m in metas if m["nimg"] == T]
            records += evaluate_points(points, folder, cfg, refs, samples_dir, device, progress, log, target_nimg=T,
                                       shards_dir=shards_dir, ranks=ranks, barrier=barrier)
    check_comparable([r.to_dict() for r in records])
    return records


def write_metrics(records: Sequence[FIDRecord | dict], metrics_dir: str | Path) -> dict:
    """`fid.json` for `dvc metrics show` / `dvc exp show`: the headline only, flat and few keys (the best
    FID with its 95 % interval, its EMA length, KID, whether the best is resolved); `fid_points.json`:
    every metric per post-hoc point, what is tied with the best, edge notes; `fid_vs_ema.csv`: the data
    behind the figure; `fid_records.json` in full."""
    out = Path(metrics_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((r.to_dict() if isinstance(r, FIDRecord) else r for r in records),
                  key=lambda r: (not is_plain(r), r["sigma_rel"] or 0, point_key(r)))
    distinct = computed(rows)
    rk = ranking(distinct, label=point_label)
    best = distinct[rk["best"]]
    metrics = {"fid": {point_key(r): round(r["fid"], 4) for r in rows},
               "fid_se": {point_key(r): round(r["fid_se"], 4) for r in rows},
               "kid": {point_key(r): round(r["kid"], 6) for r in rows if r.get("kid") is not None},
               "best_fid": round(best["fid"], 4), "best_fid_se": round(best["fid_se"], 4),
               "best_sigma_rel": best["sigma_rel"], "best_kid": best.get("kid"),
               "tied_with_best": rk["tied_with_best"], "best_at_edge": rk["edge"],
               "num_images": best["num_images"], "ref_num_images": best["ref_num_images"],
               "feature_net": best["feature_net"], "nfe": best["sampler"]["nfe"]}
    for name in sorted({n for r in rows for n in record_metrics(r)} - {"fid", "kid"}):   # the other metrics
        metrics[name] = {point_key(r): round(record_metrics(r)[name]["value"], 4) for r in rows
                         if name in record_metrics(r)}
    if best.get("seed_sets", 1) > 1:                             # the paper's reporting beside ours
        metrics.update(seed_sets=best["seed_sets"], best_fid_min=round(best["fid_min"], 4),
                       fid_min={point_key(r): round(r["fid_min"], 4) for r in rows})
    if is_grid(rows):                                            # the best point's other axes
        metrics.update(best_guidance=best["sampler"]["guidance"], best_guide=best.get("guide", "none"),
                       best_steps=best["sampler"]["steps"])
    lo, hi = best.get("fid_ci95") or (None, None)
    # The best point only, short keys: with metrics/train.json's two, `dvc metrics show` fits 120 columns.
    headline = {"fid": round(best["fid"], 2), "fid_lo": None if lo is None else round(lo, 2),
                "fid_hi": None if hi is None else round(hi, 2), "sigma_rel": best["sigma_rel"],
                "kid": None if best.get("kid") is None else round(best["kid"], 4),
                "tied": len(rk["tied_with_best"])}       # points not distinguishable from the best (0: resolved)
    atomic_write_text(json.dumps(headline, indent=2), out / "fid.json")
    atomic_write_text(json.dumps(metrics, indent=2), out / "fid_points.json")
    atomic_write_text("sigma_rel,fid,fid_lo,fid_hi,kid,guidance,guide,steps\n" + "".join(
        f"{r['sigma_rel']:.3f},{r['fid']:.4f},{r['fid_ci95'][0]:.4f},{r['fid_ci95'][1]:.4f},{r.get('kid') or ''},"
        f"{r['sampler']['guidance']:g},{r.get('guide', 'none')},{r['sampler']['steps']}\n"
        for r in rows), out / "fid_vs_ema.csv")
    atomic_write_text(json.dumps(rows, indent=2), out / "fid_records.json")
    return {**metrics, "ranking": rk}


def evaluate_run(cfg, snapshot_dir: str | Path, out_dir: str | Path, ref_cache: str | Path, device="cpu",
                 progress: bool = False) -> list[dict]:
    """One training run's post-hoc fan-out, no retraining: reconstruct the grid's EMA lengths and
    guides (cfg.evaluate.grid, default ema.targets) into out_dir/ema in one pass, then evaluate every
    point against the reference (cached in ref_cache). Records are kept in out_dir/fid_records.json; a
    second call with the same points and settings reuses them (what a retried sweep trial needs)."""
    from .reconstruction import reconstruct
    from .metrics import metric_names, references
    from .records import SAMPLER_AXES
    out_dir = Path(out_dir)
    summary = reconstruct(snapshot_dir, reconstruction_targets(cfg), out_dir=out_dir / "ema")
    points = evaluation_points(cfg)
    T = summary["target_nimg"]
    records_file = out_dir / "fid_records.json"

    def ident(model: str, guide: str, w: float, steps: int) -> str:
        return json.dumps([Path(model).name, guide, w, steps])
    want = sorted(ident(_files(p, out_dir / "ema", T)[0], _guide_label(p["guide"]), p["guidance"], p["steps"])
                  for p in points)
    fixed = {k: v for k, v in sampler_record(cfg.sampler).items() if k not in SAMPLER_AXES}
    from .records import RecordError, read_records
    try:
        records = read_records(records_file) if records_file.is_file() else None
    except RecordError as err:                               # a torn or foreign file is never taken as done
        print(f"note: {err}; evaluating again", file=sys.stderr)
        records = None
    if records is not None:
        have = sorted(ident(r["model_file"], r.get("guide", "none"), r["sampler"]["guidance"], r["sampler"]["steps"])
                      for r in records)
        if have == want and all(r.get("num_images") == cfg.metrics.num_images and
                                set(record_metrics(r)) == set(metric_names(cfg)) and
                                {k: v for k, v in r["sampler"].items() if k not in SAMPLER_AXES} == fixed
                                for r in records):
            return records
    refs = references(cfg, str(device), ref_cache, progress)
    records = [r.to_dict() for r in evaluate_points(points, out_dir / "ema", cfg, refs, out_dir / "samples",
                                                     device, progress, log=None, target_nimg=T,
                                                     shards_dir=out_dir / "eval-shards")]
    atomic_write_text(json.dumps(records, indent=2), records_file)
    return records

