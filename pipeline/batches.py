"""What a training step draws, as a function of where it is in the run (method.md 3): the named
random streams, the data order (one seeded permutation per epoch) and each rank's micro-batches.

Every draw is seeded by (train.seed, its stream, its position in the run), so a step's images and
noise depend only on (seed, nimg): not on the number of processes, the accumulation split, the
prefetch depth or where a run was interrupted. A new stream takes a new number; the numbers are
part of every result and never change.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from . import config as C
from .data.encoded import EncodedDataset

STREAMS = {
    "data_order": 1,      # the permutation of epoch e over the dataset; position (epoch)
    "init": 2,            # the network's initial weights, the same on every rank; position ()
    "noise": 3,           # sigma and eps of the whole global batch starting at image nimg; (nimg)
    "dropout": 4,         # dropout masks of rank r's micro-batch k; (nimg, r, k)
    "latents": 5,         # a VAE posterior draw for the micro-batch starting at image lo; (nimg, lo)
    "label_dropout": 6,   # which labels are zeroed (training the unconditional guide); (nimg, lo)
}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby positions give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def stream_seed(seed: int, stream: str, *position: int) -> int:
    """The seed of one draw of `stream` (an entry of STREAMS) at `position` in the run."""
    return mix_seed(seed, STREAMS[stream], *position)


def batch_indices(nimg: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of the global batch that starts at image `nimg` of the endless stream made
    of one permutation per epoch."""
    out = np.empty(batch_size, dtype=np.int64)
    pos, filled = nimg, 0
    while filled < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, "data_order", epoch)))
        take = min(batch_size - filled, n - offset)
        out[filled:filled + take] = perm.numpy()[offset:offset + take]
        filled, pos = filled + take, pos + take
    return out


def rank_batches(ds: EncodedDataset, train_cfg: C.TrainConfig, nimg: int, rank: int, batch_rank: int,
                 batch_gpu: int, pin: bool = False) -> Iterator[tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]]:
    """This rank's micro-batches from image `nimg` on, in training order: ((nimg, round), x, labels)."""
    rounds = batch_rank // batch_gpu
    while nimg < train_cfg.duration_nimg:
        idx_all = batch_indices(nimg, train_cfg.batch_size, len(ds), train_cfg.seed)
        for r in range(rounds):
            lo = rank * batch_rank + r * batch_gpu
            draw = torch.Generator().manual_seed(stream_seed(train_cfg.seed, "latents", nimg, lo))
            x, labels = ds.get(idx_all[lo:lo + batch_gpu], generator=draw)
            if pin:                                 # page-locked: the copy to the GPU runs asynchronously
                x = x.pin_memory()
                labels = labels.pin_memory() if labels is not None else None
            yield (nimg, r), x, labels
        nimg += train_cfg.batch_size
