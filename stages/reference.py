"""DVC stage: reference statistics (mu/Sigma) of the reference dataset for every metric of
fid.metrics (FID's Inception first), computed once and cached under a key of (dataset sha256,
feature network hash, n)."""
from __future__ import annotations

import sys

from pipeline import cli
from pipeline.devices import pick_device
from pipeline.io import check_writable
from pipeline.metrics import check_metrics, references


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.reference", __doc__)
    p.add_argument("--out", default="data/fid-ref", help="cache folder (default: data/fid-ref)")
    p.add_argument("--device", help="torch device for the features (default: fid.device of the params)")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        check_writable(args.out, "--out")          # a folder: before any feature is computed
        device = str(pick_device(args.device or cfg.fid.device, "--device" if args.device else "fid.device"))
        check_metrics(cfg)
        for ref in (g.ref for g in references(cfg, device, args.out)):   # every feature network of fid.metrics
            print(f"reference statistics: {ref['ref_num_images']} images of {ref['reference']}, feature net "
                  f"{ref['feature_net']} ({ref['feature_net_sha256'][:12]}), "
                  f"{'cached' if ref['cached'] else f'computed on {device}'} -> {ref['path']}")
    return cli.run("reference", go)


if __name__ == "__main__":
    sys.exit(main())
