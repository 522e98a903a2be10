"""Speed switches keep the numerics: the loss after N steps stays within tolerance of the plain path."""
import pytest
import torch

from pipeline.data.encoded import Prefetcher
from pipeline.training import SnapshotWriter


def test_snapshot_writer_surfaces_a_failed_background_write(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the snapshot folder should be")
    w = SnapshotWriter(background=True)
    w.submit([(blocker / "phema-0000000032-0.050.safetensors", {"w": torch.zeros(2)}, {"format": "x"})])
    with pytest.raises(OSError):
        w.drain()


def test_prefetcher_keeps_order_and_raises_the_producers_error():
    assert list(Prefetcher(iter(range(50)), depth=4)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("corrupt batch")
    p = Prefetcher(broken(), depth=2)
    assert next(p) == 1
    with pytest.raises(RuntimeError, match="corrupt batch"):
        next(p)
