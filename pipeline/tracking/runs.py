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
        rows.append({**head, "fid": None, "final_loss": train.data.metrics.get("final_loss"), **tail,
                     "evaluated": False})
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
    tail = {"train_seconds": seconds, "gpu_seconds": seconds * gpus if seconds is not None else None,
            **{f"param.{k}": _parse(v) for k, v in train.data.params.items()}}
    return head, tail


def _parse(v: str):
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v

