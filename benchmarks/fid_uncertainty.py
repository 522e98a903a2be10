"""FID uncertainty on a trained model: the half-sampling bootstrap standard error of FID at several
numbers of generated images (the same seeds the evaluate stage uses: image i has seed metrics.seed + i),
and what the statistics cost next to generating and measuring the images.

Generates max(--sizes) images once; the FID at n uses the first n of them."""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import parser, write
from pipeline import config as C
from pipeline.data.encoded import EncodedDataset
from pipeline.generation import generate, load_model
from pipeline.fid import array_features, load_feature_net, measure, reference_dataset_dir, reference_stats


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", help="a reconstructed EMA model (default: the best one in metrics/fid.json)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--ref-cache", default="data/fid-ref")
    args = p.parse_args(argv)
    cfg = C.load_config(args.params)
    sizes = [4, 8] if args.smoke else sorted(args.sizes)
    model = args.model
    if model is None:
        import json
        best = json.loads(Path("metrics/fid.json").read_text())["sigma_rel"]
        model = next(str(f) for f in sorted(Path("models/ema").glob("ema-*.safetensors")) if f"-{best:.3f}." in f.name)
    feat = load_feature_net(cfg.metrics.feature_net, args.device)
    ref = reference_stats(EncodedDataset(reference_dataset_dir(cfg)), feat, cfg.metrics.ref_num_images, args.ref_cache,
                          cfg.metrics.batch_size, progress=False)
    net, meta = load_model(model, args.device)
    sampler = cfg.sampler.model_copy(update={"steps": 2}) if args.smoke else cfg.sampler
    t = time.perf_counter()
    images = generate(net, max(sizes), cfg.metrics.seed, sampler, cfg.sampler.batch_size, args.device, progress=True)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    feats = array_features(images, feat, cfg.metrics.batch_size, progress=True)
    t_feat = time.perf_counter() - t
    from pipeline.stats import ReferenceStats
    t = time.perf_counter()
    ref["_prepared"] = ReferenceStats(ref["mu"], ref["sigma"])       # once per evaluation, for every model
    t_prep = time.perf_counter() - t
    rows = []
    for n in sizes:
        t = time.perf_counter()
        m = measure(feats[:n], ref, n)
        rows.append({"num_images": n, "fid": round(m["fid"], 3), "fid_se": round(m["fid_se"], 3),
                     "fid_ci95": [round(v, 2) for v in m["fid_ci95"]], "kid": m.get("kid"),
                     "stats_seconds": round(time.perf_counter() - t, 2)})
        print(rows[-1], flush=True)
    n0 = sizes[0]
    per_image = (t_gen + t_feat) / max(sizes)
    write("fid_uncertainty", args, {
        "model": Path(model).name, "sigma_rel": meta.get("sigma_rel"), "nfe": sampler.nfe,
        "reference": f"{ref['ref_num_images']} images of {ref['reference']}", "feature_net": feat.name,
        "bootstrap": "half-sampling, 200 resamples, reference held fixed", "by_num_images": rows,
        "generate_and_features_s_per_image": round(per_image, 4), "reference_prepare_s": round(t_prep, 2),
        "stats_cost_fraction_at_first_size": round(rows[0]["stats_seconds"] / (rows[0]["stats_seconds"] + per_image * n0), 3),
    })


if __name__ == "__main__":
    main()
