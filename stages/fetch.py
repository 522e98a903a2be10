"""DVC stage: Fashion-MNIST's four .gz files into a folder of the repository (default
data/raw/fashion-mnist, the default params' data.path), from the system package `dataset-fashion-mnist`
or its .deb unpacked without root. The encode stage depends on data.path, so DVC hashes the raw input
like any other: with a folder or zip source of your own, changing one image re-encodes. With such a
source (and a reference other than Fashion-MNIST's test split) it fetches nothing: its output folder
holds a note saying so."""
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
    cli.add_config_args(p)
    args = p.parse_args(argv)

    def go():
        from pathlib import Path
        from pipeline.io import atomic_write_text, check_writable, published_folder
        check_writable(Path(args.out).parent, "--out")
        cfg = cli.config_from(args, say=False)
        if cfg.data.source != "fashion-mnist" and cfg.metrics.reference != "fashion-mnist-test":
            out = Path(args.out)                # DVC's output: a folder that says why it is empty
            if not out.is_dir():
                with published_folder(out) as tmp:
                    atomic_write_text(f"data.source={cfg.data.source}: Fashion-MNIST is not needed (nothing fetched)\n",
                                      tmp / "NOT-FETCHED.txt")
            print(f"fetch: nothing to fetch for data.source={cfg.data.source} (the encode stage reads data.path)")
            return
        out = fetch_fashion_mnist(args.out, args.cache_dir)
        print(f"fashion-mnist: {', '.join(sorted(f.name for f in out.iterdir()))} -> {out}")
    return cli.run("fetch", go)


if __name__ == "__main__":
    sys.exit(main())
