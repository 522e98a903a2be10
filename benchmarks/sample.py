"""Sampling throughput (images/s) at NFE 35 (18 Heun steps) and NFE 63 (32 steps)."""
from __future__ import annotations


import torch

from benchmarks.common import parser, sync, write
from benchmarks.train import SHAPES
from pipeline import config as C
from pipeline.edm import sample_images
from pipeline.networks import build_network


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=["small", "xs64"], choices=sorted(SHAPES))
    p.add_argument("--batch", type=int)
    p.add_argument("--amp", action="store_true", help="bf16 autocast of the network")
    p.add_argument("--compile", action="store_true", help="also measure sampler.compile (torch.compile; CUDA graphs "
                   "on a GPU); the same as --modes eager cudagraph on a GPU, eager compile on a CPU")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile", "cudagraph"],
                   help="eager, torch.compile (default mode) and/or CUDA graphs (mode reduce-overhead; GPU only)")
    args = p.parse_args(argv)
    import time

    from pipeline.devices import maybe_compile
    gpu = args.device.startswith("cuda")
    modes = args.modes or (["eager", "cudagraph" if gpu else "compile"] if args.compile else ["eager"])
    runs = []
    for shape in args.shapes:
        raw, res, ch, labels = SHAPES[shape]
        over = {"network.model_channels": 16, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                "network.attn_resolutions": [res // 2], "network.channels_per_head": 16} if args.smoke else {}
        cfg = C.resolve(raw, over)
        net = build_network(cfg, res, ch, labels).to(args.device).eval()
        batch = args.batch or (2 if args.smoke else 256 if gpu else 16)
        y = torch.nn.functional.one_hot(torch.arange(batch) % labels, labels).float().to(args.device)
        reference = {}
        for mode in modes:                               # compiled once per mode, then timed at each NFE
            if mode == "cudagraph" and not gpu:
                runs.append({"shape": shape, "mode": mode, "skipped": "CUDA graphs need a GPU"})
                continue
            net.__dict__.pop("_sampling_compiled", None)
            if mode != "eager":
                object.__setattr__(net, "_sampling_compiled", maybe_compile(
                    net, True, what="sampling", mode="reduce-overhead" if mode == "cudagraph" else None))
            for steps in (2,) if args.smoke else (18, 32):
                # the sampler's own sampler.amp (an autocast around sample_images would be switched off
                # inside it by sampler.amp=none: the first H200 figures were float32 for that reason)
                s = cfg.sampler.model_copy(update={"steps": steps, "compile": mode != "eager",
                                                   "amp": "bf16" if args.amp else "none"})
                t = time.perf_counter()
                x = sample_images(net, list(range(batch)), y, s, device=args.device)      # warm-up (compiles)
                sync(args.device)
                first = time.perf_counter() - t
                t = time.perf_counter()
                x = sample_images(net, list(range(batch)), y, s, device=args.device)
                sync(args.device)
                sec = time.perf_counter() - t
                ref = reference.setdefault(steps, x) if mode == "eager" else reference.get(steps)
                diff = ((x - ref).norm() / ref.norm()).item() if ref is not None else None
                runs.append({"shape": shape, "batch": batch, "steps": steps, "nfe": s.nfe, "amp_bf16": args.amp,
                             "mode": mode, "compile": mode != "eager", "first_call_s": round(first, 2),
                             "images_per_s": round(batch / sec, 3), "rel_diff_vs_eager": diff and round(diff, 6)})
                write("sample", args, {"runs": runs})     # after each: a run stopped by its budget keeps these
    write("sample", args, {"runs": runs})


if __name__ == "__main__":
    main()
