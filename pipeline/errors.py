"""The project's one error base class.

Every error that means "this input, file or setting is wrong" derives from PipelineError, so each
command line turns it into one line on stderr and exit code 2 (pipeline.cli.run). Anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A bad input, file or environment; the message says what and where, in one line."""



class SweepError(PipelineError, ValueError):
    """A sweep that cannot run or continue as asked (its file, its resources, its results)."""



class TrainingError(PipelineError, RuntimeError):
    """A training run that cannot start or continue (its folder, a checkpoint, a diverged loss)."""


def one_line_os_error(err: OSError) -> str:
    """'<path>: <reason>' for read-only folders, full disks, a file where a folder belongs."""
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where else reason
