"""What a sweep pays for and how it ends: the validation loss only when used, per-trial figures only
for small sweeps, an interrupted trial's values from its own config, a results table with unfinished
trials that draws and reports, the parent run's summary, Ctrl-C as one line."""
import json

import pandas as pd
import pytest
import yaml

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.sweep.driver import parent_summary
from pipeline.sweep.results import results_table, write_results
from pipeline.sweep.schema import (PER_TRIAL_FIGURES_UP_TO, SweepConfig, wants_trial_figures, wants_validation)


def sweep_of(**changes) -> SweepConfig:
    return SweepConfig.model_validate({"name": "s", "search": {"train.ref_lr": {"loguniform": [0.001, 0.1]}},
                                       "algorithm": "random", "num_samples": 3, **changes})


def test_validation_loss_runs_only_when_a_scheduler_ranks_by_it_or_it_is_asked_for():
    assert not wants_validation(sweep_of())
    assert wants_validation(sweep_of(scheduler={"type": "asha", "metric": "val_loss"}))
    assert not wants_validation(sweep_of(scheduler={"type": "asha", "metric": "loss"}))
    assert wants_validation(sweep_of(validation={"enabled": True}))
    with pytest.raises(ValueError, match="validation.enabled is false"):
        sweep_of(scheduler={"type": "asha", "metric": "val_loss"}, validation={"enabled": False})


def test_per_trial_figures_only_for_small_sweeps_unless_set():
    s = sweep_of()
    assert wants_trial_figures(s, PER_TRIAL_FIGURES_UP_TO) and not wants_trial_figures(s, PER_TRIAL_FIGURES_UP_TO + 1)
    assert wants_trial_figures(sweep_of(per_trial_figures=True), 500)
    assert not wants_trial_figures(sweep_of(per_trial_figures=False), 2)


def record_row(trial, lr, fid, sigma_rel):
    return dict(trial_id=trial, **{"train.ref_lr": lr}, status="finished", fid=fid, fid_lo=fid - 10, fid_hi=fid + 10,
                fid_se=5.0, sigma_rel=sigma_rel, eval_key=f"k{trial}{sigma_rel}", model_file="/none/ema/m.safetensors",
                num_images=4, nfe=7, feature_net="inception", mode="clean", ref_num_images=8, reference="test",
                churn=0, seeds="0-3", tied_with_best=trial == "t0", started_at=1000.0 + int(trial[1:]) * 10,
                ended_at=1030.0 + int(trial[1:]) * 10)


def test_results_with_a_trial_that_never_recorded_its_values_draw_and_report(tmp_path):
    """The Ctrl-C traceback of #26: an interrupted trial without a value for the searched axis made the
    figure compare float with str. It is now drawn without that point, and the report is written."""
    df = pd.DataFrame([record_row("t0", 0.01, 100.0, 0.1), record_row("t1", 0.02, 120.0, 0.05),
                       dict(trial_id="t2", status="interrupted", fid=None, sigma_rel=None, stop_reason=None)])
    sweep = sweep_of()
    write_results(df, tmp_path, sweep)
    for f in ("results.csv", "best_fid_vs_param.png", "fid_vs_ema.png", "trial_timeline.png", "report.html"):
        assert (tmp_path / f).is_file(), f
    assert "t2" in (tmp_path / "report.html").read_text()
    tags = parent_summary(df, df.iloc[0].to_dict(), sweep)
    assert tags["best_trial"] == "t0" and tags["resolved"] == "yes" and "winner: FID 100.00" in tags["mlflow.note.content"]


def test_an_unfinished_trial_takes_its_values_from_its_own_config(tmp_path):
    """Unplanned (Optuna-like) trials: the one interrupted before its trial.json listed its values gets
    them from run/config.yaml, which its training wrote at the start."""
    sweep = sweep_of(algorithm="optuna")
    trials = tmp_path / "trials"
    (trials / "t0" / "run").mkdir(parents=True)
    (trials / "t0" / "trial.json").write_text(json.dumps({"status": "running"}))
    (trials / "t0" / "run" / "config.yaml").write_text(yaml.safe_dump({"train": {"ref_lr": 0.0123}}))
    table = results_table(trials, sweep, {}, None)
    assert table.loc[0, "status"] == "interrupted" and table.loc[0, "train.ref_lr"] == 0.0123


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt("sweep s: every MLflow run closed; --resume continues")
    assert cli.run("sweep", interrupted) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sweep: interrupted: sweep s: every MLflow run closed; --resume continues"]


def test_a_bad_validation_field_is_one_line(tmp_path):
    from pipeline.sweep.schema import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "search": {"train.ref_lr": {"grid": [0.01]}},
                                 "validation": {"enabled": "sometimes"}}))
    with pytest.raises(ConfigError, match="enabled"):
        load_sweep(f)


def test_the_timeline_says_how_much_of_the_time_the_sweep_ran_max_concurrent_trials():
    from pipeline.figures import _busy_fraction
    def busy(spans, k):
        spans = pd.DataFrame(spans, columns=["s", "e"])
        edges = sorted(set(spans["s"]) | set(spans["e"]))
        running = [int(((spans["s"] <= t) & (spans["e"] > t)).sum()) for t in edges]
        return _busy_fraction(edges, running, k, spans)
    assert busy([(0, 10), (0, 10), (10, 20)], 2) == 1.0          # two at once until the last one started
    assert busy([(0, 10), (10, 20), (20, 30)], 2) == 0.0         # one at a time: a synchronous sweep
    assert busy([(0, 10), (5, 15), (15, 20)], 2) == pytest.approx(1 / 3)   # two at once from 5 to 10 s of 15


def test_the_report_says_where_the_trials_time_went():
    """trial.json's phases become seconds_* columns; the summary's last line sums them, the rest of the
    trials' wall time (worker start included) being "other"."""
    from pipeline.sweep.results import time_line
    rows = [{**record_row(t, 0.01, 100.0 + i, 0.1), "seconds_worker_start": 2.0 if i == 0 else 0.0,
             "seconds_training": 10.0, "seconds_evaluation": 6.0, "seconds_tracking": 1.0} for i, t in enumerate(["t0", "t1"])]
    line = time_line(pd.DataFrame(rows))                   # each trial ran 30 s; t0's worker took 2 s to start
    assert line.startswith("time in 2 trial(s), 62 s of trial wall time")
    assert "training 20.0 s (32%)" in line and "tracking 2.0 s (3%)" in line and "other 26.0 s (42%)" in line
    assert time_line(pd.DataFrame([record_row("t0", 0.01, 100.0, 0.1)])) is None    # no phases recorded


def test_compile_auto_compiles_from_the_break_even_and_the_switch_refuses_numbers():
    from pipeline.config import resolve
    from pipeline.devices import COMPILE_BREAK_EVEN, compile_wanted
    assert resolve().train.compile == "auto" and resolve().sampler.compile == "auto"
    be = COMPILE_BREAK_EVEN["train"]["cpu"]
    assert compile_wanted("auto", "train", "cpu", be) and not compile_wanted("auto", "train", "cpu", be - 1)
    assert compile_wanted(True, "train", "cpu", 1) and not compile_wanted(False, "sample", "cpu", 10 ** 9)
    assert not compile_wanted("auto", "sample", "meta", 10 ** 9)            # a device without a measurement
    assert resolve(overrides=["train.compile=false"]).train.compile is False
    with pytest.raises(ConfigError, match="expected true or false"):
        resolve(overrides=["sampler.compile=1"])
