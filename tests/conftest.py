import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def root() -> Path:
    return ROOT
