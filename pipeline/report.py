"""The reports: a run's report (report.html, one file with its images inline, and report.md beside
PNGs in figures/) and a sweep's. Figures: figures.py."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .figures import curve_label, plot_fid_vs_ema, plot_guidance_grid, plot_training_curves


def _img_tag(path: Path, alt: str, width: int | None = None) -> str:
    import base64
    data = base64.b64encode(Path(path).read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"{w}>'


def _uncertainty_cells(r: dict) -> tuple[str, str, str]:
    se = f"{r['fid_se']:.2f}" if r.get("fid_se") is not None else "-"
    ci = f"{r['fid_ci95'][0]:.1f} - {r['fid_ci95'][1]:.1f}" if r.get("fid_ci95") else "-"
    kd = f"{r['kid'] * 1e3:.2f}e-3 +- {r['kid_std'] * 1e3:.2f}e-3" if r.get("kid") is not None else "-"
    return se, ci, kd


def record_line(r: dict) -> str:
    """The FID record printed next to every FID number."""
    s = r["sampler"]
    return (f"{r['feature_net']} ({r['feature_net_sha256'][:10]}), {r['mode']} mode, {r['num_images']} generated vs "
            f"{r['ref_num_images']} reference ({r['reference']}), {s['solver']} {s['steps']} steps / NFE {s['nfe']}"
            f"{' (network in bf16)' if s.get('amp') == 'bf16' else ''}, "
            f"churn {s['churn']}, seeds {r['seeds'][0]}-{r['seeds'][1]}")


def header_rows(summary: dict) -> list[tuple[str, str]]:
    """The run report's header table: when, where, from which code, and what it cost."""
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    secs = summary.get("train_seconds_total")
    rows = [("finished", summary.get("finished_at") or "-"),
            ("device", f"{summary.get('device') or '-'}" + (f" x {summary['processes']} processes"
                                                             if (summary.get("processes") or 1) > 1 else "")),
            ("git revision", (summary.get("git_revision") or "-")[:12] +
             ("-dirty" if str(summary.get("git_revision", "")).endswith("-dirty") else "")),
            ("training", f"{num(summary.get('nimg'), ',')} images in {num(secs / 60 if secs else None, '.1f')} min "
                         f"({num(summary.get('images_per_s'), '.1f')} images/s)"),
            ("final loss", num(summary.get("final_loss"), ".4f") + f" (weighted MSE "
                           f"{num(summary.get('final_weighted_mse'), '.4f')})"),
            ("status", summary.get("status") or "-"),
            ("MLflow run", summary.get("mlflow_run_id") or "(offline)")]
    if summary.get("mlflow_runs_url"):                  # opens the runs table (with `mlflow ui` running)
        rows.append(("MLflow runs table", summary["mlflow_runs_url"]))
    return rows


def _cell(v) -> str:
    """A header cell: a link for a URL, escaped text otherwise."""
    import html
    text = html.escape(str(v))
    return f"<a href='{text}'>{text}</a>" if str(v).startswith(("http://", "https://")) else text


HTML_HEAD = ("<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
             "body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}"
             "table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}"
             "pre{{background:#f6f6f6;padding:1em;font-size:12px;max-height:400px;overflow:auto}}"
             ".rec{{color:#555;font-size:12px}}table.head th{{text-align:left;background:#f3f3f3}}"
             ".scroll{{overflow-x:auto;max-width:100%}}td.rec{{min-width:18em}}</style></head><body>")

FIGURE_SECTIONS = [   # (figure key, heading, caption): the run report's figures, in order
    ("fid", "FID against EMA length", "the star marks the best sigma_rel; bars: 95% interval of each FID "
     "(resampling the generated images, reference held fixed). Shared seeds make the FIDs' errors "
     "correlated, so the paired comparisons above can resolve differences that overlapping bars cannot."),
    ("grid", "FID over EMA length x guidance", "one heat map per guide; w = 1 is the unguided model "
     "(the same in every panel); each cell FID +- its standard error, * the best"),
    ("curves", "Loss and learning rate", "against images seen"),
    ("ema", "Post-hoc EMA reconstruction", "target profiles and their reconstruction from snapshots")]


def write_run_report(cfg_dict: dict, records: Sequence[dict], out_dir: str | Path, training_rows: Sequence[dict] = (),
                     train_summary: dict | None = None, samples_dir: str | Path | None = None,
                     ema_figure: str | Path | None = None, title: str = "EDM2 run report") -> dict:
    """Write report.html (one file, images inline: renders with no network) and report.md (links to
    PNGs in figures/). Returns the paths written."""
    import html

    import yaml

    from .io import atomic_write_text
    from .records import computed, point_label
    out = Path(out_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    recs = sorted(records, key=lambda r: (r["sigma_rel"] or 0, point_label(r)))
    distinct = computed(recs)
    paths = _run_figures(recs, distinct, figs, training_rows, ema_figure)
    grids = _sample_grids(recs, samples_dir, figs)
    md = [f"# {title}", ""]
    h = [HTML_HEAD.format(title=html.escape(title)), f"<h1>{html.escape(title)}</h1>"]
    if recs:
        _add_best(md, h, min(distinct, key=lambda r: r["fid"]), distinct, cfg_dict)
    if train_summary:
        rows = header_rows(train_summary)
        md += ["| how it was made | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
        h.append("<table class='head'>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>"
                                                  for k, v in rows) + "</table>")
    for key, name, note in FIGURE_SECTIONS:
        if paths.get(key):
            md += [f"## {name}", "", f"![{name}](figures/{paths[key].name})", "", f"_{note}_", ""]
            h.append(f"<h2>{name}</h2>{_img_tag(paths[key], name)}<p class='rec'>{note}</p>")
    if recs:
        _add_points_table(md, h, distinct, grids)
    cfg_text = yaml.safe_dump(cfg_dict, sort_keys=False)
    md += ["## Resolved configuration", "", "```yaml", cfg_text, "```"]
    h.append(f"<h2>Resolved configuration</h2><pre>{html.escape(cfg_text)}</pre></body></html>")
    paths["html"] = atomic_write_text("\n".join(h), out / "report.html")
    paths["md"] = atomic_write_text("\n".join(md), out / "report.md")
    return paths


def _run_figures(recs, distinct, figs: Path, training_rows, ema_figure) -> dict:
    """The run report's figures (FIG_SECTIONS keys -> PNG paths in figs)."""
    import shutil

    from .records import is_grid
    paths, grid = {}, is_grid(recs)
    if recs:
        lengths = " at several training lengths" if any((r.get("extra") or {}).get("nimg_axis") for r in recs) else ""
        paths["fid"] = plot_fid_vs_ema([{**r, "label": curve_label(r) if grid else ""} for r in distinct],
                                       figs / "fid_vs_ema.png",
                                       f"FID vs EMA length{lengths} ({recs[0]['num_images']} images)")
        if grid:
            paths["grid"] = plot_guidance_grid(recs, figs / "fid_grid.png")
    if training_rows:
        paths["curves"] = plot_training_curves(training_rows, figs / "training_curves.png")
    if ema_figure and Path(ema_figure).is_file():
        paths["ema"] = Path(shutil.copy(ema_figure, figs / "ema_profiles.png"))
    return paths


def _sample_grids(recs, samples_dir, figs: Path) -> dict:
    """Each record's sample grid copied beside the report: {eval key: path}."""
    import shutil
    grids = {}
    for r in recs:
        name = (r.get("extra") or {}).get("samples") or f"samples-{Path(r['model_file']).stem}.png"
        g = Path(samples_dir or "") / name
        if samples_dir and g.is_file():
            grids[r["eval_key"]] = Path(shutil.copy(g, figs / g.name))
    return grids


def _add_best(md: list, h: list, best: dict, distinct, cfg_dict: dict) -> None:
    """The best point with its record, the protocol, the paper's numbers and what the ranking resolves."""
    import html

    from .published import paper_lines
    from .records import point_label, protocol_text
    se = f" +- {best['fid_se']:.2f}" if best.get("fid_se") is not None else ""
    md += [f"Best FID **{best['fid']:.3f}{se}** at **{point_label(best)}** ({record_line(best)})", ""]
    h.append(f"<p>Best FID <b>{best['fid']:.3f}{se}</b> at <b>{html.escape(point_label(best))}</b> "
             f"<span class='rec'>({html.escape(record_line(best))})</span></p>")
    notes = [f"Protocol: {protocol_text(best)}."] + paper_lines(cfg_dict.get("preset"), distinct)
    from .records import metric_notes
    notes += [f"{', '.join(names)}: {note}." for note, names in metric_notes(best).items()]
    if all(r.get("bootstrap") for r in distinct):
        from .stats import ranking
        notes += ranking(distinct, label=point_label)["lines"][1:]
    for text in notes:
        md += [text, ""]
        h.append(f"<p>{html.escape(text)}</p>")


def _add_points_table(md: list, h: list, distinct, grids: dict) -> None:
    """One row per post-hoc point: FID, its uncertainty, KID and the other metrics, samples, the record."""
    import html

    from .records import point_label, record_metrics
    md += ["## FID per post-hoc point", "", "| point | FID | +- SE | 95% interval | KID | record |",
           "|---|---|---|---|---|---|"]
    others = sorted({n for r in distinct for n in record_metrics(r)} - {"fid", "kid"})
    h.append("<h2>FID per post-hoc point</h2><div class='scroll'><table><tr><th>point</th><th>FID</th><th>+- SE</th>"
             "<th>95% interval</th><th>KID</th>" + "".join(f"<th>{html.escape(n)} +- SE</th>" for n in others)
             + "<th>samples</th><th>record</th></tr>")
    for r in distinct:
        se, ci, kd = _uncertainty_cells(r)
        md.append(f"| {point_label(r)} | {r['fid']:.3f} | {se} | {ci} | {kd} | {record_line(r)} |")
        cell = ""
        if r["eval_key"] in grids:                  # a thumbnail that opens the full-size grid beside the report
            g, alt = grids[r["eval_key"]], f"samples {point_label(r)}"
            cell = f"<a href='figures/{g.name}' target='_blank' title='full size'>{_img_tag(g, alt, 192)}</a>"
        om = record_metrics(r)
        more = "".join(f"<td>{om[n]['value']:.4g} +- {om[n]['se']:.2g}</td>" if n in om and om[n].get("se")
                       is not None else (f"<td>{om[n]['value']:.4g}</td>" if n in om else "<td>-</td>")
                       for n in others)
        h.append(f"<tr><td>{html.escape(point_label(r))}</td><td>{r['fid']:.3f}</td><td>{se}</td><td>{ci}</td>"
                 f"<td>{kd}</td>{more}<td>{cell}</td><td class='rec'>{html.escape(record_line(r))}</td></tr>")
    h.append("</table></div>")
    md.append("")
    for r in distinct:
        if r["eval_key"] in grids:
            md += [f"![samples {point_label(r)}](figures/{grids[r['eval_key']].name})"]
    md.append("")


SWEEP_HEADERS = {"trial_id": "trial", "nimg": "images trained", "final_loss": "final loss", "val_loss": "val loss",
                 "fid_se": "FID +- SE", "fid_lo": "95% lo", "fid_hi": "95% hi", "fid": "FID", "kid": "KID",
                 "tied_with_best": "tied with best", "train_min": "cost: train min", "img_per_s": "images/s",
                 "stop_reason": "stopped by"}


def write_sweep_report(df, swept: Sequence[str], out_dir: str | Path, name: str,
                       summary: Sequence[str] = (), grids: dict | None = None, heat: dict | None = None) -> Path:
    """reports/sweeps/<name>/report.html: the winner with what is not distinguishable from it, figures
    inline, a sample grid per trial at its best EMA length, every trial x EMA length sorted by FID with
    its uncertainty and cost, early-stopped trials marked, the FID record on every row."""
    import html
    out = Path(out_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {html.escape(name)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:12px}"
             ".scroll{overflow-x:auto;max-width:100%}td.rec{min-width:18em}"
             ".rec{color:#555}.grids{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:190px;font-size:11px}"
             "tr.stopped td{color:#999;font-style:italic}</style></head><body>", f"<h1>Sweep {html.escape(name)}</h1>"]
    for line in summary:
        parts.append(f"<p>{html.escape(line)}</p>")
    for fig, title in (("fid_vs_ema.png", "FID against EMA length, per trial"),
                       ("best_fid_vs_param.png", "Best FID against each swept parameter"),
                       ("trial_timeline.png", "Trial timeline (one bar per trial) and trials running at once")):
        if (out / fig).is_file():
            parts.append(f"<h2>{title}</h2>{_img_tag(out / fig, title)}")
    if grids:                                    # one grid per trial, at its best EMA length
        parts.append("<h2>Samples per trial, at its best EMA length</h2><div class='grids'>")
        best_rows = df[df["fid"].notna()].groupby("trial_id").first()
        for tid, (png, s_rel) in grids.items():
            vals = ", ".join(f"{k.split('.')[-1]}={_fmt(best_rows.loc[tid, k])}" for k in swept if k in best_rows)
            cap = f"trial {tid}: {vals + ', ' if vals else ''}sigma_rel {s_rel:.3f}, FID {best_rows.loc[tid, 'fid']:.2f}"
            parts.append(f"<figure><a href='samples/{png.name}' target='_blank'>{_img_tag(png, cap, 180)}</a>"
                         f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</div>")
    if heat:                                     # post-hoc grid: FID over EMA length x w, per guide, per trial
        parts.append("<h2>Post-hoc grid per trial: FID over EMA length x guidance weight, one panel per guide</h2>")
        for tid, png in heat.items():
            parts.append(f"<p>trial {html.escape(str(tid))}</p>{_img_tag(png, f'grid {tid}')}")
    cols = ["trial_id", *swept, "status", "nimg", "final_loss", "val_loss", "sigma_rel", "guide", "guidance", "steps",
            "fid", "fid_se", "fid_lo", "fid_hi", "kid", "tied_with_best", "same_as", "train_min", "img_per_s",
            "stop_reason"]
    if "guide" in df.columns and (df["guide"].fillna("none") == "none").all():   # no post-hoc grid: no such columns
        cols = [c for c in cols if c not in ("guide", "guidance", "same_as")]
    cols = [c for c in cols if c in df.columns]
    parts.append("<h2>Trials x EMA lengths, sorted by FID</h2><div class='scroll'><table><tr>" +
                 "".join(f"<th>{html.escape(SWEEP_HEADERS.get(c, c))}</th>" for c in cols) + "<th>FID record</th></tr>")
    for _, r in df.iterrows():
        rec = ""
        if r.get("fid") == r.get("fid") and r.get("fid") is not None:     # not NaN
            rec = (f"{r['feature_net']}, {r['mode']}, {_fmt(r['num_images'])} vs {_fmt(r['ref_num_images'])} "
                   f"({r['reference']}), NFE {_fmt(r['nfe'])}, churn {_fmt(r['churn'])}, seeds {r['seeds']}")
        cells = "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols)
        cls = " class='stopped'" if r.get("status") in ("early-stopped", "error", "interrupted") else ""
        parts.append(f"<tr{cls}>{cells}<td class='rec'>{html.escape(rec)}</td></tr>")
    parts.append("</table></div></body></html>")
    from .io import atomic_write_text
    return atomic_write_text("\n".join(parts), out / "report.html")


def _fmt(v) -> str:
    """A table cell: NaN/None empty, whole numbers without a decimal point (pandas makes counts floats)."""
    if isinstance(v, (float, np.floating)):
        return "" if v != v else (str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}")
    return "" if v is None else str(v)

