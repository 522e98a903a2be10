"""DVC stage: Fashion-MNIST's four .gz files into a folder of the repository (default
data/raw/fashion-mnist, the default params' data.path), from the system package `dataset-fashion-mnist`
or its .deb unpacked without root. The encode stage depends on data.path, so DVC hashes the raw input
like any other: with a folder or zip source of your own, changing one image re-encodes."""
from __future__ import annotations

import sys

from pipeline import cli
from pipeline.data.readers import fetch_fashion_mnist


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = cli.ArgumentParser(prog="python -m stages.fetch", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/raw/fashion-mnist", help="folder to write (default: data/raw/fashion-mnist)")
    p.add_argument("--cache-dir", default="data/raw", help="where a fetched Debian package is unpacked")
    args = p.parse_args(argv)

    def go():
        from pathlib import Path
        from pipeline.io import check_writable
        check_writable(Path(args.out).parent, "--out")
        out = fetch_fashion_mnist(args.out, args.cache_dir)
        print(f"fashion-mnist: {', '.join(sorted(f.name for f in out.iterdir()))} -> {out}")
    return cli.run("fetch", go)


if __name__ == "__main__":
    sys.exit(main())
