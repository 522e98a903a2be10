"""The sweep's tables (axis kinds, search algorithms, schedulers): every entry reaches the schema, the
plan and the docs; every scheduler's early stops are recorded, checked on a real Ray Tune run of a
stub trainable behind the same scheduler construction (the tiny-training ASHA sweep in test_sweep.py
is the end-to-end test of the same path)."""
import re

import pytest
from conftest import ROOT

from pipeline.config import ConfigError
from pipeline.sweep import algorithms as A
from pipeline.sweep.schema import AxisSpec, SweepConfig
from pipeline.sweep.space import AXIS_KINDS, draw_points, grid_trial_points

DOC = (ROOT / "docs" / "sweeps.md")


def test_every_axis_kind_is_a_schema_field_and_drawn_or_listed():
    assert set(AXIS_KINDS) == set(AxisSpec.model_fields)
    for kind, entry in AXIS_KINDS.items():
        spec = [1, 2, 3] if entry.listed else (0.5, 2.0)
        axis = AxisSpec(**{kind: spec})
        assert axis.kind == kind and list(axis.spec) == list(spec) and axis.probe_values() == list(spec)
        if entry.draw is not None:
            import numpy as np
            v = entry.draw(np.random.default_rng(0), axis.spec)
            assert v in spec if entry.listed else spec[0] <= v <= spec[1]


def test_every_algorithm_takes_only_its_axis_kinds():
    for name, algo in A.SEARCH_ALGORITHMS.items():
        for kind, entry in AXIS_KINDS.items():
            spec = [0.01, 0.02] if entry.listed else (0.01, 0.02)
            raw = {"name": "x", "algorithm": name, "num_samples": 3, "search": {"train.ref_lr": {kind: spec}}}
            if kind in algo.axis_kinds:
                sweep = SweepConfig.model_validate(raw)
                points = algo.points(sweep)
                assert len(points) == (3 * len(spec) if kind == "grid" else 3)
                assert all(p is None for p in points) != algo.planned
            else:
                with pytest.raises(ValueError, match=f"algorithm={name} takes"):
                    SweepConfig.model_validate(raw)


def test_random_points_are_the_seeds_and_grid_points_every_combination():
    s = SweepConfig.model_validate({"name": "x", "algorithm": "random", "num_samples": 4, "seed": 3,
                                    "search": {"train.ref_lr": {"loguniform": [1e-3, 1e-2]},
                                               "loss.P_mean": {"choice": [-0.4, -0.8]}}})
    assert draw_points(s) == draw_points(s) and len({p["train.ref_lr"] for p in draw_points(s)}) == 4
    g = SweepConfig.model_validate({"name": "x", "search": {"a.b": {"grid": [1, 2]}, "c.d": {"grid": [3, 4, 5]}}})
    assert len(grid_trial_points(g)) == 6 and {tuple(p.values()) for p in grid_trial_points(g)} == {(a, c) for a in (1, 2)
                                                                                       for c in (3, 4, 5)}


def test_unknown_entries_are_refused_with_the_known_names():
    for field, table in (("algorithm", A.SEARCH_ALGORITHMS), ("scheduler", A.SCHEDULERS)):
        raw = {"name": "x", "ema_lengths": [0.1], field: "nope" if field == "algorithm" else {"type": "nope"}}
        with pytest.raises(ValueError) as err:
            SweepConfig.model_validate(raw)
        assert all(k in str(err.value) for k in table)


def test_every_table_entry_is_documented():
    text = DOC.read_text()
    for table in (AXIS_KINDS, A.SEARCH_ALGORITHMS, A.SCHEDULERS):
        for name in table:
            assert re.search(rf"`{name}`", text), f"docs/sweeps.md does not describe `{name}`"


def test_grace_period_check_follows_the_table(tmp_path, monkeypatch):
    """ASHA reads grace_period_nimg (checked against the training); HyperBand does not."""
    import yaml
    from conftest import tiny_params

    from pipeline.sweep.schema import load_sweep
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, {"train": [tmp_path / "data" / "train"]})
    for sched, ok in (("asha", False), ("hyperband", True)):
        f = tmp_path / f"{sched}.yaml"
        f.write_text(yaml.safe_dump({"name": sched, "ema_lengths": [0.1], "search": {"train.ref_lr": {"grid": [0.01]}},
                                     "scheduler": {"type": sched, "grace_period_nimg": 10 ** 9}}))
        if ok:
            assert load_sweep(f)[0].scheduler.type == sched
        else:
            with pytest.raises(ConfigError, match="grace_period_nimg"):
                load_sweep(f)


def test_a_trial_without_a_fid_is_neither_tied_nor_untied(tmp_path):
    """The results table's `tied_with_best` is blank for an early-stopped trial without a FID (it was not
    ranked), True/False for the ranked ones."""
    import json

    import numpy as np

    from pipeline.sweep.results import results_table
    from pipeline.sweep.space import trial_name
    from unit.test_compare import _record, _ref
    sweep = SweepConfig.model_validate({"name": "x", "ema_lengths": [0.1],
                                        "search": {"train.ref_lr": {"grid": [0.01, 0.02]}}})
    done, stopped = trial_name(0), trial_name(1)
    for name, status in ((done, "finished"), (stopped, "early-stopped")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trial.json").write_text(json.dumps({"status": status, "params": {}}))
    rec = _record(np.random.default_rng(0).normal(size=(64, 16)), _ref())
    (tmp_path / done / "fid_records.json").write_text(json.dumps([rec]))
    table = results_table(tmp_path, sweep, {stopped: {"nimg": 32, "metric": "val_loss", "value": 1.0,
                                                      "scheduler": "asha"}},
                          {"points": [{"train.ref_lr": 0.01}, {"train.ref_lr": 0.02}]})
    by = table.set_index("trial_id")
    assert by.loc[done, "tied_with_best"] is True or by.loc[done, "tied_with_best"] == True      # noqa: E712
    assert by.loc[stopped, "status"] == "early-stopped" and by.loc[stopped, "tied_with_best"] is None
