"""What a sweep will do, without running it (`--dry-run` and the head of every sweep's log): trials,
axes, post-hoc EMA lengths, images to train and to generate."""
from __future__ import annotations

from .algorithms import scheduler_entry, search_algorithm


def plan(sweep, base) -> dict:
    """What a sweep will do, without running it: trials (their values where known in advance), axes,
    EMA lengths, images to train and to generate."""
    from ..evaluate import evaluation_points
    points = search_algorithm(sweep.algorithm).points(sweep)
    n = len(points)
    per_trial = evaluation_points(base)
    lengths = sorted({p["sigma_rel"] for p in per_trial})
    return {"name": sweep.name, "algorithm": sweep.algorithm, "seed": sweep.seed, "trials": n, "points": points,
            "axes": {k: v.model_dump(exclude_none=True) for k, v in sweep.search.items()},
            "ema_lengths": list(lengths), "images_to_train": n * base.train.duration_nimg,
            "fids": n * len(per_trial), "images_to_generate": n * len(per_trial) * base.metrics.num_images,
            "posthoc": sweep.posthoc.model_dump(mode="json") if sweep.posthoc is not None else None,
            "scheduler": sweep.scheduler.model_dump(), "max_concurrent": sweep.max_concurrent,
            "resources": sweep.resources.model_dump()}


def print_plan(p: dict) -> None:
    print(f"sweep {p['name']}: {p['trials']} trial(s), algorithm {p['algorithm']} (seed {p['seed']}), "
          f"at most {p['max_concurrent']} at once, each {p['resources']}")
    for k, v in p["axes"].items():
        print(f"  axis {k}: {v}")
    print(f"  post-hoc EMA lengths (no retraining): {', '.join(f'{x:g}' for x in p['ema_lengths'])}")
    if p.get("posthoc"):
        ph = p["posthoc"]
        print(f"  post-hoc grid per trial (no retraining): guides {ph['guide']}, guidance {ph['guidance']}"
              + (f", steps {ph['steps']}" if ph["steps"] else ""))
    drawn_by = search_algorithm(p["algorithm"]).label
    for i, pt in enumerate(p["points"]):
        print(f"  trial {i + 1}: " + ((", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in pt.items()) or "the base config") if pt is not None
                                            else f"drawn by {drawn_by} during the sweep"))
    sched = p["scheduler"]
    entry = scheduler_entry(sched["type"])
    stops = entry.stops
    print(f"  scheduler: {sched['type']}" + (f" on {sched['metric']}" if stops else "")
          + (f", grace {sched['grace_period_nimg']} images" if entry.uses_grace else ""))
    early = f" (at most: {entry.title} may stop trials early)" if stops else ""
    print(f"  images to train: {p['images_to_train']:,}{early}; FIDs: {p['fids']} "
          f"({p['images_to_generate']:,} images to generate)")
