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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .fid import FIDError
from .io import atomic_write_text
from .records import (FIDRecord, check_comparable, computed, is_grid, is_plain, point_key, point_label,
                      record_metrics, result_line, sampler_record)
from .stats import ranking


# ----------------------------------------------------------------------------------------------
# Models and generation (seeded per image: the result does not depend on the batch size).

def load_model(path: str | Path, device="cpu"):
    """A Precond network from a reconstructed EMA file (safetensors; its config and build arguments in
    the header). Nothing in the file can run code; a header that describes no network of this project,
    tensors of other names, shapes or types than that network's, and non-finite values are refused in
    one line naming the file and the field or tensor."""
    from .networks import build_network
    from .snapshots import load_checked_reconstruction, network_of_header
    # format, header values, tensors against the network, finite values; the header's network checked once
    data, network = load_checked_reconstruction(path, FIDError)
    cfg, args = network if network is not None else network_of_header(data, path, FIDError)[:2]
    net = build_network(cfg, **args)
    net.load_state_dict(data["state"])
    return net.eval().to(device), data


def check_unconditional_guide(meta: dict, path: str | Path) -> None:
    """guide=unconditional is the model with the zero label: only meaningful when the run trained that
    label (train.label_dropout > 0 in its record) on a class-conditional network."""
    if not (meta.get("net_args") or {}).get("label_dim"):
        raise FIDError(f"guide=unconditional needs a class-conditional model; {Path(path).name} has no labels")
    dropout = ((meta.get("config") or {}).get("train") or {}).get("label_dropout", 0)
    if not (isinstance(dropout, (int, float)) and dropout > 0):
        raise FIDError(f"guide=unconditional needs a run trained with train.label_dropout > 0; {Path(path).name} "
                       f"was trained with label_dropout={dropout}, so its zero label was never learned")


def generate(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu", progress: bool = False,
             desc: str | None = None, guide=None, decoder=None) -> np.ndarray:
    """num_images samples as one N x H x W x C uint8 array (small exports and tests; evaluations stream
    through generate_batches instead)."""
    return np.concatenate([b for _, b in generate_batches(net, num_images, seed, sampler_cfg, batch_size, device,
                                                          progress, desc, guide, decoder)])


def generate_batches(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu",
                     progress: bool = False, desc: str | None = None, guide=None, decoder=None,
                     work: int | None = None):
    """Yields (seeds, B x H x W x C uint8) batch by batch: image i uses seed `seed + i` and, for a
    conditional model, class (seed + i) % label_dim (nvidia seeding: the class EDM2 draws, edm.class_labels).
    Nothing but the current batch is held. `guide`: a guiding network, or "unconditional" (the same
    network with the zero label), used with weight sampler_cfg.guidance. Batches are sampler.batch_size
    images, halved whenever the GPU runs out of memory (the images do not change). `decoder`: samples ->
    uint8 pixels (latents.Decoder: a latent model's VAE); default the pixel one. `work`: the images of the
    whole job this call is part of (the compile decision), default num_images."""
    from .edm import class_labels, sample_images
    from .data.latents import Decoder
    from .devices import compile_wanted
    decoder = decoder or Decoder({"encoder": "pixel"}, None)
    # compile: auto -> compiled when the job's images x NFE pass the break-even (a compiled network is
    # kept on `net`, so the same network's next call does not compile again)
    sampler_cfg = sampler_cfg.model_copy(update={
        "compile": compile_wanted(sampler_cfg.compile, "sample", device, (work or num_images) * sampler_cfg.nfe)})
    net = net.eval().to(device)
    unconditional = isinstance(guide, str) and guide == "unconditional"
    if unconditional and not net.label_dim:
        raise FIDError("guide=unconditional needs a class-conditional model (this one has no labels)")
    guide_net = net if unconditional else (guide.eval().to(device) if guide is not None else None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_images, desc=desc or f"sample NFE {sampler_cfg.nfe}", unit="img", mininterval=2.0)
    i = 0
    try:
        while i < num_images:
            batch = list(range(seed + i, seed + min(i + batch_size, num_images)))
            labels = None
            if net.label_dim:
                shape = (net.img_channels, net.img_resolution, net.img_resolution)
                labels = torch.nn.functional.one_hot(class_labels(batch, net.label_dim, sampler_cfg, shape, device),
                                                     net.label_dim).float().to(device)
            try:
                x = sample_images(net, batch, labels, sampler_cfg, device=device, guide=guide_net,
                                  guide_labels=torch.zeros_like(labels) if unconditional else None)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)     # per-image seeds: the same images at any batch size
                torch.cuda.empty_cache()
                print(f"generate: out of GPU memory, sampling {batch_size} images per batch from here on")
                continue
            if not bool(torch.isfinite(x).all()):         # never quantise NaN into black images
                bad = int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())
                raise FIDError(f"{desc or 'sampling'}: {bad} of {len(batch)} samples of seeds {batch[0]}-{batch[-1]} "
                               f"came out non-finite (NaN/inf) at guidance {sampler_cfg.guidance}: the model or its "
                               f"guide diverged; nothing was written")
            yield batch, decoder(x)
            i += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------------------
# The evaluation.

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
    reference: fid.num_images samples (seeds fid.seed ...), features, FID with its bootstrap interval
    and KID, and every further metric of `refs` (metrics.references: feature groups, Inception first),
    all in the record's `metrics`; features are computed once per feature network.
    Points that are the same computation (no guide or w = 1: the unguided model) are sampled once;
    their records carry `extra.same_as`. Each result is printed when known ("k of n").

    Images stream into features batch by batch, in shards written to `shards_dir` (default: beside the
    training run, `eval-shards/`) that a rerun reuses (pipeline/shards.py). `ranks` = (rank, world): under
    torchrun each rank computes its shards, `barrier` joins them, and rank 0 alone measures and returns
    the records (the others return [])."""
    from .snapshots import check_reconstruction
    from .images import save_image_grid
    models_dir = Path(models_dir)
    f = cfg.fid
    from .fid import array_features
    from .metrics import combine_sets, group_key, measure_features
    from .shards import computation_key, file_digest, set_features, write_key_file
    rank, world = ranks
    shards_root = Path(shards_dir) if shards_dir is not None else Path(cfg.train.run_dir).parent / "eval-shards"
    feat, ref = refs[0].extractor, refs[0].ref
    steps_axis = len({q["steps"] for q in points}) > 1
    nimg_axis = any(q.get("nimg") for q in points)       # training length as a post-hoc axis
    if target_nimg is None:
        summary = models_dir / "reconstruct.json"
        target_nimg = json.loads(summary.read_text())["target_nimg"] if summary.is_file() else max(
            check_reconstruction(p)["nimg"] for p in models_dir.glob("ema-*.safetensors"))
    plan = [(p, *_files(p, models_dir, target_nimg)) for p in points]
    for _, main, guide in plan:                      # every header before any compute
        for path in (main, guide):
            if isinstance(path, Path):
                if not path.is_file():
                    raise FIDError(f"{path}: no such model (reconstruct the grid's EMA lengths and guides first: "
                                   f"the reconstruct stage makes them from evaluate.grid)")
                meta = check_reconstruction(path)
                if guide == "unconditional" and path == main:
                    check_unconditional_guide(meta, path)
    def computation(p, main, guide) -> tuple:                # what the samples depend on
        return str(main), str(guide), p["steps"], p["guidance"] if guide is not None else 1.0
    keys = list(dict.fromkeys(computation(*x) for x in plan))
    results: dict = {}                                 # computation -> (measurements, model header, grid name)
    first_key: dict = {}                               # computation -> eval_key of its first record
    records = []
    nets: dict = {}
    decoders: dict = {}                                # by the models' data settings (latents: one VAE)

    def net_of(path):
        if str(path) not in nets:
            if len(nets) >= 2:                         # a model and its guide in memory, no more
                nets.clear()
            nets[str(path)] = load_model(path, device)
        return nets[str(path)]
    for p, main, guide in plan:
        key = computation(p, main, guide)
        k = keys.index(key) + 1
        sampler = cfg.sampler.model_copy(update={"steps": p["steps"], "guidance": p["guidance"]})
        if key not in results:
            net, data = net_of(main)
            guide_obj = guide if guide in (None, "unconditional") else net_of(guide)[0]
            tag = (f"point {k}/{len(keys)} ({main.name}" + (f", w {p['guidance']:g} guide "
                   f"{_guide_label(p['guide'])}" if guide is not None else "") + ")")
            sets = []
            decoder = decoder_for(data, cfg, device, decoders)
            extract = {group_key(g): (lambda imgs, g=g: array_features(imgs, g.extractor, f.batch_size)) for g in refs}
            plain = guide is None and p["steps"] == cfg.sampler.steps
            grid_name = f"samples-{main.stem}" + ("" if plain else f"-{_slug(p, guide)}") + ".png"
            for k_set in range(f.seed_sets):                 # disjoint seed sets (method.md 8)
                set_tag = tag + (f" set {k_set + 1}/{f.seed_sets}" if f.seed_sets > 1 else "")
                seed0 = f.seed + k_set * f.num_images
                parts = {"format": 1, "model": file_digest(main), "sampler": sampler_record(sampler),
                         "guide": file_digest(guide) if isinstance(guide, Path) else guide,
                         "decoder": [(data.get("config") or {}).get("data", {}).get(k) for k in
                                     ("encoder", "latent_convention")] + [cfg.data.vae_path],
                         "features": sorted(extract), "seed": seed0, "num_images": f.num_images,
                         "shard_images": f.shard_images}
                folder = shards_root / computation_key(parts)
                if rank == 0:
                    write_key_file(folder, {**parts, "model_file": str(main), "set": k_set})

                def batches(lo, hi, seed0=seed0):
                    return generate_batches(net, hi - lo, seed0 + lo, sampler, cfg.sampler.batch_size, device,
                                            guide=guide_obj, decoder=decoder, work=f.num_images)
                feats, grid = set_features(folder, f.num_images, f.shard_images, batches, extract, rank, world,
                                           progress and rank == 0, f"{set_tag}: sample NFE {sampler.nfe} + features",
                                           barrier)
                if rank != 0:
                    continue
                sets.append(measure_features(feats, refs, f.num_images))
                if k_set == 0 and samples_dir is not None and grid is not None:
                    save_image_grid(grid, Path(samples_dir) / grid_name)
            if rank != 0:
                results[key] = None
                continue
            results[key] = (combine_sets(sets), data, grid_name)
        if rank != 0:
            continue
        m, data, grid_name = results[key]
        fid_, kid_ = m["fid"], m.get("kid") or {}
        rec = FIDRecord(
            fid=fid_["value"], feature_net=feat.name, feature_net_sha256=feat.sha256, mode=f.mode,
            num_images=f.num_images, reference=ref["reference"], reference_sha256=ref["reference_sha256"],
            ref_num_images=ref["ref_num_images"], sampler=sampler_record(sampler),
            seeds=[f.seed, f.seed + f.seed_sets * f.num_images - 1], model_file=str(main), seed_sets=f.seed_sets,
            fid_sets=fid_.get("sets"), fid_min=fid_.get("min"), sigma_rel=data.get("sigma_rel"), nimg=data.get("nimg"),
            fid_se=fid_["se"], fid_ci95=fid_["interval"], kid=kid_.get("value"), kid_std=kid_.get("se"),
            bootstrap=fid_["bootstrap"], guide=_guide_label(p["guide"]),
            metrics={name: {k: v for k, v in e.items() if k != "bootstrap"} for name, e in m.items()},
            extra={"guide_file": str(guide) if isinstance(guide, Path) else None, "samples": grid_name,
                   **({"steps_axis": True} if steps_axis else {}), **({"nimg_axis": True} if nimg_axis else {})})
        if key in first_key:
            rec.extra["same_as"] = first_key[key]          # the same computation as an earlier point
        else:
            first_key[key] = rec.to_dict()["eval_key"]
            if log is not None:
                log(f"[{k}/{len(keys)}] {result_line(rec.to_dict())}")
        records.append(rec)
    check_comparable([r.to_dict() for r in records])
    return records


def decoder_for(model_meta: dict, cfg, device, cache: dict | None = None):
    """How a model's samples become pixels: its header's data settings (a VAE latent model decodes with
    the VAE of data.vae_path and its convention). `cache`: decoders by those settings, so the models of
    one evaluation load the VAE once."""
    from .data.latents import Decoder
    data = (model_meta.get("config") or {}).get("data") or {}
    key = (data.get("encoder"), data.get("latent_convention"))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = Decoder(data, cfg.data.vae_path, device, cfg.data.dataset_dir)
    return cache[key]


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
        if have == want and all(r.get("num_images") == cfg.fid.num_images and
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


# ----------------------------------------------------------------------------------------------
# Sample export (`python -m pipeline sample`).

def check_sample_size(header: dict, num_images: int, seed: int, out: Path) -> None:
    """Refuse, before any sampling, what cannot finish: seeds past 2^63, or images that would not fit the
    free disk under `out` (uncompressed size; they are streamed there batch by batch, never all in memory)."""
    import shutil

    from .config import SEED_LIMIT
    if seed + num_images > SEED_LIMIT:
        raise FIDError(f"--seed {seed} + --num {num_images}: the seeds must stay below 2^63")
    res, _, ch = decoded_shape(header)
    need = num_images * res * res * ch
    folder = out if out.is_dir() else out.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise FIDError(f"--num {num_images} --out {out}: {num_images} images of {res}x{res}x{ch} need "
                       f"{need / 2**20:,.1f} MiB, more than the {free / 2**20:,.1f} MiB of free disk; "
                       f"ask for fewer, or free space")


def export_samples(model_file: str | Path, num_images: int, out: str | Path, sampler_cfg, seed: int = 0,
                   batch_size: int = 64, device="cpu", guide: str | Path | None = None, progress: bool = True,
                   cfg=None) -> Path:
    """num_images samples of a reconstructed model (image i: seed `seed + i`, class (seed + i) %
    label_dim) written as PNG files `<seed>.png` into a folder, or as one .npz (images N x H x W x C
    uint8, seeds, labels). `guide`: a model file or "unconditional", with weight sampler_cfg.guidance.
    `cfg`: the params whose data.vae_path decodes a latent model's samples."""
    from PIL import Image

    from .io import check_writable
    from .snapshots import check_reconstruction
    out = Path(out)
    check_writable(out, "--out", folder=out.suffix != ".npz")
    header = check_reconstruction(model_file)
    check_sample_size(header, num_images, seed, out)
    if guide == "unconditional":
        check_unconditional_guide(header, model_file)
    net, meta = load_model(model_file, device)
    guide_net = guide if guide in (None, "unconditional") else load_model(guide, device)[0]
    batches = generate_batches(net, num_images, seed, sampler_cfg, batch_size, device, progress,
                               desc=f"sample {Path(model_file).name} NFE {sampler_cfg.nfe}", guide=guide_net,
                               decoder=decoder_for(meta, cfg, device) if cfg is not None else None)
    seeds = np.arange(seed, seed + num_images)
    labels = np.full(num_images, -1)
    if net.label_dim:
        from .edm import class_labels
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        labels = class_labels(seeds.tolist(), net.label_dim, sampler_cfg, shape, device).numpy()
    if out.suffix == ".npz":                       # streamed into the archive batch by batch
        from .io import atomic_write
        shape = (num_images, *decoded_shape(meta))
        return atomic_write(out, lambda f: _write_npz_stream(f, batches, shape, seeds, labels))
    out.mkdir(parents=True, exist_ok=True)
    for batch_seeds, images in batches:
        for im, s in zip(images, batch_seeds):
            Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(out / f"{s:06d}.png")
    return out


def decoded_shape(meta: dict) -> tuple[int, int, int]:
    """H x W x C of a model's decoded samples (a VAE model's: 8x its latent size, RGB)."""
    args, data = meta.get("net_args") or {}, (meta.get("config") or {}).get("data") or {}
    res, ch = int(args.get("img_resolution", 0) or 0), int(args.get("img_channels", 0) or 0)
    return (res * 8, res * 8, 3) if data.get("encoder") == "vae" else (res, res, ch)


def _write_npz_stream(f, batches, shape, seeds, labels) -> None:
    """An .npz (zip of .npy) whose `images` array is written batch by batch: np.load reads it as savez's."""
    import zipfile
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as npy:
            np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": shape})
            written = 0
            for _, images in batches:
                if tuple(images.shape[1:]) != tuple(shape[1:]):
                    raise FIDError(f"decoded images are {images.shape[1:]}, expected {shape[1:]}")
                npy.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
                written += len(images)
            if written != shape[0]:
                raise FIDError(f"{written} images written, {shape[0]} expected")
        for name, arr in (("seeds", seeds), ("labels", labels)):
            with zf.open(f"{name}.npy", "w") as g:
                np.lib.format.write_array(g, np.asarray(arr), allow_pickle=False)
