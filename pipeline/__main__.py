"""`python -m pipeline <command>`: the project's command line (each stage also has its own CLI)."""
from __future__ import annotations

import argparse
import sys

import yaml

from . import config as C


def _cmd_config(args) -> None:
    raw = {"preset": args.preset} if args.preset else None
    cfg = C.resolve(raw, args.set) if raw is not None else C.load_config(args.params, args.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _cmd_info(args) -> None:
    from .networks import build_network, count_parameters
    cfg = C.load_config(args.params, args.set)
    label_dim = cfg.network.label_dim if cfg.network.label_dim is not None else (10 if cfg.data.use_labels else 0)
    net = build_network(cfg, cfg.data.resolution, cfg.data.channels, label_dim)
    print(f"config ok: {args.params} (hash {cfg.hash()})")
    print(f"network: {count_parameters(net) / 1e6:.3f}M parameters, {cfg.data.resolution}x{cfg.data.resolution}"
          f"x{cfg.data.channels}, label_dim={label_dim}")
    print(f"sampler: {cfg.sampler.solver}, {cfg.sampler.steps} steps, NFE {cfg.sampler.nfe}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    from .cli import add_config_args as common

    sp = sub.add_parser("config", help="validate a params file (or a preset) and print the resolved config")
    common(sp)
    sp.add_argument("--preset", help=f"print a preset instead: {', '.join(sorted(C.presets()))}")
    sp.set_defaults(func=_cmd_config)

    sp = sub.add_parser("info", help="validate the config and describe the network it builds")
    common(sp)
    sp.set_defaults(func=_cmd_info)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except C.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
