"""The sweep's tables (axis kinds, search algorithms, schedulers): every entry reaches the schema, the
plan and the docs; every scheduler's early stops are recorded, checked on a real Ray Tune run of a
stub trainable behind the same scheduler construction (the tiny-training ASHA sweep in test_sweep.py
is the end-to-end test of the same path)."""
import pytest
from conftest import ROOT

from pipeline.sweep import algorithms as A
from pipeline.sweep.schema import SweepConfig


def _stub(config):
    """A trial as Tune sees it: a report per 'snapshot' (worse for higher trial numbers), then the final
    report with best_fid, as trial.trial_body does."""
    from ray import tune

    from pipeline.sweep.space import split_config
    name, values = split_config(config, "x")
    quality = values["train.ref_lr"]
    for nimg in range(1, 17):
        tune.report({"nimg": nimg, "val_loss": quality + 1.0 / nimg})
    tune.report({"nimg": 16, "val_loss": quality, "best_fid": quality, "done": True})


@pytest.mark.integration
@pytest.mark.parametrize("scheduler, eta", [("asha", 2), ("hyperband", 4)])
def test_every_scheduler_records_exactly_the_trials_it_stops(tmp_path, monkeypatch, scheduler, eta):
    ray = pytest.importorskip("ray")
    from ray import tune

    from pipeline.sweep.cluster import prepare_ray_env
    from pipeline.sweep.space import point_space, trial_name
    sweep = SweepConfig.model_validate({"name": "x", "ema_lengths": [0.1], "max_concurrent": 2, "scheduler": {
        "type": scheduler, "reduction_factor": eta, "grace_period_nimg": 2}})
    points = [(trial_name(i), {"train.ref_lr": float(i)}) for i in range(9)]
    for name, _ in points:                                               # the trials' own folders
        (tmp_path / "trials" / name).mkdir(parents=True)
    prepare_ray_env(None)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}:{ROOT}")         # the workers import _stub from here
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(tune.with_resources(_stub, {"cpu": 1}), param_space=point_space(points),
                           tune_config=tune.TuneConfig(scheduler=A.build_scheduler(sweep, 17, tmp_path),
                                                       max_concurrent_trials=A.tune_concurrency(sweep)),
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    finished = {r.config["_point"]["_trial"] for r in grid if "best_fid" in (r.metrics or {})}
    stopped = A.read_stopped(tmp_path)
    assert stopped, f"{scheduler} stopped nothing"
    assert set(stopped) | finished == {n for n, _ in points} and not set(stopped) & finished
    assert {v["scheduler"] for v in stopped.values()} == {scheduler}
    assert all(v["metric"] == "val_loss" and v["nimg"] < 16 for v in stopped.values())
    import json                                                          # each stop in the trial's own record at once
    states = {n: json.loads(p.read_text()) for n in stopped if (p := tmp_path / "trials" / n / "trial.json").is_file()}
    assert set(states) == set(stopped) and all(st["status"] == "early-stopped" for st in states.values())
    assert not any((tmp_path / "trials" / n / "trial.json").is_file() for n in finished)
