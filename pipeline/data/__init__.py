"""Datasets (method.md 7), one room per job:

- sources.py   the table of sources (names only: the config schema reads it)
- readers.py   a source's split -> RawImages (Fashion-MNIST, folders, zips, NVIDIA's latent files)
- pixels.py    uint8 <-> model units, resizing and channels; DataError
- latents.py   the VAE encoder and the latent conventions (to the network and back to pixels)
- manifest.py  the encoded dataset's manifest and content hash
- encode.py    the encode stage: the artifact (images.npy, labels.npy, manifest.json) or EDM2's layout
- encoded.py   the training loader (memory-mapped, checked) and the batch prefetcher

An encoded dataset is a folder holding `images.npy` (uint8, N x C x H x W; or the VAE posterior's
mean/std), `labels.npy` (int64, N) and `manifest.json` (count, shape, dtype, encoder, source, label
count, sha256). It is immutable and content-addressed by the sha256. Import from the module that
holds a name; this file imports nothing, so a stage depends only on the rooms it uses.
"""
