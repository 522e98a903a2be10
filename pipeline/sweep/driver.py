"""The sweep driver: validate everything, plan, start (or join) Ray, prepare the data and reference
statistics once, open the sweep's MLflow run, run the trials through Tune with the search algorithm
and scheduler of the tables in algorithms.py, then write the results and close every run truthfully.
Rerunning with --resume continues from the trials' own records."""
from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as C
from ..errors import SweepError
from ..io import RunLock, atomic_write_text, read_json
from ..tracking.store import ensure_experiment
from .algorithms import build_scheduler, read_stopped, search_algorithm, tune_concurrency
from .cluster import PendingWatch, check_plan, check_resources, connect_ray, prepare_ray_env
from .results import close_trial_runs, print_summary, results_table, write_results, write_table
from .schema import SweepConfig, load_sweep, wants_tracking_server, wants_trial_figures
from .plan import plan, print_plan
from .space import point_space, trial_name, tune_space
from .trial import TrialSpec, run_trial
from .trial_state import FINAL, read_trial_state, trial_status, write_trial_state


@dataclass
class SweepResult:
    table: "object"                                          # pandas DataFrame
    table_path: Path
    parent_run_id: str | None
    best: dict | None
    out_dir: Path


def sweep_tracking_uri(base: C.Config) -> str:
    """The base config's tracking URI; a local sqlite file gets a busy timeout for parallel trials."""
    from ..tracking.store import tracking_uri
    uri = tracking_uri(base)
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        uri += ("&" if "?" in uri else "?") + "timeout=60"
    return uri


def make_private(folder: Path) -> None:
    """Create the sweep's storage folder (and its parent, when missing) readable and writable by its owner only.
    Nothing in it is ever unpickled (--resume reads the project's JSON files only), but trial runs,
    checkpoints and MLflow ids are the sweep's own: one writer."""
    for d in (folder.parent, folder):
        if not d.exists():                                   # only folders made here: never an existing one (`/`)
            d.mkdir(parents=True)
            os.chmod(d, 0o700)


def _check_before_start(sweep: SweepConfig, exp_dir: Path, reports: Path, resume: bool) -> None:
    """What a real start checks beyond the plan: an earlier sweep of the same name in the sweep storage.
    Results under reports/ alone (an example committed with the repository) do not block: they are
    replaced by this sweep's."""
    if not resume and (exp_dir / "sweep_state.json").is_file():
        raise SweepError(f"sweep {sweep.name!r} already has results ({exp_dir}): continue it with --resume, or give "
                         f"the sweep file another `name:` to start a new one")
    if not resume and (reports / "results.csv").is_file():
        print(f"sweep: {reports} holds results of an earlier run of this sweep file (none in {exp_dir.parent}): "
              f"they are replaced by this run's")


class _NoRayRestoreHint:
    """Ray Tune's own 'resume with Tuner.restore(...)' lines: this sweep resumes with --resume from its
    own records, and Ray's saved state is never read (docs/sweeps.md)."""

    @staticmethod
    def filter(record) -> bool:
        return "restore(" not in record.getMessage() and "Tuner.restore" not in record.getMessage()


def _quiet_ray_restore_hints() -> None:
    import logging
    for name in ("ray.tune.tune", "ray.tune.tuner", "ray.tune.impl.tuner_internal", "ray.train.base_trainer"):
        logging.getLogger(name).addFilter(_NoRayRestoreHint)


def run_sweep(sweep_file: str | Path, address: str | None = None, resume: bool = False,
              reports_dir: str | Path = "reports/sweeps", num_cpus: int | None = None,
              dry_run: bool = False, min_nodes: int = 1, trial_body: str | None = None) -> SweepResult | dict:
    """Run (or resume) the sweep of `sweep_file`: plan and checks, Ray, the MLflow store (a server for many
    writers when asked), the inputs every trial reads, the parent run, the trials, then the table and
    report. dry_run: print the plan and return it."""
    entered = time.time()
    sweep, base = load_sweep(sweep_file)                   # every value checked before Ray starts
    root = Path.cwd()
    storage = (root / sweep.storage).resolve()
    exp_dir, out_dir = storage / sweep.name, Path(reports_dir) / sweep.name
    the_plan, uri, serve = _checked_plan(sweep, base, storage, out_dir, address, num_cpus)
    if dry_run:
        print_plan(the_plan)
        return the_plan
    if resume and not exp_dir.is_dir():
        raise SweepError(f"nothing to resume: no sweep {sweep.name!r} in {exp_dir.parent}")
    make_private(exp_dir)
    lock = RunLock(exp_dir, f"sweep {sweep.name!r}").acquire()   # one driver per sweep name at a time
    server = started_ray = None
    try:
        _check_before_start(sweep, exp_dir, out_dir, resume)
        trials_dir = exp_dir / "trials"
        todo, evaluated = remaining_trials(sweep, the_plan, trials_dir, read_stopped(exp_dir))
        if resume:
            print(f"sweep: resuming {exp_dir} from its own records: {len(todo) if isinstance(todo, list) else todo} "
                  f"trial(s) to run; finished and early-stopped trials are kept (Ray's saved state is not read)")
        ray = None
        if todo:
            prepare_ray_env(address)
            # Ray first: a cluster that cannot be joined (down, wrong token) fails before any work or MLflow run.
            ray, started = connect_ray(address, num_cpus, min_nodes)
            started_ray = ray if started else None
        _quiet_ray_restore_hints()
        uri, server = _tracking_store(sweep, uri, serve, address, root)
        ref_cache = _trial_inputs(base, storage)
        parent, state_file, attempt = _parent_run(sweep, sweep_file, uri, exp_dir, resume, entered)

        outcome = "FAILED"
        t0 = time.time()
        watch = PendingWatch(sweep.pending_timeout_s)
        try:
            if todo:
                spec = TrialSpec(base, sweep, parent.run_id, uri, None, ref_cache, str(root),
                                 wants_trial_figures(sweep, the_plan["trials"]),
                                 **({"body": trial_body} if trial_body else {}))
                _tune(sweep, base, spec, todo, evaluated, ray, exp_dir, attempt, watch)
            _stamp(state_file, trials_ended_at=time.time())
            outcome = None
        except KeyboardInterrupt:                                # a Ctrl-C Ray did not take as its graceful stop
            outcome = "KILLED"
            table_path = _close_interrupted(sweep, the_plan, exp_dir, out_dir, uri, parent)
            outcome = None                                       # closed there
            raise KeyboardInterrupt(f"sweep {sweep.name}: every MLflow run closed, the trials so far in {table_path}; "
                                    f"the same command with --resume continues") from None
        finally:
            if outcome is not None:                              # no run of this sweep is left RUNNING
                close_trial_runs(trials_dir, uri, {}, default="KILLED" if outcome == "KILLED" else "FAILED")
                parent.end(outcome)

        try:
            result = _finish(sweep, base, the_plan, exp_dir, out_dir, uri, ref_cache, str(root), parent, watch, t0)
            _stamp(state_file, report_ended_at=time.time())
            return result
        except KeyboardInterrupt:                                # Ctrl-C after the trials (evaluation, the report)
            table_path = _close_interrupted(sweep, the_plan, exp_dir, out_dir, uri, parent)
            raise KeyboardInterrupt(f"sweep {sweep.name}: every MLflow run closed, the trials' results in {table_path}; "
                                    f"the same command with --resume finishes it") from None
    finally:
        if server is not None:
            server.stop()
        if started_ray is not None:        # a Ray this call started ends with it (run_sweep called in a process)
            started_ray.shutdown()
        lock.release()


def _checked_plan(sweep: SweepConfig, base: C.Config, storage: Path, out_dir: Path, address, num_cpus):
    """The plan and everything checkable before Ray starts: (plan, tracking URI, whether a server fronts it)."""
    the_plan = plan(sweep, base)
    check_plan(sweep, storage, out_dir, address, num_cpus, the_plan["trials"])
    if base.data.encoder == "vae" and sweep.scheduler.type != "none" and sweep.scheduler.metric == "val_loss":
        raise SweepError("scheduler.metric=val_loss is a loss on the reference images, which a latent run keeps as "
                         "pixels (for FID): use scheduler.metric=loss with data.encoder=vae")
    uri = sweep_tracking_uri(base)
    try:
        serve = wants_tracking_server(sweep, uri, address)
    except ValueError as err:
        raise SweepError(str(err)) from None
    return the_plan, uri, serve


def _tracking_store(sweep: SweepConfig, uri: str, serve: bool, address, root: Path):
    """The experiment, and the sweep's MLflow server when one is wanted or needed: (the URI trials log to,
    the server or None)."""
    # The experiment's artifacts in a local folder, whether or not a server fronts the store: runs of
    # sweeps with and without the server then all log artifacts (an experiment first made through a
    # server keeps mlflow-artifacts:, which only a server can serve: then one is started).
    needs_server = ensure_experiment(uri, sweep.experiment, root / "mlartifacts")
    if needs_server and not serve:
        if address is not None:
            raise SweepError(f"MLflow experiment {sweep.experiment!r} keeps its artifacts behind a tracking server "
                             f"({needs_server}): give tracking.uri an MLflow server all nodes reach, or use another "
                             f"experiment")
        print(f"sweep: experiment {sweep.experiment!r} keeps its artifacts at {needs_server}: starting this sweep's "
              f"MLflow server to serve them")
        serve = True
    if not serve:
        return uri, None
    from ..tracking_server import TrackingServer                 # many writers: one server in front of the sqlite file
    server = TrackingServer(uri, root / "mlartifacts")
    print(f"sweep: MLflow server {server.start()} over {uri} for the trials (tracking_server; stopped at the end)")
    atexit.register(server.stop)                                  # however the sweep ends (a watchdog if it is killed)
    return server.url, server


def _trial_inputs(base: C.Config, storage: Path) -> str:
    """Encoded data (on a fresh clone: encoded now, as the encode stage would) and the reference
    statistics once, before any trial, in the sweeps' own cache (never a DVC output). Returns the cache."""
    from ..data.encode import ensure_encoded
    from ..metrics import check_metrics, references
    ensure_encoded(base, log=lambda m: print(f"sweep: {m}"))
    ref_cache = str(storage / "fid-ref")
    check_metrics(base)
    references(base, "cpu", ref_cache)                      # every metric of metrics.names, read by the trials
    return ref_cache


def _parent_run(sweep: SweepConfig, sweep_file, uri: str, exp_dir: Path, resume: bool, entered: float):
    """The sweep's MLflow parent run (a resumed sweep reuses it), before any trial: (logger, state file, attempt)."""
    from ..tracking.logger import RunLogger, run_tags
    state_file = exp_dir / "sweep_state.json"
    state = read_json(state_file) if resume else {}
    parent = RunLogger(uri=uri, experiment=sweep.experiment)
    parent_id = parent.start(state.get("parent_run_id"), run_name=f"sweep-{sweep.name}",
                             tags={**run_tags("sweep"), "kind": "sweep", "sweep_file": str(sweep_file)},
                             params={"sweep." + k: v for k, v in C.flatten(sweep.model_dump(mode="json")).items()},
                             on_run_id=lambda rid: atomic_write_text(json.dumps({"parent_run_id": rid}), state_file))
    attempt = int(state.get("attempts", 0)) + 1
    # The driver's own times (epoch seconds) beside the trials' phases: benchmarks.sweep_overhead reads them.
    atomic_write_text(json.dumps({"parent_run_id": parent_id, "attempts": attempt, "entered_at": entered,
                                  "trials_started_at": time.time()}), state_file)
    return parent, state_file, attempt


def _tune(sweep: SweepConfig, base: C.Config, spec: TrialSpec, todo, evaluated, ray, exp_dir: Path, attempt: int,
          watch: PendingWatch) -> None:
    """The trials on Ray Tune: resources per trial, the scheduler, the search algorithm, Ray's own files."""
    import dataclasses

    from ray import tune
    gpus, device = check_resources(sweep, ray)
    spec = dataclasses.replace(spec, device=device, created_at=time.time())
    # One process: the trial's worker holds the resources. Several: the TorchTrainer's workers hold
    # them, and the trial's own driver process (it only waits and relays reports) holds one CPU.
    trial_resources = {"cpu": sweep.resources.cpus, "gpu": gpus} if sweep.resources.workers == 1 else {"cpu": 1}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), trial_resources)
    # max_t past the end: a scheduler ends trials that reach max_t, which would cut the EMA fan-out.
    scheduler = build_scheduler(sweep, base.train.duration_nimg + 1, exp_dir)
    algorithm = search_algorithm(sweep.algorithm)
    search_alg = algorithm.searcher(sweep, evaluated) if algorithm.searcher else None
    tune_config = tune.TuneConfig(num_samples=1 if algorithm.planned else todo,
                                  scheduler=scheduler, search_alg=search_alg,
                                  max_concurrent_trials=tune_concurrency(sweep),
                                  # One process per trial: its worker (imports, MLflow client) serves the
                                  # next trial; a trial leaves only caches behind (docs/sweeps.md).
                                  reuse_actors=sweep.resources.workers == 1)
    # Ray's own files go to a fresh folder per attempt; nothing of an earlier attempt is read.
    stopper, hook = watch.tune_hooks()
    run_config = tune.RunConfig(name=f"attempt-{attempt}", storage_path=str(exp_dir / "ray"), verbose=1,
                                stop=stopper, callbacks=[hook],
                                failure_config=tune.FailureConfig(max_failures=sweep.max_failures))
    tuner = tune.Tuner(trainable, param_space=point_space(todo) if algorithm.planned else tune_space(sweep),
                       tune_config=tune_config, run_config=run_config)
    _fit_then_restore_signals(tuner)


def _stamp(state_file: Path, **times) -> None:
    """Merge the driver's times (epoch seconds) into sweep_state.json."""
    atomic_write_text(json.dumps({**read_json(state_file), **times}), state_file)


def _fit_then_restore_signals(tuner) -> None:
    """tuner.fit(), then the SIGINT / SIGUSR1 handlers it replaced: Ray Tune installs its own (a graceful
    stop) and leaves them, which would swallow a Ctrl-C during the evaluation and report after the trials."""
    import signal
    import threading
    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    before = {n: signal.getsignal(getattr(signal, n)) for n in names} if main else {}
    try:
        tuner.fit()
    finally:
        for n, handler in before.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)


def _finish(sweep: SweepConfig, base: C.Config, the_plan: dict, exp_dir: Path, out_dir: Path, uri: str,
            ref_cache: str, root: str, parent, watch: PendingWatch, t0: float) -> SweepResult:
    """After the trials: stopped trials' FIDs (when asked), the results table from the trials' own records,
    every MLflow run closed truthfully, the report, the parent run's summary."""
    trials_dir = exp_dir / "trials"
    if sweep.scheduler.evaluate_stopped:
        evaluate_stopped(trials_dir, read_stopped(exp_dir), base, sweep, uri, ref_cache, root)
    table = results_table(trials_dir, sweep, read_stopped(exp_dir), the_plan)
    close_trial_runs(trials_dir, uri, dict(zip(table["trial_id"], table["status"])) if len(table) else {},
                     scheduler=sweep.scheduler.type)
    table_path = write_results(table, out_dir, sweep)
    if watch.stuck:                                          # the table says what ran; then one line
        parent.end("KILLED")
        raise SweepError(watch.stuck + f"; the trials that ran are in {table_path}: `--resume` continues once "
                         f"resources free up")
    best = None
    if len(table) and table["fid"].notna().any():
        best = table.loc[table["fid"].idxmin()].to_dict()
    for f in sorted(out_dir.glob("*")):
        parent.log_artifact(f, "sweep")
    parent.log_metrics({"best_fid": best["fid"], "best_fid_se": best.get("fid_se"), "trials": table["trial_id"].nunique(),
                        "seconds": time.time() - t0} if best else {"trials": 0}, step=0)
    parent.set_tags(parent_summary(table, best, sweep))     # the experiment page answers without opening children
    interrupted = table.loc[table["status"] == "interrupted", "trial_id"].nunique() if len(table) else 0
    parent.end("FINISHED" if best and not interrupted else ("KILLED" if interrupted else "FAILED"))
    print_summary(table, best, sweep, table_path)
    if best is None and not interrupted and len(table):      # nothing came out: not a success (exit 2)
        errors = table.groupby("trial_id").first()
        why = "; ".join(f"{t}: {r.get('status')}" + (f" ({str(r.get('stop_reason'))[:160]})" if r.get("stop_reason")
                                                        else "") for t, r in errors.iterrows())
        raise SweepError(f"sweep {sweep.name}: no trial finished ({why}); the table is {table_path}")
    return SweepResult(table, table_path, parent.run_id, best, out_dir)


def _close_interrupted(sweep: SweepConfig, the_plan: dict, exp_dir: Path, out_dir: Path, uri: str, parent) -> Path:
    """Ctrl-C: the results table (CSV only: no figures) from each trial's own records, every run closed."""
    trials_dir = exp_dir / "trials"
    table = results_table(trials_dir, sweep, read_stopped(exp_dir), the_plan)
    status = dict(zip(table["trial_id"], table["status"])) if len(table) else {}
    close_trial_runs(trials_dir, uri, status, default="KILLED", scheduler=sweep.scheduler.type)
    path = write_table(table, out_dir)
    parent.end("KILLED")
    return path


def parent_summary(table, best: dict | None, sweep: SweepConfig) -> dict:
    """Tags of the sweep's MLflow run: the best point, whether it is resolved, and the summary lines (as
    the run's description)."""
    from .results import summary_lines
    tags = {"mlflow.note.content": "\n".join(summary_lines(table, sweep))[:4000]}
    if best:
        tied = int(table["tied_with_best"].sum()) - 1 if "tied_with_best" in table else None
        tags.update({"best_trial": best["trial_id"], "best_sigma_rel": f"{best['sigma_rel']:.3f}",
                     "best_point": ", ".join(f"{k}={best.get(k)}" for k in sweep.search) or "base config",
                     "resolved": "unknown" if tied is None else ("yes" if tied <= 0 else f"no: {tied} tied")})
    return tags


def remaining_trials(sweep: SweepConfig, the_plan: dict, trials_dir: Path, stopped: dict):
    """What still has to run, from the trials' own records: grid/random: [(name, values)] of the plan's
    trials not finished nor early-stopped (an interrupted one resumes from its checkpoints in its
    folder); unplanned (Optuna): the number of trials left, and the finished ones' (values, best FID) to tell it."""
    if search_algorithm(sweep.algorithm).planned:
        return [(trial_name(i), pt) for i, pt in enumerate(the_plan["points"])
                if trial_status(trials_dir / trial_name(i), stopped) not in FINAL], []
    done, evaluated = 0, []
    for t in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
        state, status = read_trial_state(t), trial_status(t, stopped)
        if status in FINAL:
            done += 1
            if status == "finished" and state.get("best_fid") is not None:
                evaluated.append((state.get("params") or {}, state["best_fid"]))
        elif state:                                          # Optuna proposes anew: this one is superseded
            write_trial_state(t, status="superseded")
    return max(sweep.num_samples - done, 0), evaluated


def evaluate_stopped(trials_dir: Path, stopped: dict, base: C.Config, sweep: SweepConfig, uri: str, ref_cache: str,
                     root: str) -> None:
    """scheduler.evaluate_stopped: every trial a scheduler stopped gets its post-hoc EMA fan-out from the
    snapshots it wrote before the stop (no retraining; its records carry that nimg), here in the driver
    after the trials; a trial evaluated before (a resume) is kept."""
    from types import SimpleNamespace

    from .trial import fan_out
    spec = TrialSpec(base, sweep, None, uri, "cpu", ref_cache, root, wants_trial_figures(sweep, len(stopped)))
    for name in sorted(stopped):
        t = trials_dir / name
        snaps = t / "run" / "snapshots"
        if (t / "fid_records.json").is_file() or not any(snaps.glob("*.safetensors")):
            continue
        cfg = spec.config(read_trial_state(t).get("params") or {}, t)
        run_id = (t / "run" / "mlflow_run_id").read_text().strip() if (t / "run" / "mlflow_run_id").is_file() else None
        print(f"sweep: evaluating stopped trial {name} from its snapshots up to nimg={stopped[name].get('nimg')}",
              flush=True)
        try:
            fan_out(cfg, SimpleNamespace(mlflow_run_id=run_id), t, ref_cache, "cpu", figures=spec.figures)
        except Exception as err:                             # the trial keeps its stop; the table says why
            write_trial_state(t, stopped_eval_error=f"{err.__class__.__name__}: {str(err)[:200]}")
            print(f"sweep: stopped trial {name} could not be evaluated ({err.__class__.__name__}: {err})", flush=True)

