"""DVC stage: reference statistics (mu/Sigma) of the reference dataset for every metric of
metrics.names (FID's Inception first), computed once and cached under a key of (dataset sha256,
feature network hash, n)."""
from __future__ import annotations

import os
import sys

from pipeline import cli
from pipeline.devices import use_given_cpus
from pipeline.io import check_writable
from pipeline.metrics import check_metrics, references
from pipeline.shards import eval_ranks


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.reference", __doc__)
    p.add_argument("--out", default="data/fid-ref", help="cache folder (default: data/fid-ref)")
    p.add_argument("--device", help="torch device for the features (default: metrics.device of the params)")
    p.add_argument("--nproc-per-node", type=cli.positive_int, help="processes on this node, each taking its share "
                   "of the reference images (default: launcher.nproc_per_node; under torchrun/srun: its ranks)")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        nproc = args.nproc_per_node or cfg.launcher.nproc_per_node
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return cli.torchrun_self("stages.reference", nproc, argv if argv is not None else sys.argv[1:])
        check_writable(args.out, "--out")          # a folder: before any feature is computed
        rank, world, device, _, reduce = eval_ranks(args.device or cfg.metrics.device,
                                                    "--device" if args.device else "metrics.device")
        check_metrics(cfg)
        if rank == 0:
            use_given_cpus(log=print)
        groups = references(cfg, device, args.out, progress=rank == 0, ranks=(rank, world), reduce=reduce)
        if rank != 0:
            return 0
        for ref in (g.ref for g in groups):        # every feature network of metrics.names
            print(f"reference statistics: {ref['ref_num_images']} images of {ref['reference']}, feature net "
                  f"{ref['feature_net']} ({ref['feature_net_sha256'][:12]}), "
                  f"{'cached' if ref['cached'] else f'computed on {device}'} -> {ref['path']}")
    return cli.run("reference", go)


if __name__ == "__main__":
    sys.exit(main())
