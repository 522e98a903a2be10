"""A sweep's results: one table row per trial x post-hoc point, read from each trial's own folder; the
figures and HTML report beside it; the printed summary (the winner with its uncertainty, what is not
resolved); and every trial's MLflow run closed with its true status."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..io import atomic_write_text
from ..io import read_json
from .algorithms import scheduler_entry, search_algorithm
from .schema import SweepConfig
from .space import searched_range, trial_name
from .trial_state import read_trial_state, trial_nodes, trial_status


def close_trial_runs(trials_dir: Path, uri: str, status_by_trial: dict, default: str | None = None,
                     scheduler: str = "asha") -> None:
    """End every trial's MLflow run truthfully: finished -> FINISHED, error -> FAILED, stopped by the
    scheduler -> KILLED (tag stop_reason=<scheduler>), interrupted -> KILLED (tag stop_reason=interrupted, --resume continues
    it). `default`: the status for runs still RUNNING when the sweep itself failed or was stopped."""
    if not trials_dir.is_dir():
        return
    from ..tracking.store import TrackingError, client_for
    try:
        client = client_for(uri)
    except TrackingError as err:                            # bookkeeping must not hide the results
        print(f"sweep: could not set the trials' MLflow statuses ({err})", file=sys.stderr)
        return
    for t in sorted(trials_dir.iterdir()):
        id_file = t / "run" / "mlflow_run_id"
        if not id_file.is_file():
            continue
        run_id = id_file.read_text().strip()
        try:
            run = client.get_run(run_id)
        except Exception:                                    # unreachable server or unknown id: nothing to close
            continue
        status = status_by_trial.get(t.name)
        if status is None:
            if default is None or run.info.status != "RUNNING":
                continue
            new, reason = default, "sweep-" + default.lower()
        else:
            new, reason = {"finished": ("FINISHED", None), "error": ("FAILED", "error"),
                           "early-stopped": ("KILLED", scheduler), "interrupted": ("KILLED", "interrupted")}[status]
        try:
            if reason:
                client.set_tag(run_id, "stop_reason", reason)
            if run.info.status != new:
                client.set_terminated(run_id, new)
            for child in client.search_runs([run.info.experiment_id],
                                            f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"):
                client.set_terminated(child.info.run_id, "KILLED" if new != "FINISHED" else "FINISHED")
        except Exception as err:                             # bookkeeping must not hide the results
            print(f"sweep: could not set the MLflow status of trial {t.name} ({err.__class__.__name__})",
                  file=sys.stderr)


def stop_reason(stop: dict) -> str:
    """Why a trial has no FID: which scheduler stopped it, when, on what."""
    return f"{scheduler_entry(stop.get('scheduler', 'asha')).title} at nimg={stop['nimg']} on {stop['metric']}"


def results_table(trials_dir: Path, sweep: SweepConfig, stopped: dict | None = None, the_plan: dict | None = None):
    """One row per trial x post-hoc point (the FID record fields with their uncertainty and the swept
    values), from each trial's own folder (trial.json, fid_records.json); a trial without results gets
    one row saying why: early-stopped (by the scheduler), error, or interrupted (a planned trial that never
    started included, with its planned values). `tied_with_best` marks the rows not distinguishable
    from the best (paired bootstrap)."""
    import pandas as pd

    from ..records import eval_key, read_records, to_row
    from ..stats import rank
    stopped = stopped or {}
    planned = {trial_name(i): pt for i, pt in enumerate((the_plan or {}).get("points") or []) if pt is not None}
    names = list(planned) if search_algorithm(sweep.algorithm).planned else \
        [t.name for t in sorted(trials_dir.iterdir()) if t.is_dir()] if trials_dir.is_dir() else []
    rows, recs = [], []
    for trial_id in names:
        t = trials_dir / trial_id
        state = read_trial_state(t)
        if state.get("status") == "superseded":
            continue
        params = {**planned.get(trial_id, {}), **(state.get("params") or {})}
        if any(k not in params for k in sweep.search):      # an unfinished trial: its values from its own config
            params = {**trial_config_values(t, list(sweep.search)), **params}
        cost = read_json(t / "run" / "train_summary.json")
        nodes = trial_nodes(t)
        base = {"trial_id": trial_id, **params, "node": nodes[-1] if nodes else None, "nodes": ",".join(nodes) or None,
                "nimg": state.get("nimg"), "final_loss": state.get("loss"), "val_loss": state.get("val_loss"),
                "train_min": round(cost["train_seconds_total"] / 60, 2) if cost.get("train_seconds_total") else None,
                "img_per_s": cost.get("images_per_s"), "started_at": state.get("started_at"),
                "ended_at": state.get("ended_at") or state.get("updated_at"),
                **{f"seconds_{k}": v for k, v in (state.get("phases") or {}).items()}}
        status = trial_status(t, stopped)
        if status == "finished" or (status == "early-stopped" and (t / "fid_records.json").is_file()):
            for r in read_records(t / "fid_records.json", "trial records"):
                same_as = (r.get("extra") or {}).get("same_as")
                if not same_as:                              # rank each computation once
                    recs.append(r)
                flat = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}   # scalar record fields
                rows.append({**base, "status": status, **flat, **to_row(r),               # every metric as columns
                             **({"stop_reason": stop_reason(stopped[trial_id])} if status != "finished" else {})})
        else:
            rows.append({**base, "status": status, "fid": None, "sigma_rel": None,
                         "stop_reason": (stop_reason(stopped[trial_id])
                                         if status == "early-stopped" else state.get("error"))})
    df = pd.DataFrame(rows)
    if recs:
        rk = rank(recs)
        tied = {recs[i].get("eval_key") or eval_key(recs[i]) for i in rk["tied"]}
        keys = df["same_as"].where(df["same_as"].notna(), df["eval_key"]) if "same_as" in df else df["eval_key"]
        # blank (not False) for a row without a FID: an early-stopped or failed trial is not ranked
        df["tied_with_best"] = [(k in tied) if isinstance(k, str) and fid == fid and fid is not None else None
                                for k, fid in zip(keys, df["fid"])]
    if len(df):
        df = df.sort_values(["fid", "trial_id"], na_position="last").reset_index(drop=True)
    return df


def trial_config_values(trial_dir: Path, keys: list[str]) -> dict:
    """The searched values as the trial's training recorded them (run/config.yaml, written at its start);
    none when that file is missing or unreadable."""
    from ..config import ConfigError, flatten, read_yaml
    try:
        raw = read_yaml(trial_dir / "run" / "config.yaml", "trial config")
    except ConfigError:
        return {}
    flat = flatten(raw) if isinstance(raw, dict) else {}
    return {k: flat[k] for k in keys if k in flat}


def write_table(df, out_dir: Path) -> Path:
    """results.csv (and .parquet when pyarrow is there): the table alone, what an interrupted sweep keeps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = atomic_write_text(df.to_csv(index=False), out_dir / "results.csv")
    try:
        flat = df.copy()
        for c in flat.columns:                               # parquet needs one type per column
            if flat[c].map(lambda v: isinstance(v, (list, dict))).any():
                flat[c] = flat[c].map(json.dumps)
        flat.to_parquet(out_dir / "results.parquet", index=False)
    except ImportError as err:                               # pyarrow missing: CSV is enough
        print(f"sweep: no parquet file ({err})", file=sys.stderr)
    return csv


def write_results(df, out_dir: Path, sweep: SweepConfig) -> Path:
    """The table, the figures and the report."""
    from ..figures import plot_best_vs_param, plot_fid_vs_ema
    from ..report import write_sweep_report
    csv = write_table(df, out_dir)
    done = df[df["fid"].notna()] if len(df) else df
    if len(done):
        swept = list(sweep.search)
        label = (lambda r: ", ".join(f"{k.split('.')[-1]}={r[k]:.4g}" if isinstance(r[k], float) else
                                     f"{k.split('.')[-1]}={r[k]}" for k in swept)) if swept else (lambda r: r["trial_id"])
        rows = [{"sigma_rel": r["sigma_rel"], "fid": r["fid"], "fid_ci95": [r["fid_lo"], r["fid_hi"]], "label": label(r)}
                for _, r in done.iterrows()]
        plot_fid_vs_ema(rows, out_dir / "fid_vs_ema.png", f"sweep {sweep.name}: FID vs EMA length per trial "
                        f"(bars: 95% bootstrap interval)")
        if swept:
            best = done.loc[done.groupby("trial_id")["fid"].idxmin()]
            no_fid = df[df["fid"].isna()]
            ranges = {k: searched_range(a) for k, a in sweep.search.items()}
            plot_best_vs_param(best, swept, out_dir / "best_fid_vs_param.png", sweep.name, stopped=no_fid,
                               ranges=ranges)
    if len(df) and "started_at" in df and df["started_at"].notna().any():
        from ..figures import plot_trial_timeline
        spans = df.groupby("trial_id").agg(start=("started_at", "first"), end=("ended_at", "first"),
                                           status=("status", "first")).reset_index()
        plot_trial_timeline(spans, sweep.max_concurrent, out_dir / "trial_timeline.png", sweep.name)
    grids = trial_grids(done, out_dir / "samples")
    heat = {}
    for tid in (done["trial_id"].unique() if len(done) else []):       # per-trial heat maps of a post-hoc grid
        src = Path(done.loc[done["trial_id"] == tid, "model_file"].iloc[0]).parent.parent / "fid_grid.png"
        if src.is_file():
            import shutil
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            heat[tid] = Path(shutil.copy(src, out_dir / "samples" / f"{tid}-fid_grid.png"))
    write_sweep_report(df, list(sweep.search), out_dir, sweep.name, summary_lines(df, sweep), grids, heat)
    return csv


def trial_grids(done, out: Path) -> dict:
    """Each finished trial's sample grid at its best EMA length, copied beside the sweep report:
    {trial_id: (png path, sigma_rel)}."""
    import shutil
    grids = {}
    if not len(done):
        return grids
    for _, r in done.loc[done.groupby("trial_id")["fid"].idxmin()].iterrows():
        model = Path(r["model_file"])
        name = r.get("samples") if isinstance(r.get("samples"), str) else f"samples-{model.stem}.png"
        src = model.parent.parent / "samples" / name              # evaluate_run's layout: <trial>/samples
        if src.is_file():
            out.mkdir(parents=True, exist_ok=True)
            grids[r["trial_id"]] = (Path(shutil.copy(src, out / f"{r['trial_id']}-{src.name}")), r["sigma_rel"])
    return grids


def summary_lines(df, sweep: SweepConfig) -> list[str]:
    """The winner with its uncertainty, what is not distinguishable from it, and edge warnings."""
    from ..stats import edge_note
    done = df[df["fid"].notna()] if len(df) else df
    if "same_as" in done:                                   # each computation once
        done = done[done["same_as"].isna()]
    if not len(done):
        return ["no trial finished"]
    best = done.loc[done["fid"].idxmin()]
    swept = ", ".join(f"{k}={best[k]}" for k in sweep.search)
    lines = [f"winner: FID {best['fid']:.2f} +- {best['fid_se']:.2f} (95% {best['fid_lo']:.1f}-{best['fid_hi']:.1f}) "
             f"at EMA sigma_rel {best['sigma_rel']:.3f} ({swept or 'base config'}); trial {best['trial_id']}, "
             f"{int(best['num_images'])} images, NFE {int(best['nfe'])}, {best['feature_net']}"]
    if "tied_with_best" in done:
        tied = done[done["tied_with_best"].fillna(False).astype(bool) & (done["eval_key"] != best["eval_key"])]
        names = [f"trial {r['trial_id']} sigma_rel {r['sigma_rel']:.3f} (FID {r['fid']:.2f})" for _, r in tied.iterrows()]
        lines.append(f"not distinguishable from the winner (paired 95% interval of the difference contains 0): "
                     f"{len(names)} of {len(done) - 1}" + (": " + "; ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                                                         if names else ": none, the winner is resolved"))
    if sweep.search:
        lines.append(ranked_by(df, sweep))
    notes = [edge_note(done["sigma_rel"], best["sigma_rel"], "sigma_rel")]
    for key, axis in sweep.search.items():
        lo_hi = axis.uniform or axis.loguniform
        values = axis.grid or axis.choice
        if lo_hi:
            notes.append(edge_note(list(lo_hi), float(best[key]), key, *lo_hi))
        elif values and all(isinstance(v, (int, float)) for v in values):
            notes.append(edge_note(values, float(best[key]), key))
    lines += [f"note: {n}" for n in notes if n]
    spent = time_line(df)
    return lines + ([spent] if spent else [])


PHASES = ("worker_start", "training", "validation", "evaluation", "tracking", "figures")   # trial.json "phases"


def time_line(df) -> str | None:
    """Where the trials' time went, summed over trials (trial.json's phases; "other" is the rest of
    their wall time: checkpoints, snapshots, records, reports to Tune): the sweep's overhead in its
    own report."""
    cols = [p for p in PHASES if f"seconds_{p}" in df]
    if not len(df) or not cols or "started_at" not in df:
        return None
    per = df.groupby("trial_id").first()
    per = per[per["started_at"].notna() & per["ended_at"].notna() & per[f"seconds_{cols[0]}"].notna()]
    # + worker start: a fresh worker's start comes before the trial function (started_at) runs
    wall = float((per["ended_at"] - per["started_at"]
                  + (per["seconds_worker_start"].fillna(0) if "seconds_worker_start" in per else 0.0)).sum())
    if not len(per) or wall <= 0:
        return None
    parts = {p: float(per[f"seconds_{p}"].fillna(0).sum()) for p in cols}
    parts["other"] = max(wall - sum(parts.values()), 0.0)
    return (f"time in {len(per)} trial(s), {wall:.0f} s of trial wall time: "
            + ", ".join(f"{p.replace('_', ' ')} {v:.1f} s ({v / wall:.0%})" for p, v in parts.items()))


def ranked_by(df, sweep: SweepConfig) -> str:
    """What the searched axes were ranked by: FID for every trial, or FID for some and the scheduler's
    loss for the trials it stopped without a FID."""
    per_trial = df.groupby("trial_id").agg(status=("status", "first"), fid=("fid", "max"))
    stopped = per_trial[per_trial["status"] == "early-stopped"]
    measured = int(stopped["fid"].notna().sum())
    with_fid = int(per_trial["fid"].notna().sum())
    text = f"ranked by: FID for {with_fid} of {len(per_trial)} trials"
    if measured:
        text += f" ({measured} stopped early, measured from their last snapshots: less training)"
    if len(stopped) > measured:
        text += (f"; {len(stopped) - measured} stopped early by {scheduler_entry(sweep.scheduler.type).title} have "
                 f"no FID, only {sweep.scheduler.metric} at their stop (scheduler.evaluate_stopped: true measures "
                 f"them, no retraining)")
    return text


def print_summary(df, best: dict | None, sweep: SweepConfig, table_path: Path) -> None:
    status = df.groupby("trial_id")["status"].first() if len(df) else None
    counts = status.value_counts().to_dict() if status is not None else {}
    n_trials = len(status) if status is not None else 0
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"\nsweep {sweep.name}: {n_trials} trials ({parts or 'none'}), {len(df)} rows -> {table_path}")
    for line in summary_lines(df, sweep):
        print(line)
    if counts.get("early-stopped"):
        print(f"{counts['early-stopped']} trial(s) were stopped early by {scheduler_entry(sweep.scheduler.type).title} on "
              f"{sweep.scheduler.metric}: that is final (--resume does not rerun them)")
    if counts.get("interrupted"):
        print(f"{counts['interrupted']} trial(s) were interrupted: the same command with --resume finishes them "
              f"from their checkpoints and keeps the rest")
    if counts.get("error"):
        print(f"{counts['error']} trial(s) failed after {sweep.max_failures} retries: see their error in the Ray "
              f"logs under {sweep.storage}/{sweep.name}")
