"""DVC stage: the run report (reports/report.html, self-contained, and reports/report.md):
resolved config, FID against EMA length, loss and learning-rate curves, a sample grid and the full
FID record per EMA length."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.report import read_jsonl, write_run_report


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m stages.report", __doc__)
    p.add_argument("--metrics", default="metrics", help="folder with fid_records.json (default: metrics)")
    p.add_argument("--models", default="models/ema", help="reconstruction folder (default: models/ema)")
    p.add_argument("--samples", default="reports/samples", help="sample grids (default: reports/samples)")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    args = p.parse_args(argv)

    def go():
        cfg = cli.config_from(args)
        run_dir = Path(cfg.train.run_dir)
        recs_file = Path(args.metrics) / "fid_records.json"
        records = json.loads(recs_file.read_text()) if recs_file.is_file() else []
        summary_file = run_dir / "train_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        paths = write_run_report(cfg.to_dict(), records, args.out, read_jsonl(run_dir / "metrics.jsonl"), summary,
                                 args.samples, Path(args.models) / "ema_profiles.png")
        print(f"report: {paths['html']} (self-contained), {paths['md']}")
        if summary and summary.get("mlflow_run_id"):            # the same figures in the MLflow UI
            from pipeline.tracking import attach
            logger = attach(cfg, summary["mlflow_run_id"])
            for key in ("html", "md"):
                logger.log_artifact(paths[key], "report")
            for f in sorted((Path(args.out) / "figures").glob("*.png")):
                logger.log_artifact(f, "report/figures")
    return cli.run("report", go)


if __name__ == "__main__":
    sys.exit(main())
