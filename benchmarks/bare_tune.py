"""The bare baseline of benchmarks.sweep_overhead: the Ray Tune script a researcher would write by hand
around the pipeline's own training and evaluation functions (no MLflow, no trial records, no table,
report or figures; Ray Tune's defaults otherwise, or with `--reuse-actors`, the one switch of Ray's that the
pipeline sets for one-process trials). It writes its times (epoch seconds) to
<workdir>/bare_times.json and each trial's phases to <workdir>/bare/<trial>/phases.json.

    python -m benchmarks.bare_tune --workdir DIR --trials N      (DIR holds params.yaml)
"""
from __future__ import annotations

import argparse
import json
import time

T_START = time.time()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--trials", type=int, required=True)
    p.add_argument("--overrides", required=True, help="JSON {dotted key: value}: the tiny trial")
    p.add_argument("--lr-range", type=float, nargs=2, default=[0.003, 0.03])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-actors", action="store_true", help="TuneConfig(reuse_actors=True) (default: Ray's)")
    args = p.parse_args(argv)
    from pathlib import Path

    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from pipeline import config as C
    from pipeline.data.encode import ensure_encoded
    from pipeline.metrics import references
    work = Path(args.workdir).resolve()
    base = C.load_config(work / "params.yaml", {**json.loads(args.overrides), "tracking.enabled": False})
    ensure_encoded(base)
    ref_cache = str(work / "bare-fid-ref")
    references(base, "cpu", ref_cache, progress=False)                  # once, before the trials
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_dict = {k: v for k, v in base.to_dict().items() if k != "preset"}
    fit_at = time.time()

    def trainable(config):
        import os
        import sys
        entered = time.time()
        first = "pipeline.training" not in sys.modules         # a fresh worker (not one Ray reused)
        from pipeline.evaluate import evaluate_run
        from pipeline.sweep.trial import process_started_at      # measured the way the pipeline measures it
        from pipeline.training import TrainHooks, train
        worker_start = time.time() - max(process_started_at() or entered, fit_at) if first else 0.0
        os.chdir(work)
        trial_dir = work / "bare" / tune.get_context().get_trial_id()
        cfg = C.resolve(base_dict, {"train.ref_lr": config["lr"], "train.run_dir": str(trial_dir / "run")})
        t1 = time.perf_counter()
        train(cfg, TrainHooks(progress=False))
        t2 = time.perf_counter()
        records = evaluate_run(cfg, trial_dir / "run" / "snapshots", trial_dir, ref_cache, "cpu")
        t3 = time.perf_counter()
        (trial_dir / "phases.json").write_text(json.dumps({
            "started_at": entered, "ended_at": time.time(),
            "phases": {"worker_start": worker_start, "training": t2 - t1, "evaluation": t3 - t2}}))
        tune.report({"fid": min(r["fid"] for r in records)})

    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                       param_space={"lr": tune.loguniform(*args.lr_range)},
                       tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=2, metric="fid",
                                                   mode="min", search_alg=BasicVariantGenerator(random_state=args.seed),
                                                   **({"reuse_actors": True} if args.reuse_actors else {})),
                       run_config=tune.RunConfig(storage_path=str(work / "bare-ray"), verbose=0))
    best = tuner.fit().get_best_result()
    ended = time.time()
    ray.shutdown()
    (work / "bare_times.json").write_text(json.dumps({"entered_at": T_START, "trials_started_at": fit_at,
                                                      "trials_ended_at": ended, "report_ended_at": ended,
                                                      "best_fid": best.metrics["fid"]}))


if __name__ == "__main__":
    main()
