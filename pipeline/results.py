"""The main job's results in a few lines (`python -m pipeline results`, the end of `make run`): FID per
EMA length with its 95 % interval, the best and what is not distinguishable from it, what training
cost, and where to look next (report, DVC plots, MLflow UI)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import PipelineError


class ResultsError(PipelineError, FileNotFoundError):
    pass


def results_lines(cfg, metrics_dir: str | Path = "metrics", report: str | Path = "reports/report.html") -> list[str]:
    from .published import paper_lines
    from .records import computed, point_label, protocol_text, read_records, result_line
    from .stats import ranking
    from .tracking.store import tracking_uri
    m = Path(metrics_dir)
    rec_file = m / "fid_records.json"
    if not rec_file.is_file():
        raise ResultsError(f"no results yet: {rec_file} is missing (run `dvc repro`, or `make run`)")
    records = sorted(read_records(rec_file), key=lambda r: (r["sigma_rel"] or 0, point_label(r)))
    records = computed(records)
    lines = [f"== Results: FID per post-hoc point ({records[0]['num_images']} generated vs "
             f"{records[0]['ref_num_images']} reference images, NFE {records[0]['sampler']['nfe']}, "
             f"{records[0]['feature_net']}) =="]
    best = min(records, key=lambda r: r["fid"])
    if records[0].get("seed_sets", 1) > 1:
        lines.append(f"  (FID: {protocol_text(records[0], with_min=False)}; 'min': the lowest set, as EDM/EDM2 report)")
    for r in records:
        ci = f"95% {r['fid_ci95'][0]:.1f}-{r['fid_ci95'][1]:.1f}" if r.get("fid_ci95") else ""
        se = f" +- {r['fid_se']:.2f}" if r.get("fid_se") is not None else ""
        low = f", min {r['fid_min']:.2f}" if r.get("fid_min") is not None else ""
        lines.append(f"  {point_label(r)}: FID {r['fid']:7.2f}{se}  ({ci}{low})" + ("  <- best" if r is best else ""))
    if all(r.get("bootstrap") for r in records) and len(records) > 1:
        lines += ranking(records, label=point_label)["lines"][1:]
    else:
        lines.append(f"best: {result_line(best)}")
    lines += paper_lines(cfg.preset, records)
    train_file = Path(cfg.train.run_dir) / "train_summary.json"     # the run's full summary
    if train_file.is_file():
        t = json.loads(train_file.read_text())
        if t.get("train_seconds_total"):
            lines.append(f"training: {t['nimg']:,} images in {t['train_seconds_total'] / 60:.1f} min "
                         f"({t.get('images_per_s')} images/s), final loss {t.get('final_loss', float('nan')):.4f}")
    uri = tracking_uri(cfg)
    lines.append(f"report: {report}" + (" (open it in a browser)" if Path(report).is_file() else " (not written yet)"))
    lines.append("plots: `dvc plots show` -> dvc_plots/index.html; metrics: `dvc metrics show`")
    from .tracking.store import runs_table_url
    local = uri.startswith(("sqlite:", "file:", "postgresql", "mysql"))
    url = runs_table_url(uri, cfg.tracking.experiment) or ("http://127.0.0.1:5000" if local else uri)
    ui = f"mlflow ui --backend-store-uri {uri}  (then open {url})" if local else url
    lines.append(f"MLflow: {ui}")
    lines.append("runs as a table: python -m pipeline runs; a verdict between experiments: python -m pipeline compare A B")
    return lines
