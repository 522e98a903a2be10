"""A trial's own records in its folder (trial.json: name, values, status, last metrics, phases;
nodes.jsonl: one node per attempt): what the results table, `sweep promote` and --resume read, and
what the scheduler's stops are written to at once. Nothing here imports the training (record_node
asks Ray for the node's address when it runs)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..io import atomic_write_text, read_json

TRIAL_STATE = "trial.json"


def write_trial_state(trial_dir: Path, **fields) -> dict:
    """Merge `fields` into the trial's own state file (trial.json: name, values, status, last
    metrics). The results table and --resume read these, never Ray's pickled experiment state."""
    state = {**read_trial_state(trial_dir), **fields}
    atomic_write_text(json.dumps(state, indent=2, default=str), trial_dir / TRIAL_STATE)
    return state


def read_trial_state(trial_dir: Path) -> dict:
    return read_json(trial_dir / TRIAL_STATE)


def record_node(trial_dir: Path) -> None:
    """Append this attempt's node (hostname, Ray node IP) to the trial's nodes.jsonl: a retried trial
    shows every node it ran on, the results table and the MLflow run the one it finished on."""
    import socket

    import ray
    entry = {"node": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(trial_dir / "nodes.jsonl", "a") as f:          # one short line per attempt: an atomic append
        f.write(json.dumps(entry) + "\n")


def trial_nodes(trial_dir: Path) -> list[str]:
    """The nodes a trial ran on, one per attempt, in order (from its nodes.jsonl)."""
    try:
        lines = (trial_dir / "nodes.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x)["node"] for x in lines if x.strip()]


FINAL = ("finished", "early-stopped")                      # trials a resume does not run again


def trial_status(trial_dir: Path, stopped: dict) -> str:
    """finished (records written), early-stopped (by the scheduler), error (its last attempt failed), or
    interrupted (running when the sweep ended, or never started)."""
    state = read_trial_state(trial_dir)
    if state.get("status") == "finished" and (trial_dir / "fid_records.json").is_file():
        return "finished"
    if trial_dir.name in stopped:
        return "early-stopped"
    return "error" if state.get("status") == "error" else "interrupted"
