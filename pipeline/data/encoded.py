"""The training loader (method.md 7): the encoded dataset memory-mapped and checked against its
manifest and the config, and a background prefetcher for the next batches.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .latents import draw, scale_bias
from .manifest import read_manifest, sha256_files
from .pixels import DataError, encode_pixels


def _load_array(f: Path) -> np.ndarray:
    """Memory-map a .npy file; object arrays (pickles) and malformed files are refused in one line."""
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{f} is not a plain numeric array ({str(err).splitlines()[0][:100]}); "
                        f"re-run the encode stage") from None


class EncodedDataset(torch.utils.data.Dataset):
    """Memory-mapped encoded dataset. Items: (x float32 C x H x W in model units, one-hot label or
    an empty tensor). Latent items draw z = mean + std * eps with a caller-given generator."""

    def __init__(self, path: str | Path, cfg=None, verify: bool = True):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        files = [self.path / "images.npy", self.path / "labels.npy"]
        for f in files:
            if not f.is_file():
                raise DataError(f"{self.path}: {f.name} is missing")
        if verify and sha256_files(files) != m["sha256"]:
            raise DataError(f"{self.path}: contents do not match the manifest's sha256 (corrupt or modified); "
                            f"re-run the encode stage")
        self.images = _load_array(files[0])
        self.labels = _load_array(files[1])
        if list(self.images.shape) != [m["count"], *m["shape"]] or str(self.images.dtype) != m["dtype"]:
            raise DataError(f"{self.path}: images.npy is {self.images.shape} {self.images.dtype}, manifest says "
                            f"{[m['count'], *m['shape']]} {m['dtype']}")
        if self.labels.shape != (m["count"],) or self.labels.dtype.kind not in "iu":
            raise DataError(f"{self.path}: labels.npy is {self.labels.shape} {self.labels.dtype}, expected "
                            f"({m['count']},) integers")
        if m["label_count"] and len(self.labels) and not (0 <= int(self.labels.min()) and
                                                          int(self.labels.max()) < m["label_count"]):
            raise DataError(f"{self.path}: labels.npy holds labels outside 0..{m['label_count'] - 1}")
        if cfg is not None:
            self.check_config(cfg)
        self.label_dim = m["label_count"]
        if m["encoder"] == "vae":
            try:
                self._scale, self._bias = scale_bias(m["latent_convention"], m.get("latent_stats"), m["shape"][0] // 2)
            except ValueError as err:
                raise DataError(f"{self.path}: {err}") from None

    def check_config(self, cfg) -> None:
        m, d = self.manifest, cfg.data
        want = {"encoder": d.encoder, "resolution": d.resolution, "channels": d.channels}
        have = {"encoder": m["encoder"], "resolution": m["shape"][-1], "channels": m["channels"]}
        diffs = [f"data.{k}: config {want[k]!r}, dataset {have[k]!r}" for k in want if want[k] != have[k]]
        if d.use_labels and m["label_count"] == 0 and (cfg.network.label_dim or 0) > 0:
            diffs.append("network.label_dim > 0 but the dataset has no labels")
        if diffs:
            raise DataError(f"dataset {self.path} does not match the config: " + "; ".join(diffs))

    @property
    def img_channels(self) -> int:
        return self.manifest["channels"]

    @property
    def resolution(self) -> int:
        return self.manifest["shape"][-1]

    def __len__(self) -> int:
        return self.manifest["count"]

    def get(self, indices: Sequence[int], generator: torch.Generator | None = None):
        """A batch: (x, one-hot labels or None), in the given index order."""
        idx = np.asarray(indices)
        order = np.argsort(idx)                     # sorted reads from the memory map, then restore order
        raw = torch.from_numpy(np.ascontiguousarray(self.images[idx[order]]))[np.argsort(order)]
        if self.manifest["encoder"] == "vae":                # a fresh posterior draw each time (method.md 7)
            x = draw(raw, self._scale, self._bias, generator)
        else:
            x = encode_pixels(raw)
        labels = None
        if self.label_dim:
            lab = torch.from_numpy(np.asarray(self.labels[idx]))
            labels = torch.nn.functional.one_hot(lab, self.label_dim).to(torch.float32)
        return x, labels

    def __getitem__(self, i: int):
        x, lab = self.get([i])
        return x[0], (lab[0] if lab is not None else torch.zeros(0))

    def uint8_images(self, n: int | None = None, start: int = 0) -> np.ndarray:
        """Pixel datasets: images start .. n-1 as N x H x W x C uint8 (read from the memory map: a slice
        at a time, so the FID reference streams over a dataset of any size)."""
        if self.manifest["encoder"] != "pixel":
            raise DataError("FID reference images need a pixel dataset")
        n = len(self) if n is None else min(n, len(self))
        return np.ascontiguousarray(self.images[start:n].transpose(0, 2, 3, 1))


class Prefetcher:
    """Runs an iterator `depth` items ahead in a background thread, so assembling the next batches
    (memory-map reads, decoding, pinned host memory) overlaps the device's work on the current one
    (train.prefetch_batches). The items and their order are exactly the iterator's."""

    def __init__(self, it: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="batch-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:                 # surfaced in the training thread by __next__
            self._put(("error", err))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

