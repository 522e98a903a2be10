"""Reading runs back for tables (`pipeline runs`, sweep tables): MLflow -> one pandas row per
training x post-hoc point.
"""
from __future__ import annotations

import json

from .store import TrackingError, client_for, tracking_uri


def load_runs(experiment: str, uri: str | None = None, sweep: str | None = None):
    """One row per (training run or trial) x post-hoc point, from MLflow: the run's swept/config
    params, the EMA length, guide and guidance weight, its FID and FID record fields, and the cost
    (seconds, GPU-seconds). A training run without evaluations yet has one row (no FID, its final loss).

    `sweep`: a sweep name (parent run `sweep-<name>`) or a parent run id to restrict to one sweep.
    """
    import pandas as pd
    client = client_for(uri or tracking_uri(), existing=True)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as err:                        # a database that is not MLflow's, a server error
        raise TrackingError(f"tracking URI {client.tracking_uri!r}: {err.__class__.__name__}: "
                            f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}") from None
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}")
    runs = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    by_id = {r.info.run_id: r for r in runs}
    sweep_ids = None
    if sweep:
        sweep_ids = {r.info.run_id for r in runs if r.info.run_id == sweep or r.info.run_name == f"sweep-{sweep}"}
        if not sweep_ids:
            raise TrackingError(f"no sweep {sweep!r} in experiment {experiment!r}")
    rows = []
    for r in runs:
        train = by_id.get(r.data.tags.get("mlflow.parentRunId"))
        if r.data.tags.get("kind") != "ema" or train is None or not _in_sweep(train, sweep_ids):
            continue
        head, tail = _training_cells(train, by_id)
        rows.append({**head, "sigma_rel": float(r.data.params.get("sigma_rel", "nan")),
                     "guide": r.data.params.get("guide", "none"), "guidance": float(r.data.params.get("guidance", 1.0)),
                     "same_as": r.data.tags.get("same_as"), "fid": None, "fid_se": None, "kid": None,
                     **r.data.metrics,                        # every metric the record had: fid, kid, precision ...
                     "num_images": int(r.data.params.get("num_images", 0)), "nfe": int(r.data.params.get("nfe", 0)),
                     "ref_num_images": int(r.data.params.get("ref_num_images", 0)),
                     "seeds": r.data.params.get("seeds"), "feature_net": r.data.tags.get("feature_net"),
                     "reference": r.data.tags.get("reference"), **tail})
    evaluated = {row["run_id"] for row in rows}
    for train in runs:                                 # trainings without evaluations (e.g. a SLURM job): one row each
        tags = train.data.tags
        if "run_key" not in tags or tags.get("kind") in ("ema", "sweep") or train.info.run_id in evaluated \
                or not _in_sweep(train, sweep_ids):
            continue
        head, tail = _training_cells(train, by_id)
        rows.append({**head, "fid": None, **tail, "evaluated": False})
    df = pd.DataFrame(rows)
    if len(df):
        params = [c for c in df.columns if c.startswith("param.")]
        varying = [c for c in params if df[c].astype(str).nunique() > 1 and not c.endswith("run_dir")]
        df = df.drop(columns=[c for c in params if c not in varying])     # keep what differs between runs
        order = [c for c in ("fid", "run_name", "sigma_rel") if c in df.columns]   # trainings alone have no sigma_rel
        df = df.sort_values(order).reset_index(drop=True)
    return df


def _in_sweep(train, sweep_ids: set | None) -> bool:
    return sweep_ids is None or train.data.tags.get("mlflow.parentRunId") in sweep_ids


def _training_cells(train, by_id: dict) -> tuple[dict, dict]:
    """A training run's cells of a row: (what comes first: sweep, run, status; what comes last: its cost
    and params), shared by its evaluated rows and its row without evaluations."""
    parent = by_id.get(train.data.tags.get("mlflow.parentRunId"))
    seconds = train.data.metrics.get("train_seconds")
    gpus = float(train.data.tags.get("gpus", "0") or 0)
    head = {"sweep": parent.info.run_name if parent else None, "run_id": train.info.run_id,
            "run_name": train.info.run_name, "status": train.info.status}
    tail = {"final_loss": train.data.metrics.get("final_loss"),      # the training's, on each of its rows
            "train_seconds": seconds, "gpu_seconds": seconds * gpus if seconds is not None else None,
            **{f"param.{k}": _parse(v) for k, v in train.data.params.items()}}
    return head, tail


def _parse(v: str):
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v



COMPACT_WIDTH = 120


def compact(df, width: int = COMPACT_WIDTH):
    """One row per training run: run, status, the params that differ between the runs, the best FID
    with its 95 % interval and EMA length, the final loss; as many param columns as fit `width`
    (returns the table and the names of the params left out)."""
    import pandas as pd
    if not len(df):
        return df, []
    rows = []
    for run_id, g in df.groupby("run_id", sort=False):
        evaluated = g[g["fid"].notna()] if "fid" in g else g.iloc[0:0]
        best = evaluated.loc[evaluated["fid"].idxmin()] if len(evaluated) else None
        first = g.iloc[0]
        row = {"run": str(first["run_name"]), "status": first["status"]}
        row.update({c[len("param."):]: first[c] for c in g.columns if c.startswith("param.")})
        row["best_fid"] = _fid_cell(best)
        row["sigma_rel"] = best["sigma_rel"] if best is not None and "sigma_rel" in best else None
        row["final_loss"] = first.get("final_loss")
        rows.append(row)
    out = pd.DataFrame(rows)
    params = [c for c in out.columns if c not in ("run", "status", "best_fid", "sigma_rel", "final_loss")]
    out = out.rename(columns={p: p.rsplit(".", 1)[-1] if sum(q.rsplit(".", 1)[-1] == p.rsplit(".", 1)[-1]
                                                              for q in params) == 1 else p for p in params})
    params = [c for c in out.columns if c not in ("run", "status", "best_fid", "sigma_rel", "final_loss")]
    reserve = min(30, sum(2 + max(len(str(c)), int(out[c].astype(str).str.len().max())) for c in params))
    for n in (60, 48, 40, 34, 28):                # the run's name as long as the table allows
        names = out["run"].map(lambda t: _short(t, n))
        if _width(out[["status", "best_fid", "sigma_rel", "final_loss"]].assign(run=names)) <= width - reserve:
            break
    out["run"] = names
    shown = [c for c in out.columns if c in ("run", "status")]
    left = []
    fixed = ["best_fid", "sigma_rel", "final_loss"]
    for c in out.columns:
        if c in shown or c in fixed:
            continue
        if _width(out[[*shown, c, *fixed]]) <= width:
            shown.append(c)
        else:
            left.append(c)
    return out[[*shown, *fixed]], left


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _fid_cell(best) -> str | None:
    if best is None:
        return None
    lo, hi = best.get("fid_lo"), best.get("fid_hi")
    if lo is not None and hi is not None and lo == lo and hi == hi:     # not NaN
        return f"{best['fid']:.2f} [{lo:.1f}, {hi:.1f}]"
    return f"{best['fid']:.2f}"


def _width(df) -> int:
    return max(len(line) for line in df.to_string(index=False, na_rep="-").splitlines())
