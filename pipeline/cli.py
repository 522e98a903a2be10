"""Shared pieces of the command lines: config arguments and the error -> exit-code contract."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import ConfigError, load_config


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. -S train.ref_lr=0.01 (repeatable)")


def config_from(args):
    return load_config(args.params, args.set)


def run(name: str, fn: Callable[[], int | None]) -> int:
    """Run a command; a known bad-input error prints one clear line and exits 2 (nothing half-done)."""
    from .data import DataError
    from .fid import FIDError
    from .phema import PHEMAError
    try:
        return fn() or 0
    except (ConfigError, DataError, FIDError, PHEMAError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
