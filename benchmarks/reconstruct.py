"""Post-hoc EMA reconstruction I/O: snapshot bytes read per second while reconstructing 8 targets
from 64 snapshots, against a plain sequential read of the same files (the I/O limit).

Measured twice: cold (page cache dropped first, so both read from storage: needs root, otherwise
reported as not measured) and warm (files in the page cache, so the limit is memory bandwidth and
the reconstruction's arithmetic, 2 flop per target per parameter, decides)."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import parser, write
from pipeline import reconstruction, snapshots
from pipeline.phema import PowerFunctionEMA
from pipeline.reconstruction import reconstruct


def drop_page_cache() -> bool:
    os.sync()                                        # dirty pages cannot be dropped
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read(files) -> float:
    t = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--params-m", type=float, default=16.0, help="model size in millions of parameters")
    p.add_argument("--snapshots", type=int, default=64)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--group", type=int, default=None,
                   help="snapshots combined at a time (reconstruct(group=); default: the library's, 16 where "
                        "snapshots are read by offset, else 2)")
    p.add_argument("--dir", help="where to write the snapshots (default: a temp folder)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per cache state; the median is reported")
    args = p.parse_args(argv)
    n_params = int((0.25 if args.smoke else args.params_m) * 1e6)
    n_snap = 4 if args.smoke else args.snapshots
    figures = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        net = torch.nn.Module()
        for i in range(4):
            net.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n_params // 4)))
        ema = PowerFunctionEMA(net, [0.05, 0.10])
        for i in range(1, n_snap // 2 + 1):
            ema.update(net, i * 1000, 1000)
            ema.save_snapshots(d, i * 1000, {"model_key": "bench", "snapshot_nimg": 1000})
        files = sorted(Path(d).glob("phema-*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        targets = [0.03 + 0.02 * i for i in range(args.targets)]

        def rec() -> float:
            t = time.perf_counter()
            reconstruct(d, targets, batch_targets=args.targets, group=args.group)
            return time.perf_counter() - t

        figures.update(snapshots=len(files), targets=args.targets, bytes=total,
                       group=args.group or reconstruction.default_group(snapshots.scan_snapshots(d)[0]))
        repeats = 1 if args.smoke else args.repeats
        for cache in ("cold", "warm"):
            if cache == "cold" and not drop_page_cache():
                figures["cold"] = "not measured: dropping the page cache needs root"
                continue
            seqs, recs = [], []
            for _ in range(repeats):
                if cache == "cold":
                    drop_page_cache()
                seqs.append(sequential_read(files))
                if cache == "cold":
                    drop_page_cache()
                recs.append(rec())
            seq, r = statistics.median(seqs), statistics.median(recs)
            figures[cache] = {"sequential_read_MBps": round(total / seq / 1e6, 1),
                              "reconstruct_MBps": round(total / r / 1e6, 1),
                              "fraction_of_sequential": round(seq / r, 3),
                              "fraction_range": [round(min(a / b for a, b in zip(seqs, recs)), 3),
                                                 round(max(a / b for a, b in zip(seqs, recs)), 3)],
                              "repeats": repeats}
    write("reconstruct", args, figures)


if __name__ == "__main__":
    main()
