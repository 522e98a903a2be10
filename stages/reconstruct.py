"""DVC stage: reconstruct post-hoc EMA models (method.md 6) from a training run's snapshots.

Snapshot directory in, one model file per target out (ema.targets, or the EMA lengths and the
reconstructed guides of evaluate.grid; a guide at an earlier training time is made in the same pass) (`ema-<nimg>-<sigma_rel>.safetensors`), plus
`reconstruct.json` (coefficients, profile errors, warnings) and `ema_profiles.png`. Targets already
reconstructed from the same snapshots are skipped.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import cli
from pipeline.config import load_config
from pipeline.evaluate import reconstruction_targets
from pipeline.reconstruction import reconstruct
from pipeline.figures import plot_ema_reconstruction


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.reconstruct", __doc__)
    p.add_argument("--snapshots", help="snapshot directory (default: <train.run_dir>/snapshots)")
    p.add_argument("--out", default="models/ema", help="output directory (default: models/ema)")
    p.add_argument("--targets", type=float, nargs="+", help="target sigma_rel values (default: ema.targets)")
    p.add_argument("--target-nimg", type=int, help="reconstruct at this training time in images "
                   "(default: ema.target_nimg, else the last snapshot)")
    p.add_argument("--batch-targets", type=cli.positive_int, default=8, help="targets per pass over the snapshots (memory: "
                   "this many float32 models)")
    args = p.parse_args(argv)

    def go():
        overrides = args.set + ([f"ema.targets={args.targets}"] if args.targets else [])
        cfg = load_config(args.params, overrides) if Path(args.params).exists() else None
        snapshots = args.snapshots or (str(Path(cfg.train.run_dir) / "snapshots") if cfg else None)
        # The grid's EMA lengths and its guides (earlier times, other lengths): one pass over the snapshots.
        targets = args.targets or (reconstruction_targets(cfg) if cfg else None)
        target_nimg = args.target_nimg if args.target_nimg is not None else (cfg.ema.target_nimg if cfg else None)
        if not snapshots or not targets:
            p.error("give --snapshots and --targets, or a params file that has them")
        summary = reconstruct(snapshots, targets, target_nimg, out_dir=args.out,
                              batch_targets=args.batch_targets, progress=True)
        fig = plot_ema_reconstruction(summary, Path(args.out) / "ema_profiles.png")
        for t in summary["targets"]:
            state = "skipped (up to date)" if t["skipped"] else "written"
            print(f"sigma_rel {t['sigma_rel']:.3f} at nimg {t['nimg']}: profile error {t['rel_error']:.4f}, "
                  f"max|coef| {t['max_abs_coef']:.2f} -> {Path(args.out) / t['file']} [{state}]")
        for w in summary["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(f"summary: {Path(args.out) / 'reconstruct.json'}, figure: {fig}")
    return cli.run("reconstruct", go)


if __name__ == "__main__":
    sys.exit(main())
