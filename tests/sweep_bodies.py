"""Trial bodies for sweep tests (`run_sweep(trial_body="sweep_bodies:...")`): imported by Ray's workers."""


def no_space(job: dict, report) -> None:
    """A trial that dies as a full disk kills it."""
    raise OSError(28, "No space left on device", str(job["trial_dir"]))
