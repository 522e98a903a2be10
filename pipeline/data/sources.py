"""The data sources as a small table (method.md 7), read by the config schema (`data.source`) and by
the encode stage (data/readers.load_source). An entry says which splits the source has itself (more
come from `data.reference_split`), whether it needs `data.path`, whether it may hold NVIDIA's latent
files, and which entry of data/readers.READERS reads a split into RawImages. Adding one: the reader
and its READERS entry in data/readers.py, an entry here, a test in tests/ and its line in
docs/data.md. Nothing is imported here: the schema reads the names, and a stage's code dependencies
stay its own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    splits: tuple[str, ...]              # the splits the source has itself: train (training), test (a reference)
    needs_path: bool                     # data.path must be given
    latents: bool                        # data.encoder=vae may find NVIDIA's stored latents there
    reader: str                          # its entry in data/readers.READERS: (cfg.data, split, cache_dir) -> RawImages
    doc: str


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(("train", "test"), False, False, "read_fashion_mnist",
                            "Zalando's Fashion-MNIST from Debian's package (the default; test is the FID reference)"),
    "folder": Source(("train",), True, True, "read_folder_source",
                     "an image folder: class subfolders or EDM2's dataset.json labels; or NVIDIA's latent files"),
    "zip": Source(("train",), True, True, "read_zip_source", "the same as a .zip (EDM2's dataset_tool output)"),
}
