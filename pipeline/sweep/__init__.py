"""Ray Tune sweeps over learning rate, noise distribution and EMA length (sweeps/*.yaml).

Each trial trains one configuration with the same library code as the DVC train stage, reports its
loss to Tune at every snapshot (a scheduler can stop it early), and at the end fans out the post-hoc
EMA lengths: reconstruction + metrics for each, no retraining. MLflow: one parent run per sweep, a
child per trial, a grandchild per EMA length. Results: a pandas table (one row per trial x post-hoc
point) and figures under reports/sweeps/<name>/.

Where things are:
  schema.py      the sweep file's typed schema (validated before Ray starts)
  space.py       axis kinds (one table), the plan, Tune's parameter names
  algorithms.py  search algorithms and schedulers (two tables), recording of early stops
  trial.py       one trial inside a Ray worker (typed TrialSpec)
  trial_state.py a trial's own records (trial.json, nodes.jsonl), its status
  cluster.py     Ray start / connect / authentication, resources, the pending watch
  driver.py      run_sweep: plan -> Ray -> Tune -> results, --resume
  results.py     the results table, figures, summary, MLflow statuses
  plan.py        the plan a --dry-run prints
  promote.py     `sweep promote`: a trial's values into params.yaml or a queued DVC experiment
"""
from ..errors import SweepError
from .driver import SweepResult, run_sweep
from .schema import SweepConfig, load_sweep

__all__ = ["SweepConfig", "SweepError", "SweepResult", "load_sweep", "run_sweep"]
