"""DVC stage: FID of every reconstructed EMA model (method.md 8).

For each `ema-*.safetensors` in the models folder (or, with `evaluate.grid`, each post-hoc point:
EMA length x guide x guidance weight x steps, from the reconstruct stage's models): generate metrics.num_images images with the sampler
(image i seeded with metrics.seed + i), Inception features through clean-fid, FID against the cached
reference statistics with its bootstrap standard error and 95 % interval, and KID. Prints each
result as soon as it is known, then the best EMA length and the ones not distinguishable from it.
Writes metrics/fid.json (`dvc metrics show`), metrics/fid_vs_ema.csv (`dvc plots show`),
metrics/fid_records.json (full records) and a sample grid per model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import cli
from pipeline.devices import use_given_cpus
from pipeline.evaluate import evaluate_models, evaluate_points, evaluation_points, write_metrics
from pipeline.fid import FIDError
from pipeline.io import check_writable
from pipeline.metrics import check_metrics, references
from pipeline.snapshots import check_reconstruction, refuse_legacy
from pipeline.records import computed, is_grid
from pipeline.shards import eval_ranks
from pipeline.figures import curve_label, plot_fid_vs_ema


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.evaluate", __doc__)
    p.add_argument("--models", default="models/ema", help="folder of reconstructed models (default: models/ema)")
    p.add_argument("--ref-cache", default="data/fid-ref", help="reference statistics cache (default: data/fid-ref)")
    p.add_argument("--metrics", default="metrics", help="metrics folder (default: metrics)")
    p.add_argument("--samples", default="reports/samples", help="sample grid folder (default: reports/samples)")
    p.add_argument("--device", help="torch device for sampling and features: auto, cpu, cuda, cuda:N "
                   "(default: metrics.device of the params)")
    p.add_argument("--shards", default="runs/eval-shards", help="feature shards of unfinished and finished sets "
                   "(a rerun computes only the missing ones; default: runs/eval-shards)")
    p.add_argument("--nproc-per-node", type=cli.positive_int, help="processes on this node, each sampling its "
                   "share of the seeds (default: launcher.nproc_per_node; under torchrun/srun: its ranks)")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        nproc = args.nproc_per_node or cfg.launcher.nproc_per_node
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return cli.torchrun_self("stages.evaluate", nproc, argv if argv is not None else sys.argv[1:])
        for folder, flag in ((args.metrics, "--metrics"), (args.samples, "--samples"), (args.ref_cache, "--ref-cache"),
                             (args.shards, "--shards")):
            check_writable(folder, flag)                   # before any compute
        rank, world, device, barrier, reduce = eval_ranks(args.device or cfg.metrics.device,
                                                          "--device" if args.device else "metrics.device")
        check_metrics(cfg)
        if rank == 0:
            use_given_cpus(log=print)               # "cpu: N threads (...)", and a busy-machine warning
        if rank == 0:
            print(f"evaluate: sampling and features on {device}" + (f", {world} processes" if world > 1 else ""))
        if Path(args.models).is_dir():
            refuse_legacy(Path(args.models), "models folder")
        files = sorted(Path(args.models).glob("ema-*.safetensors"))
        if not files:
            raise FIDError(f"no reconstructed models (ema-*.safetensors) in {args.models}: run the reconstruct stage")
        for f in files:                            # every model's header before any compute
            check_reconstruction(f)
        # every metric of metrics.names, FID first; missing statistics computed by all ranks together
        refs = references(cfg, device, args.ref_cache, progress=rank == 0, ranks=(rank, world), reduce=reduce)
        if cfg.evaluate.grid is not None:          # the post-hoc grid (its models are checked first)
            recs = evaluate_points(evaluation_points(cfg), args.models, cfg, refs, args.samples, device,
                                   shards_dir=args.shards, ranks=(rank, world), barrier=barrier)
        else:                                      # every model in the folder, unguided
            recs = evaluate_models(files, cfg, refs, args.samples, device, shards_dir=args.shards,
                                   ranks=(rank, world), barrier=barrier)
        if rank != 0:
            return 0                               # rank 0 measures and writes
        records = [r.to_dict() for r in recs]
        metrics = write_metrics(records, args.metrics)
        _log_to_mlflow(cfg, records, args.samples, metrics)
        grid = is_grid(records)
        distinct = [{**r, "label": curve_label(r) if grid else ""} for r in computed(records)]
        plot_fid_vs_ema(distinct, Path(args.metrics) / "fid_vs_ema.png",
                        f"{metrics['num_images']} images, NFE {metrics['nfe']}, {metrics['feature_net']}; "
                        f"bars: 95% bootstrap interval")

        for line in metrics["ranking"]["lines"]:
            print(line)
        print(f"-> {args.metrics}/fid.json, {args.metrics}/fid_records.json")
    return cli.run("evaluate", go)


def _log_to_mlflow(cfg, records, samples_dir, metrics) -> None:
    """One child run per evaluation (keyed by its whole record) under the training run, and the
    training run's best FID / EMA length / KID, so MLflow's tables sort runs by them."""
    import json
    from pipeline.tracking.logger import attach, log_ema_runs
    summary = Path(cfg.train.run_dir) / "train_summary.json"
    run_id = json.loads(summary.read_text()).get("mlflow_run_id") if summary.is_file() else None
    if run_id:
        logger = attach(cfg, run_id)
        log_ema_runs(logger, run_id, records, Path(samples_dir))
        logger.log_summary({"best_fid": metrics["best_fid"], "best_fid_se": metrics["best_fid_se"],
                            "best_sigma_rel": metrics["best_sigma_rel"], "best_kid": metrics.get("best_kid")})


if __name__ == "__main__":
    sys.exit(main())
