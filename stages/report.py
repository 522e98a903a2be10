"""DVC stage: the run report (reports/report.html, self-contained, and reports/report.md):
resolved config, FID against EMA length, loss and learning-rate curves, a sample grid and the full
FID record per EMA length."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.io import check_writable, read_jsonl
from pipeline.records import read_records
from pipeline.report import write_run_report


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
        check_writable(args.out, "--out")
        records = read_records(Path(args.metrics) / "fid_records.json", "evaluation records")   # a report needs them
        log = run_dir / "metrics.jsonl"
        if not log.is_file():
            raise PipelineError(f"training log {log} is missing: train.run_dir={run_dir} holds no training "
                                f"(run the train stage, or point -S train.run_dir at the run)")
        rows, notes = read_jsonl(log)                          # a torn or garbage line is dropped, with a note
        for note in notes:
            print(f"report: note: {note}", file=sys.stderr)
        summary_file = run_dir / "train_summary.json"
        summary = None
        if summary_file.is_file():
            try:
                summary = json.loads(summary_file.read_text())
            except ValueError:
                print(f"report: note: {summary_file} is unreadable; the header goes without it", file=sys.stderr)
        if summary is not None:                                 # a link to the experiment's runs table
            from pipeline.tracking.store import runs_table_url, tracking_uri
            summary["mlflow_runs_url"] = runs_table_url(tracking_uri(cfg), cfg.tracking.experiment)
        paths = write_run_report(cfg.to_dict(), records, args.out, rows, summary,
                                 args.samples, Path(args.models) / "ema_profiles.png")
        print(f"report: {paths['html']} (self-contained), {paths['md']}")
        if summary and summary.get("mlflow_run_id"):            # the same figures in the MLflow UI
            from pipeline.tracking.logger import attach
            logger = attach(cfg, summary["mlflow_run_id"])
            for key in ("html", "md"):
                logger.log_artifact(paths[key], "report")
            for f in sorted((Path(args.out) / "figures").glob("*.png")):
                logger.log_artifact(f, "report/figures")
    return cli.run("report", go)


if __name__ == "__main__":
    sys.exit(main())
