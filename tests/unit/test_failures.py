"""Issue: nothing executes, nothing hangs, nothing is silently wrong.

Full disks at every writer (a small tmpfs filled to the byte), bounded network calls, output
locations checked before compute, non-finite numbers refused, the strict boundary (the tracebacks a
hostile user found, one line each now), checkpoint fallback, and stages killed mid-way."""


def test_pending_trial_is_reported_with_the_resources_it_waits_for(monkeypatch):
    """The watch's rule on Tune's trial objects (their status, config and resource request)."""
    import types

    import ray

    from pipeline.sweep.cluster import PendingWatch
    from pipeline.sweep.space import POINT, TRIAL
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0, "memory": 1e9})
    trial = lambda tid, status: types.SimpleNamespace(   # noqa: E731 - the fields PendingWatch reads
        trial_id=tid, status=status, config={POINT: {TRIAL: f"t000{tid}"}},
        placement_group_factory=types.SimpleNamespace(required_resources={"CPU": 2.0}))
    w = PendingWatch(timeout_s=10)
    assert w.check([trial(1, "RUNNING"), trial(2, "PENDING")], now=0) is None
    assert w.check([trial(1, "RUNNING"), trial(2, "PENDING")], now=100) is None     # another trial runs
    assert w.check([trial(1, "TERMINATED"), trial(2, "PENDING")], now=101) is None  # waits from now on
    msg = w.check([trial(1, "TERMINATED"), trial(2, "PENDING")], now=112)
    assert msg and "trial t0002 waited 11 s" in msg and "CPU 2" in msg and "free: CPU 0" in msg
