"""bf16 matrix-multiply peak measured on this device (FLOP/s), the MFU denominator beside the data
sheet's (benchmarks.train --measured-peak reads this run's JSON)."""
from __future__ import annotations

import torch

from benchmarks.common import parser, peak_flops, sync, timed, write


def measure(device: str, n: int, repeats: int) -> dict:
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sec = timed(lambda: torch.matmul(a, b, out=c), device, repeats)
    sync(device)
    flops = 2 * n ** 3 / sec
    sheet = peak_flops(device)
    return {"n": n, "dtype": "bf16", "repeats": repeats, "seconds_per_matmul": round(sec, 6),
            "tflops": round(flops / 1e12, 2), "datasheet_tflops": sheet and round(sheet / 1e12, 1),
            "of_datasheet": round(flops / sheet, 3) if sheet else None}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n", type=int, help="matrix size (default: 8192 on a GPU, 1024 on CPU, 256 with --smoke)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    n = args.n or (256 if args.smoke else 8192 if gpu else 1024)
    runs = [measure(args.device, size, 2 if args.smoke else args.repeats) for size in sorted({n, max(n // 2, 64)})]
    best = max(runs, key=lambda r: r["tflops"])
    write("matmul_peak", args, {"runs": runs, "peak_tflops": best["tflops"]})


if __name__ == "__main__":
    main()
