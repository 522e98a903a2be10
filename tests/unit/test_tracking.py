"""MLflow run logger: resume into the same run, one watermark per sink, offline fallback."""
import json

from pipeline.tracking.logger import RunLogger


def test_kill_between_jsonl_and_mlflow_writes_loses_no_step(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    jsonl = tmp_path / "metrics.jsonl"
    a = RunLogger(uri=uri, experiment="t", jsonl=jsonl, quiet=True)
    run_id = a.start(run_name="r")
    for step in (16, 32):
        assert a.log_metrics({"loss": step / 10}, step)
    # The process dies after writing step 48 to the JSONL file but before MLflow got it.
    with open(jsonl, "a") as f:
        f.write(json.dumps({"step": 48, "loss": 4.8}) + "\n")
    b = RunLogger(uri=uri, experiment="t", jsonl=jsonl, quiet=True)
    assert b.start(run_id) == run_id
    assert not b.log_metrics({"loss": 3.2}, 32)            # in both sinks already: skipped
    assert b.log_metrics({"loss": 4.8}, 48)                # MLflow still needs it
    assert b.log_metrics({"loss": 6.4}, 64)
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
    assert sorted(steps) == [16, 32, 48, 64]
    assert [json.loads(l)["step"] for l in jsonl.read_text().splitlines()] == [16, 32, 48, 64]


def test_pipeline_runs_lists_a_training_without_evaluations(tmp_path):
    """A finished training whose evaluation has not run (e.g. submitted to SLURM) is a row of its own:
    no FID, its final loss and cost; an evaluated one gives one row per EMA length."""
    from pipeline.tracking.logger import log_ema_run
    from pipeline.tracking.runs import load_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain = RunLogger(uri=uri, experiment="t", quiet=True)
    plain.start(run_name="train-a", tags={"run_key": "a"}, params={"train.ref_lr": 0.01})
    plain.log_summary({"final_loss": -0.3, "train_seconds": 12.0})
    plain.end()
    evaluated = RunLogger(uri=uri, experiment="t", quiet=True)
    rid = evaluated.start(run_name="train-b", tags={"run_key": "b"}, params={"train.ref_lr": 0.02})
    evaluated.log_summary({"final_loss": -0.25})
    evaluated.end()
    rec = {"fid": 150.0, "fid_se": 3.0, "fid_ci95": [144.0, 156.0], "sigma_rel": 0.1, "nimg": 64, "num_images": 8,
           "ref_num_images": 8, "seeds": [0, 7], "sampler": {"nfe": 7, "steps": 4, "churn": 0.0, "guidance": 1.0},
           "feature_net": "f", "reference": "r", "model_file": "m.safetensors"}
    log_ema_run(RunLogger(uri=uri, experiment="t", quiet=True), rid, rec)
    df = load_runs("t", uri)
    assert sorted(df["run_name"]) == ["train-a", "train-b"]
    a = df[df["run_name"] == "train-a"].iloc[0]
    assert a["fid"] != a["fid"] and a["final_loss"] == -0.3 and a["train_seconds"] == 12.0 and not a["evaluated"]
    b = df[df["run_name"] == "train-b"].iloc[0]
    assert b["fid"] == 150.0 and b["final_loss"] == -0.25     # the training's final loss on its evaluated rows too
    assert df["run_name"].iloc[0] == "train-b"                 # evaluated runs first (sorted by FID)
    # `pipeline runs`' compact table: one row per training, best FID with its interval, within 120 columns.
    from pipeline.tracking.runs import compact
    table, left = compact(df)
    assert list(table.columns) == ["run", "status", "ref_lr", "best_fid", "sigma_rel", "final_loss"] and not left
    assert table.set_index("run").loc["train-b", "best_fid"] == "150.00 [144.0, 156.0]"
    wide = df.assign(**{f"param.net.knob_{i}": [f"value-{i}-{j}" for j in range(len(df))] for i in range(12)})
    table, left = compact(wide)
    text = table.to_string(index=False, na_rep="-")
    assert max(map(len, text.splitlines())) <= 120 and left and all(c not in table.columns for c in left)
    # Every EMA run carries its whole record (`pipeline compare <run id>` reads it).
    from pipeline.compare import find_evaluation
    ev = find_evaluation(rid, tmp_path, uri, tmp_path / "sweeps")
    assert len(ev.records) == 1 and ev.records[0]["fid"] == 150.0 and ev.where == f"MLflow run {rid}"


def test_dvc_experiment_copies_use_the_projects_mlflow_and_run_stores(tmp_path, monkeypatch):
    """Inside <project>/.dvc/tmp/exps/<copy>: the default and relative sqlite stores are the project's; the
    copy's train.run_dir links to the project's run of the same run key, else to runs/keyed/<key>."""
    from pipeline import config as C
    from pipeline.tracking.store import tracking_uri
    from pipeline.workspace import link_run_dir, project_root
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_root() == tmp_path
    cfg = C.resolve({}, {"train.run_dir": "runs/default"})
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(C.resolve({}, {"tracking.uri": "sqlite:///db/m.db?timeout=5"})) == \
        f"sqlite:///{tmp_path / 'db/m.db'}?timeout=5"
    assert tracking_uri(C.resolve({}, {"tracking.uri": "sqlite:////abs/m.db"})) == "sqlite:////abs/m.db"
    # No run of this configuration in the project yet: runs/keyed/<run key>.
    target = link_run_dir(cfg, log=lambda m: None)
    assert target == tmp_path / "runs" / "keyed" / cfg.run_key()
    assert (copy / "runs/default").is_symlink() and (copy / "runs/default").resolve() == target
    # The project's run_dir holds this configuration (the baseline's run): the copy uses it.
    other = tmp_path / ".dvc" / "tmp" / "exps" / "tmpdef"
    other.mkdir()
    monkeypatch.chdir(other)
    (tmp_path / "runs/default").mkdir(parents=True)
    (tmp_path / "runs/default/run_key").write_text(cfg.run_key())        # written by every training
    assert link_run_dir(cfg, log=lambda m: None) == tmp_path / "runs/default"
    changed = C.resolve({}, {"train.run_dir": "runs/default", "train.ref_lr": 0.02})
    third = tmp_path / ".dvc" / "tmp" / "exps" / "tmpghi"
    third.mkdir()
    monkeypatch.chdir(third)
    assert link_run_dir(changed, log=lambda m: None) == tmp_path / "runs" / "keyed" / changed.run_key()
    monkeypatch.chdir(tmp_path)                                   # the project itself: nothing is linked
    assert link_run_dir(cfg, log=lambda m: None) is None and project_root() == tmp_path


def test_training_run_names_say_where_and_what_differs(tmp_path, monkeypatch, root):
    """'dvc-train exp-x ref_lr=0.005 <key>': the origin, the DVC experiment, what differs from the committed
    params file, the short run key."""
    import shutil
    import subprocess

    from pipeline import config as C
    from pipeline.tracking.logger import training_run_name
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run("git init -q && git add params.yaml && git commit -qm p", shell=True, cwd=tmp_path, check=True,
                   env={**__import__("os").environ, **env})
    cfg = C.load_config(tmp_path / "params.yaml", ["train.ref_lr=0.005", "sampler.steps=9"])
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert training_run_name(cfg, "local", tmp_path / "params.yaml") == f"local-train ref_lr=0.005 {cfg.run_key()[:8]}"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1a2b3")          # sampler.steps is not training: not named
    assert training_run_name(cfg, "dvc", tmp_path / "params.yaml").startswith("dvc-train exp-1a2b3 ref_lr=0.005 ")
    plain = C.load_config(tmp_path / "params.yaml")
    monkeypatch.delenv("DVC_EXP_NAME")
    assert training_run_name(plain, "slurm", None) == f"slurm-train {plain.run_key()[:8]}"
