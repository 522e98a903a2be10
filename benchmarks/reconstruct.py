"""Post-hoc EMA reconstruction I/O: snapshot bytes read per second while reconstructing 8 targets
from 64 snapshots, against a plain sequential read of the same files (the I/O limit)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import parser, write
from pipeline.phema import PowerFunctionEMA, reconstruct


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--params-m", type=float, default=16.0, help="model size in millions of parameters")
    p.add_argument("--snapshots", type=int, default=64)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--dir", help="where to write the snapshots (default: a temp folder)")
    args = p.parse_args(argv)
    n_params = int((0.25 if args.smoke else args.params_m) * 1e6)
    n_snap = 4 if args.smoke else args.snapshots
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        net = torch.nn.Module()
        for i in range(4):
            net.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n_params // 4)))
        ema = PowerFunctionEMA(net, [0.05, 0.10])
        for i in range(1, n_snap // 2 + 1):
            ema.update(net, i * 1000, 1000)
            ema.save_snapshots(d, i * 1000, {"model_key": "bench", "snapshot_nimg": 1000})
        files = sorted(Path(d).glob("phema-*.pt"))
        total = sum(f.stat().st_size for f in files)
        t = time.perf_counter()                       # the I/O limit: read every byte once, in order
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        seq = time.perf_counter() - t
        targets = [0.03 + 0.02 * i for i in range(args.targets)]
        t = time.perf_counter()
        reconstruct(d, targets, batch_targets=args.targets)
        rec = time.perf_counter() - t
    write("reconstruct", args, {"snapshots": len(files), "targets": args.targets, "bytes": total,
                                "sequential_read_MBps": round(total / seq / 1e6, 1),
                                "reconstruct_MBps": round(total / rec / 1e6, 1),
                                "fraction_of_sequential": round(seq / rec, 3),
                                "note": "both reads from the page cache (files just written)"})


if __name__ == "__main__":
    main()
