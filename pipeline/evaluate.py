"""Evaluating models: generate images from each model, measure them against one reference (FID with
its bootstrap interval, KID), and rank the results saying what is resolved. The evaluate stage and
every sweep trial call this one module.

Every stored result is a record carrying what it depends on (feature network and its hash, mode,
number of generated images, reference identity and n, sampler, seeds, model file, EMA length) and
its uncertainty; results are compared only when their records match.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .fid import FIDError, FeatureNet, array_features, measure
from .io import atomic_write_text
from .records import FIDRecord, check_comparable, result_line, sampler_record
from .stats import ranking


# ----------------------------------------------------------------------------------------------
# Models and generation (seeded per image: the result does not depend on the batch size).

def load_model(path: str | Path, device="cpu"):
    """A Precond network from a reconstructed EMA file (safetensors; its config and build arguments in
    the header). Nothing in the file can run code."""
    from .config import resolve
    from .networks import build_network
    from .phema import load_reconstruction
    data = load_reconstruction(path)
    if not data.get("net_args"):
        raise FIDError(f"{path}: carries no network build arguments (not written by the training stage)")
    cfg = resolve({k: v for k, v in data["config"].items() if k != "preset"})
    net = build_network(cfg, **data["net_args"])
    net.load_state_dict(data["state"])
    return net.eval().to(device), data


def generate(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu", progress: bool = False,
             desc: str | None = None, guide=None):
    """num_images samples as N x H x W x C uint8; image i uses seed `seed + i` and, for a
    conditional model, class (seed + i) % label_dim. `guide`: a guiding network, or "unconditional"
    (the same network with the zero label), used with weight sampler_cfg.guidance."""
    from .data import decode_pixels
    from .edm import sample_images
    net = net.eval().to(device)
    unconditional = isinstance(guide, str) and guide == "unconditional"
    if unconditional and not net.label_dim:
        raise FIDError("guide=unconditional needs a class-conditional model (this one has no labels)")
    guide_net = net if unconditional else (guide.eval().to(device) if guide is not None else None)
    seeds = list(range(seed, seed + num_images))
    out = []
    rng = range(0, num_images, batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc=desc or f"sample NFE {sampler_cfg.nfe}", unit="batch", mininterval=2.0)
    for i in rng:
        batch = seeds[i:i + batch_size]
        labels = None
        if net.label_dim:
            labels = torch.nn.functional.one_hot(torch.tensor(batch) % net.label_dim, net.label_dim).float().to(device)
        x = sample_images(net, batch, labels, sampler_cfg, device=device, guide=guide_net,
                          guide_labels=torch.zeros_like(labels) if unconditional else None)
        out.append(decode_pixels(x).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# The evaluation.

def evaluate_models(model_files: Sequence[str | Path], cfg, ref: dict, feat: FeatureNet, samples_dir=None,
                    device="cpu", progress: bool = True, log=print) -> list[FIDRecord]:
    """One record per model: fid.num_images samples (seeds fid.seed ...), Inception features, FID with
    its bootstrap interval and KID; each result is printed as soon as it is known ("k of n")."""
    from .report import save_image_grid
    f = cfg.fid
    records = []
    for k, path in enumerate(model_files, 1):
        net, data = load_model(path, device)
        tag = f"model {k}/{len(model_files)} ({Path(path).name})"
        images = generate(net, f.num_images, f.seed, cfg.sampler, cfg.sampler.batch_size, device, progress,
                          desc=f"{tag}: sample NFE {cfg.sampler.nfe}")
        feats = array_features(images, feat, f.batch_size, progress=progress, desc=f"{tag}: features")
        m = measure(feats, ref, f.num_images)
        if samples_dir is not None:
            save_image_grid(images[:64], Path(samples_dir) / f"samples-{Path(path).stem}.png")
        rec = FIDRecord(
            fid=m["fid"], feature_net=feat.name, feature_net_sha256=feat.sha256, mode=f.mode, num_images=len(images),
            reference=ref["reference"], reference_sha256=ref["reference_sha256"], ref_num_images=ref["ref_num_images"],
            sampler=sampler_record(cfg.sampler), seeds=[f.seed, f.seed + f.num_images - 1], model_file=str(path),
            sigma_rel=data.get("sigma_rel"), nimg=data.get("nimg"), fid_se=m["fid_se"], fid_ci95=m["fid_ci95"],
            kid=m.get("kid"), kid_std=m.get("kid_std"), bootstrap=m["bootstrap"])
        records.append(rec)
        if log is not None:
            log(f"[{k}/{len(model_files)}] {result_line(rec.to_dict())}")
        del net
    check_comparable([r.to_dict() for r in records])
    return records


def write_metrics(records: Sequence[FIDRecord | dict], metrics_dir: str | Path) -> dict:
    """`fid.json` for `dvc metrics show` (FID, its standard error and KID per EMA length, the best and
    what is tied with it), `fid_vs_ema.csv` for `dvc plots`, `fid_records.json` in full."""
    out = Path(metrics_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((r.to_dict() if isinstance(r, FIDRecord) else r for r in records), key=lambda r: r["sigma_rel"] or 0)
    rk = ranking(rows)
    best = rows[rk["best"]]
    metrics = {"fid": {f"ema_{r['sigma_rel']:.3f}": round(r["fid"], 4) for r in rows},
               "fid_se": {f"ema_{r['sigma_rel']:.3f}": round(r["fid_se"], 4) for r in rows},
               "kid": {f"ema_{r['sigma_rel']:.3f}": round(r["kid"], 6) for r in rows if r.get("kid") is not None},
               "best_fid": round(best["fid"], 4), "best_fid_se": round(best["fid_se"], 4),
               "best_sigma_rel": best["sigma_rel"], "best_kid": best.get("kid"),
               "tied_with_best": rk["tied_with_best"], "best_at_edge": rk["edge"],
               "num_images": best["num_images"], "ref_num_images": best["ref_num_images"],
               "feature_net": best["feature_net"], "nfe": best["sampler"]["nfe"]}
    atomic_write_text(json.dumps(metrics, indent=2), out / "fid.json")
    atomic_write_text("sigma_rel,fid,fid_lo,fid_hi,kid\n" + "".join(
        f"{r['sigma_rel']:.3f},{r['fid']:.4f},{r['fid_ci95'][0]:.4f},{r['fid_ci95'][1]:.4f},{r.get('kid') or ''}\n"
        for r in rows), out / "fid_vs_ema.csv")
    atomic_write_text(json.dumps(rows, indent=2), out / "fid_records.json")
    return {**metrics, "ranking": rk}


def evaluate_run(cfg, snapshot_dir: str | Path, out_dir: str | Path, ref_cache: str | Path, device="cpu",
                 progress: bool = False) -> list[dict]:
    """One training run's post-hoc EMA fan-out: reconstruct every cfg.ema.targets into out_dir/ema,
    then evaluate each against the reference (cached in ref_cache). Records are kept in
    out_dir/fid_records.json; a second call with the same settings reuses them."""
    from .data import EncodedDataset
    from .fid import load_feature_net, reference_dataset_dir, reference_stats
    from .phema import reconstruct
    out_dir = Path(out_dir)
    summary = reconstruct(snapshot_dir, cfg.ema.targets, out_dir=out_dir / "ema")
    records_file = out_dir / "fid_records.json"
    files = [out_dir / "ema" / t["file"] for t in summary["targets"]]
    if records_file.is_file():
        records = json.loads(records_file.read_text())
        if sorted(Path(r["model_file"]).name for r in records) == sorted(f.name for f in files) and \
                all(r.get("sampler") == sampler_record(cfg.sampler) and r.get("num_images") == cfg.fid.num_images
                    for r in records):
            return records
    feat = load_feature_net(cfg.fid.feature_net, str(device))
    ref = reference_stats(EncodedDataset(reference_dataset_dir(cfg)), feat, cfg.fid.ref_num_images, ref_cache,
                          cfg.fid.batch_size, progress=progress)
    records = [r.to_dict() for r in evaluate_models(files, cfg, ref, feat, out_dir / "samples", device, progress,
                                                     log=None)]
    atomic_write_text(json.dumps(records, indent=2), records_file)
    return records


# ----------------------------------------------------------------------------------------------
# Sample export (`python -m pipeline sample`).

def export_samples(model_file: str | Path, num_images: int, out: str | Path, sampler_cfg, seed: int = 0,
                   batch_size: int = 64, device="cpu", guide: str | Path | None = None, progress: bool = True) -> Path:
    """num_images samples of a reconstructed model (image i: seed `seed + i`, class (seed + i) %
    label_dim) written as PNG files `<seed>.png` into a folder, or as one .npz (images N x H x W x C
    uint8, seeds, labels). `guide`: a model file or "unconditional", with weight sampler_cfg.guidance."""
    from PIL import Image
    out = Path(out)
    net, _ = load_model(model_file, device)
    guide_net = guide if guide in (None, "unconditional") else load_model(guide, device)[0]
    images = generate(net, num_images, seed, sampler_cfg, batch_size, device, progress,
                      desc=f"sample {Path(model_file).name} NFE {sampler_cfg.nfe}", guide=guide_net)
    seeds = np.arange(seed, seed + num_images)
    labels = seeds % net.label_dim if net.label_dim else np.full(num_images, -1)
    if out.suffix == ".npz":
        from .io import atomic_write
        return atomic_write(out, lambda f: np.savez(f, images=images, seeds=seeds, labels=labels))
    out.mkdir(parents=True, exist_ok=True)
    for im, s in zip(images, seeds):
        Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(out / f"{s:06d}.png")
    return out
