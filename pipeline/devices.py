"""One rule for turning a params device string into a torch device: `auto` (a GPU when one is
visible, else the CPU), `cpu`, `cuda` (the current GPU) or `cuda:N` (GPU N of several)."""
from __future__ import annotations

import re

from .errors import PipelineError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class DeviceError(PipelineError, RuntimeError):
    pass


def pick_device(choice: str = "auto", field: str = "device"):
    """A torch.device for `choice`; a clear error naming `field` when the GPU asked for is not there."""
    import torch
    choice = str(choice)
    if not re.match(DEVICE_PATTERN, choice):
        raise DeviceError(f"{field}={choice!r}: expected auto, cpu, cuda or cuda:N")
    if choice == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(choice)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{field}={choice} but no CUDA device is visible (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{field}={choice} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev
