"""The evaluation at scale: images/s and peak memory of the evaluate stage at 1 and 2 processes for two
`metrics.num_images` (4x apart), each a fresh process tree (peak RSS of the largest process, the reference
statistics cached beforehand so only the evaluation is measured), and the projection for the paper's
protocol (3 x 50,000 images per EMA length) from this machine's rate and from the GPU sampling rate
measured on an H200 (reports/bench/gpu-h200-2026-11-30: XS, NFE 63, eager, 25.5 img/s).

`python -m benchmarks.evaluate_scale` writes reports/bench/evaluate_scale-cpu.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import parser, write

ROOT = Path(__file__).resolve().parents[1]
H200_XS_NFE63_IMG_S = 25.451          # eager bf16 sampling, batch 256 (gpu_check-sample.json)
PAPER_IMAGES = 3 * 50_000


def make_project(d: Path, smoke: bool) -> Path:
    """The default params shrunk to one small random model, on Fashion-MNIST (encoded here)."""
    import torch

    from pipeline import config as C
    from pipeline.data.encode import encode_dataset
    from pipeline.io import save_safetensors
    from pipeline.networks import build_network
    from pipeline.snapshots import RECONSTRUCTION_FORMAT
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset_dir"] = str(d / "data")
    raw["sampler"].update(steps=4 if smoke else 8, batch_size=32)
    raw["metrics"].update(ref_num_images=256, batch_size=32, shard_images=64, names=["fid"])
    raw["tracking"]["enabled"] = False
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = C.load_config(d / "params.yaml")
    encode_dataset(cfg, d / "data" / "test", "test", cache_dir=ROOT / "data" / "raw", progress=False)
    args = {"img_resolution": 32, "img_channels": 1, "label_dim": 10}
    torch.manual_seed(0)
    net = build_network(cfg, **args)
    save_safetensors(net.state_dict(), {"format": RECONSTRUCTION_FORMAT, "config": cfg.to_dict(), "net_args": args,
                                        "nimg": 128, "sigma_rel": 0.1, "gamma": 6.9},
                     d / "models" / "ema-0000000128-0.100.safetensors")
    return d / "params.yaml"


def run(d: Path, params: Path, tag: str, num_images: int, nproc: int) -> dict:
    """One evaluation in a fresh process tree: seconds, images/s, peak RSS (MB) of the largest process."""
    code = ("import resource, sys; from stages.evaluate import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "--params", str(params), "--models", str(d / "models"), "--metrics",
           str(d / f"m-{tag}"), "--samples", str(d / f"s-{tag}"), "--shards", str(d / f"sh-{tag}"), "--ref-cache",
           str(d / "ref"), "-S", f"metrics.num_images={num_images}"] + (["--nproc-per-node", str(nproc)] if nproc > 1 else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"evaluation failed: {r.stderr[-2000:]}")
    own, children = (float(x) for x in r.stdout.split("PEAK")[-1].split()[:2])
    rec = json.loads((d / f"m-{tag}" / "fid_records.json").read_text())[0]
    return {"num_images": num_images, "processes": nproc, "seconds": round(seconds, 1),
            "images_per_s": round(num_images / seconds, 2), "peak_rss_mb": round(max(own, children)),
            "fid": round(rec["fid"], 4)}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 256], help="two metrics.num_images (default 64 256)")
    args = p.parse_args(argv)
    sizes = [16, 64] if args.smoke else args.sizes
    with tempfile.TemporaryDirectory(prefix="evalscale-") as tmp:
        d = Path(tmp)
        params = make_project(d, args.smoke)
        run(d, params, "warm", 8, 1)                        # the reference statistics, once
        runs = [run(d, params, f"n{n}-p{k}", n, k) for k in (1, 2) for n in sizes]
    flat = {k: max(r["peak_rss_mb"] for r in runs if r["processes"] == k) /
            min(r["peak_rss_mb"] for r in runs if r["processes"] == k) for k in (1, 2)}
    best = max(r["images_per_s"] for r in runs if r["num_images"] == sizes[-1])
    figures = {
        "runs": runs,
        "peak_memory_ratio_largest_over_smallest": {f"{k}_process{'es' if k > 1 else ''}": round(v, 3)
                                                    for k, v in flat.items()},
        "note": "peak RSS of the largest process of each run; the generated features (8 KiB per image) are the only "
                "part that grows with metrics.num_images",
        "projection_paper_protocol": {
            "images": PAPER_IMAGES,
            "this_cpu_hours_per_ema_length": round(PAPER_IMAGES / best / 3600, 1),
            "h200_xs_nfe63_eager_hours_per_ema_length_1_gpu": round(PAPER_IMAGES / H200_XS_NFE63_IMG_S / 3600, 2),
            "h200_xs_nfe63_eager_hours_per_ema_length_8_gpus": round(PAPER_IMAGES / H200_XS_NFE63_IMG_S / 8 / 3600, 2),
            "basis": "sampling only (Inception features are a few percent on a GPU); measured H200 rate, not a "
                     "measured multi-GPU run"},
    }
    write("evaluate_scale", args, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
