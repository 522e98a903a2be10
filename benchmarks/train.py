"""Training throughput: images/s, seconds per 1k images, peak memory, model FLOPs per image and MFU,
for the small default (Fashion-MNIST 32x32) and EDM2's XS shape at 64x64 (1000 classes)."""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import parser, peak_flops, sync, timed, write
from pipeline import config as C
from pipeline.edm import edm2_loss
from pipeline.devices import maybe_compile
from pipeline.networks import build_network, count_parameters

SHAPES = {"small": ({}, 32, 1, 10), "xs64": ({"preset": "img64-xs"}, 64, 3, 1000)}


def measured_peak(folder: str | None) -> float | None:
    """The bf16 matmul peak (FLOP/s) that benchmarks.matmul_peak wrote into `folder` in the same run."""
    import glob
    import json
    for f in sorted(glob.glob(f"{folder}/matmul_peak*.json")) if folder else []:
        try:
            return json.loads(open(f).read())["figures"]["peak_tflops"] * 1e12
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def bench(shape: str, batch: int, steps: int, device: str, amp: bool, channels_last: bool, compile_: bool,
          smoke: bool, peak_measured: float | None = None) -> dict:
    raw, res, ch, labels = SHAPES[shape]
    cfg = C.resolve(raw)
    if smoke:                                           # same code path, tiny network
        cfg = C.resolve(raw, {"network.model_channels": 16, "network.channel_mult": [1, 2], "network.num_blocks": 1,
                              "network.attn_resolutions": [res // 2], "network.channels_per_head": 16})
    torch.manual_seed(0)
    net = build_network(cfg, res, ch, labels).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99),
                           **({"fused": True} if device.startswith("cuda") else {"foreach": True}))
    model = maybe_compile(net, compile_)
    x = torch.randn(batch, ch, res, res, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.nn.functional.one_hot(torch.arange(batch, device=device) % labels, labels).float()
    ac = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with ac:
            loss, _ = edm2_loss(model, x, y, cfg.loss)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:          # forward + backward FLOPs of one batch
        opt.zero_grad(set_to_none=True)
        loss, _ = edm2_loss(net, x, y, cfg.loss)
        loss.backward()
    flops_per_img = fc.get_total_flops() / batch
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()                                              # warm-up: compiles where --compile
    sync(device)
    warmup_s = time.perf_counter() - t0
    sec = timed(step, device, steps)
    sync(device)
    ips = batch / sec
    peak = peak_flops(device)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    return {"shape": shape, "params_M": round(count_parameters(net) / 1e6, 2), "batch": batch, "amp_bf16": amp,
            "channels_last": channels_last, "compile": compile_, "first_step_s": round(warmup_s, 2),
            "images_per_s": round(ips, 2),
            "sec_per_kimg": round(1000 / ips, 3), "peak_mem_gb": mem and round(mem, 2),
            "train_gflops_per_img": round(flops_per_img / 1e9, 3),
            "mfu": round(flops_per_img * ips / peak, 4) if peak else None,                  # of the data sheet
            "mfu_measured_peak": round(flops_per_img * ips / peak_measured, 4) if peak_measured else None}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=["small", "xs64"], choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, help="per-step batch (default: 64 small / 8 xs64 on CPU, 256 on GPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--measured-peak", help="folder holding this run's benchmarks.matmul_peak JSON: MFU against it too")
    args = p.parse_args(argv)
    peak = measured_peak(args.measured_peak)
    gpu = args.device.startswith("cuda")
    figures = []
    for shape in args.shapes:
        batch = args.batch or (4 if args.smoke else 256 if gpu else 64 if shape == "small" else 8)
        figures.append(bench(shape, batch, min(args.steps, 2) if args.smoke else args.steps, args.device, args.amp,
                             args.channels_last, args.compile, args.smoke, peak))
        # after each shape: a run stopped by its time budget keeps what it measured
        write("train", args, {"runs": figures, "measured_peak_tflops": peak and round(peak / 1e12, 2)})


if __name__ == "__main__":
    main()
