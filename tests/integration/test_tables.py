"""The method's options as tables (noise laws, samplers, metrics, data sources, launchers): every
entry reaches the config schema, the record or run key, and the docs."""
import pytest


@pytest.mark.integration
def test_a_submitted_job_is_a_handle_with_wait_describe_and_logs(tmp_path, monkeypatch):
    import sys

    from pipeline.launch import submit
    monkeypatch.chdir(tmp_path)
    s = submit("cmd", [sys.executable, "-c", "print('hello from the job')"], params_file="none.yaml",
               executor="local", folder=tmp_path / "job")
    assert s.wait() == 0
    assert "hello from the job" in s.logs() and s.job_id in s.describe() and str(s.stdout) in s.describe()
    assert s.describe().splitlines()[0] == (f"submitted job {s.job_id} locally: a process on this machine "
                                            f"(launcher.executor=local; --executor slurm sends it to SLURM)")
    from pipeline.launchers import LaunchError
    long = submit("cmd", [sys.executable, "-c", "import time; time.sleep(120)"], params_file="none.yaml",
                  executor="local", folder=tmp_path / "job2")
    long.cancel()                                           # the protocol's fifth verb
    with pytest.raises(LaunchError):
        long.wait()
