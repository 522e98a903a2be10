"""DVC stage: FID reference statistics (Inception mu/Sigma) of the reference dataset, computed once
and cached under a key of (dataset sha256, feature network hash, n)."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, EncodedDataset
from pipeline.fid import FIDError, load_feature_net, reference_stats


def reference_dataset_dir(cfg) -> str:
    """`fashion-mnist-test` -> the encoded test split; anything else is an encoded dataset folder."""
    return f"{cfg.data.dataset_dir}/test" if cfg.fid.reference == "fashion-mnist-test" else cfg.fid.reference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.reference", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    p.add_argument("--out", default="data/fid-ref", help="cache folder (default: data/fid-ref)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.params, args.set)
        ds = EncodedDataset(reference_dataset_dir(cfg))
        feat = load_feature_net(cfg.fid.feature_net)
        ref = reference_stats(ds, feat, cfg.fid.ref_num_images, args.out, cfg.fid.batch_size)
    except (ConfigError, DataError, FIDError) as err:
        print(f"reference: {err}", file=sys.stderr)
        return 2
    print(f"reference statistics: {ref['ref_num_images']} images of {ref['reference']}, feature net "
          f"{ref['feature_net']} ({ref['feature_net_sha256'][:12]}), {'cached' if ref['cached'] else 'computed'}"
          f" -> {ref['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
