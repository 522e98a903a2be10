"""Shared benchmark plumbing: argument parsing, device facts, timing, the JSON record."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "reports" / "bench"
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; a device not listed gets no MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few iterations (CI); figures are not meaningful")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(OUT), help="folder for the JSON (default: reports/bench)")
    return p


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def write(name: str, args, figures: dict) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(0).split()[-1].lower() if \
        args.device.startswith("cuda") else args.device
    path = out / f"{name}{'-smoke' if args.smoke else ''}-{dev}.json"
    record = {"benchmark": name, "smoke": args.smoke, "figures": figures, **device_info(args.device),
              "command": "python -m benchmarks." + name + " " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"-> {path}")
    return path
