"""Shared pieces of the command lines: config arguments and the error -> exit-code contract."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from .config import load_config
from .errors import PipelineError, one_line_os_error


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. -S train.ref_lr=0.01 (repeatable)")


def config_from(args, say: bool = True):
    """The params file with its -S overrides; `say`: print (stderr) the values that differ from the
    params file of the last commit, so a command says which params it used."""
    cfg = load_config(args.params, args.set)
    if say:
        line = params_diff_line(args.params, cfg)
        if line and not _said_in_this_dvc_command(line):
            print(line, file=sys.stderr, flush=True)
    return cfg


def _said_in_this_dvc_command(line: str) -> bool:
    """Whether an earlier stage of the same `dvc repro` / `dvc exp run` already printed `line` (the
    params note once per command line, not once per stage). Outside DVC: False. The note is kept in
    the repository's .dvc/tmp with the id of the DVC process that runs the stages."""
    if not os.environ.get("DVC_STAGE") or not os.environ.get("DVC_ROOT"):
        return False
    try:
        import psutil
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(os.path.basename(c) == "dvc" for c in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                break
            proc = proc.parent()
        if proc is None:
            return False
        stamp = f"{proc.pid}-{proc.create_time():.0f}\n{line}"
        note = Path(os.environ["DVC_ROOT"]) / ".dvc" / "tmp" / "edm2-params-note"
        if note.is_file() and note.read_text() == stamp:
            return True
        from .io import atomic_write_text
        atomic_write_text(stamp, note)
    except Exception:                                    # no psutil, no .dvc/tmp: say it again rather than never
        return False
    return False


def committed_params(path) -> dict | None:
    """The params file as of git's HEAD (None outside a repository or for an untracked file)."""
    import subprocess
    from pathlib import Path
    import yaml
    p = Path(path).resolve()
    try:
        r = subprocess.run(["git", "show", f"HEAD:./{p.name}"], cwd=p.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        raw = yaml.safe_load(r.stdout)
    except yaml.YAMLError:
        return None
    return raw if isinstance(raw, dict) else None


def params_diff_line(path, cfg, limit: int = 8) -> str | None:
    """"params: sampler.steps=8 (committed: 18), ..." for the values that differ from the committed
    params file; None when nothing differs or there is no committed version to compare with."""
    from .config import ConfigError, diff, resolve
    raw = committed_params(path)
    if raw is None:
        return None
    try:
        before = resolve(raw, where=None)
    except ConfigError:                          # the committed file is invalid (or older): no comparison
        return None
    changed = {k: v for k, v in diff(before, cfg).items() if k != "preset"}
    if not changed:
        return None
    shown = [f"{k}={b!r} (committed: {a!r})" for k, (a, b) in list(changed.items())[:limit]]
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return f"params: {len(changed)} value(s) differ from the committed {path}: " + ", ".join(shown) + more


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130                               # the shell's code for a command ended by Ctrl-C (SIGINT)


def run(name: str, fn: Callable[[], int | None]) -> int:
    """Run a command. A project error (PipelineError) or an operating-system error (a read-only or
    full disk, a file where a folder belongs) prints one line and exits 2; writes are atomic, so
    nothing is left half-written."""
    if os.environ.get("EDM2_PARSE_ONLY") == "1":         # docs' commands checked to parse (tests), nothing run
        return 0
    try:
        from .devices import use_given_cpus
        use_given_cpus()                             # torch's threads = the CPUs this job was given (said by the work)
        return fn() or 0
    except PipelineError as err:
        _close_progress_bars()
        print(f"{name}: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        _close_progress_bars()
        print(f"{name}: {one_line_os_error(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:                        # the OS layer's refusal of a path, not a bug
        if "null byte" not in str(err):
            raise
        print(f"{name}: a path or argument contains a NUL byte", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:                 # Ctrl-C: one line (the command says what it kept), no traceback
        _close_progress_bars()
        print(f"{name}: interrupted" + (f": {_one_line(str(err))}" if str(err) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def _close_progress_bars() -> None:
    """End any unfinished tqdm bar with its newline, so the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            if not bar.disable and (bar.total is None or bar.n < bar.total):
                bar.close()
        except Exception:                            # a bar of a dead thread: never hide the error
            pass


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2^63 (what torch's generators take)."""
    from .config import SEED_LIMIT
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{v}: a seed must be in [0, 2^63)")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def torchrun_self(module: str, nproc: int, argv: list[str]) -> int:
    """Re-launch `python -m module argv` under torchrun on this node (its own rendezvous), dropping
    --nproc-per-node (torchrun takes it); each process then sees RANK / WORLD_SIZE / LOCAL_RANK."""
    from torch.distributed.run import main as torchrun_main
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    try:
        torchrun_main(["--standalone", f"--nproc-per-node={nproc}", "--module", module, *rest])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as err:           # torchrun raises ChildFailedError with the ranks' errors
        print(f"{module.rsplit('.', 1)[-1]}: torchrun failed: {err}", file=sys.stderr)
        return 1
    return 0
