"""DVC stage: encode the dataset named in params.yaml into immutable artifacts (+ manifest).

Fashion-MNIST gives two artifacts, `<dataset_dir>/train` (training) and `<dataset_dir>/test` (FID
reference); folder and zip sources give `train` only.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import cli
from pipeline.data.encode import dataset_splits, encode_dataset
from pipeline.data.pixels import DataError


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.encode", __doc__)
    p.add_argument("--splits", nargs="+", help="splits to encode (default: train and test for fashion-mnist)")
    p.add_argument("--cache-dir", default="data/raw", help="where a fetched Debian package is unpacked")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        splits = args.splits or dataset_splits(cfg)
        from pipeline.io import check_writable
        check_writable(cfg.data.dataset_dir, "data.dataset_dir")            # before reading any image
        unknown = [s for s in splits if s not in dataset_splits(cfg)]
        if unknown:
            raise DataError(f"--splits {' '.join(unknown)}: data.source={cfg.data.source} has the splits "
                            f"{', '.join(dataset_splits(cfg))}")
        for split in splits:
            out = Path(cfg.data.dataset_dir) / split
            m = encode_dataset(cfg, out, split, cache_dir=args.cache_dir)
            print(f"{split}: {m['count']} x {m['shape']} {m['dtype']} ({m['encoder']}), "
                  f"{m['label_count']} classes, sha256 {m['sha256'][:16]}... -> {out}")
            for note in m["notes"]:
                print(f"  note: {note}")
    return cli.run("encode", go)


if __name__ == "__main__":
    sys.exit(main())
