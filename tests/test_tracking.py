"""MLflow run logger: resume into the same run, one watermark per sink, offline fallback."""
import json

from pipeline.tracking import RunLogger


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
