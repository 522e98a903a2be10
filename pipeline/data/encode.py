"""The encode stage's work (method.md 7): a source -> the encoded-dataset artifact (images.npy,
labels.npy, manifest.json) or EDM2's own dataset layout, each written beside and renamed into place.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..io import atomic_write, atomic_write_text, published_folder
from .latents import encode_latents, latent_statistics, load_vae, vae_downsampling
from .manifest import MANIFEST_FORMAT, sha256_files
from .pixels import DataError, to_channels, to_resolution
from .readers import LABELS_FILE, RawImages, load_source, read_latent_source
from .sources import SOURCES


def write_edm2_dataset(cfg, out: str | Path, split: str = "train", cache_dir: str | Path = "data/raw",
                       progress: bool = True) -> dict:
    """Any source -> EDM2's dataset layout (what its dataset tool writes): PNGs in shards of 1000,
    `00000/img00000000.png`, and `dataset.json` with the labels, as a folder or (out ending in .zip) a
    zip. Brought to data.resolution / data.resize / data.channels as the encode stage would. Written
    beside and renamed into place; an existing `out` is never replaced."""
    d, out = cfg.data, Path(out)
    if out.exists():
        raise DataError(f"{out} exists: choose another output (nothing is replaced)")
    raw = load_source(d, split, cache_dir)
    if d.max_images:
        raw.images = raw.images[:d.max_images]
        raw.labels = raw.labels[:d.max_images] if raw.labels is not None else None
    labels = raw.labels if d.use_labels else None
    files = _edm2_files(raw, d, labels, progress, out.name)
    if out.suffix.lower() == ".zip":
        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for rel, data in files:
                    zf.writestr(rel, data)
        atomic_write(out, write)
    else:
        with published_folder(out) as tmp:
            for rel, data in files:
                (tmp / rel).parent.mkdir(exist_ok=True)
                (tmp / rel).write_bytes(data)
    return {"count": len(raw.images), "labels": len(raw.class_names) if labels is not None else 0,
            "source": raw.source, "out": str(out)}


def _edm2_files(raw: RawImages, d, labels, progress: bool, name: str) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of EDM2's dataset layout: the PNGs in shards of 1000, then dataset.json."""
    from PIL import Image
    entries = []
    it = enumerate(raw.images)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(raw.images), desc=f"write {name}", unit="img", mininterval=1.0)
    for i, img in it:
        rel = f"{i // 1000:05d}/img{i:08d}.png"
        arr = to_channels(to_resolution(img, d.resolution, d.resize), d.channels)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="png", compress_level=0,
                                                                         optimize=False)
        yield rel, buf.getvalue()
        entries.append([rel, int(labels[i])] if labels is not None else None)
    yield LABELS_FILE, json.dumps({"labels": entries if labels is not None else None}).encode()


def dataset_splits(cfg) -> list[str]:
    """The splits the encode stage writes: Fashion-MNIST's train (training) and test (FID reference);
    a folder or zip source has train only; with data.reference_split also `reference` (held out)."""
    held = ["reference"] if cfg.data.reference_split is not None else []
    return list(SOURCES[cfg.data.source].splits) + held


def ensure_encoded(cfg, cache_dir: str | Path = "data/raw", log=print) -> None:
    """Encode the splits that are not there yet (what a sweep on a fresh clone needs before the
    first trial), with the encode stage's own code; encoded splits are left as they are."""
    for split in dataset_splits(cfg):
        out = Path(cfg.data.dataset_dir) / split
        if not (out / "manifest.json").is_file():
            log(f"{out}: not encoded yet, encoding it now (the encode stage's code; `dvc repro encode` does the same)")
            encode_dataset(cfg, out, split, cache_dir=cache_dir)


def encode_dataset(cfg, out_dir: str | Path, split: str = "train", cache_dir: str | Path = "data/raw",
                   progress: bool = True) -> dict:
    """Read a source, bring it to the configured resolution/channels, encode, write the artifact.

    Writes into a temp folder and renames it into place, so a crash never leaves half a dataset.
    Returns the manifest.
    """
    d = cfg.data
    out = Path(out_dir)                                # checked before any reading: it is replaced at the end
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not an encoded dataset: not replaced (choose another data.dataset_dir)")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder (choose another data.dataset_dir)")
    # A VAE dataset's reference splits stay pixels (at the VAE's input size): FID compares pixels.
    pixels_only = d.encoder == "vae" and split in ("test", "reference")
    given = read_latent_source(d.path, d.source) if d.encoder == "vae" and SOURCES[d.source].latents \
        and split == "train" and d.reference_split is None else None
    if given is not None:
        return _write_encoded(cfg, out, split, given, *_as_stored(d, given))
    raw = load_source(d, split, cache_dir)
    if d.max_images:
        raw.images, raw.labels = raw.images[:d.max_images], (raw.labels[:d.max_images] if raw.labels is not None else None)
    channel_counts = {im.shape[2] for im in raw.images}
    sizes = {im.shape[:2] for im in raw.images}
    notes = []
    if len(channel_counts) > 1 or channel_counts != {d.channels if d.encoder == "pixel" else 3}:
        notes.append(f"converted images with {sorted(channel_counts)} channels to "
                     f"{d.channels if d.encoder == 'pixel' else 3}")
    if len(sizes) > 1:
        notes.append(f"{len(sizes)} different image sizes brought to {d.resolution}x{d.resolution} by '{d.resize}'")
    if raw.skipped:
        notes.append(f"skipped {len(raw.skipped)} unreadable file(s): {', '.join(raw.skipped[:5])}"
                     f"{' ...' if len(raw.skipped) > 5 else ''}")
    img_channels = d.channels if d.encoder == "pixel" else 3
    vae = load_vae(d.vae_path) if d.encoder == "vae" else None
    vae_res = d.resolution * vae_downsampling(vae) if vae is not None else d.resolution
    if pixels_only:
        vae, notes = None, notes + [f"pixels at {vae_res}x{vae_res} for the FID reference (the training split holds "
                                    f"the VAE latents)"]
    it = raw.images
    if progress:
        from tqdm import tqdm
        it = tqdm(raw.images, desc=f"encode {split}", unit="img", mininterval=1.0)
    pixels = np.stack([to_channels(to_resolution(im, vae_res, d.resize), img_channels) for im in it])
    pixels = pixels.transpose(0, 3, 1, 2).copy()                            # N x C x H x W
    labels = raw.labels if d.use_labels else None
    if vae is not None:
        array, latent_stats = encode_latents(pixels, vae, progress=progress, convention=d.latent_convention)
    else:
        array, latent_stats = pixels, None
    return _write_encoded(cfg, out, split, raw, array, labels, notes, latent_stats,
                          "vae" if vae is not None else "pixel", d.resolution if vae else vae_res)


def _as_stored(d, given: RawImages) -> tuple:
    """NVIDIA's latents as its dataset tool stored them: (array, labels, notes, latent_stats, encoder,
    resolution) for _write_encoded, after checking they fit the config."""
    if d.latent_convention != "edm2":
        raise DataError(f"{given.source}: NVIDIA's latents follow EDM2's convention; set data.latent_convention=edm2")
    array = np.stack(given.images)
    if array.shape[-1] != d.resolution:
        raise DataError(f"{given.source}: latents are {array.shape[-1]}x{array.shape[-1]}, data.resolution is "
                        f"{d.resolution}")
    labels = given.labels if d.use_labels else None
    return (array, labels, ["posteriors read as NVIDIA's dataset tool stored them (not re-encoded)"],
            latent_statistics(array), "vae", d.resolution)


def _write_encoded(cfg, out: Path, split: str, raw: RawImages, array: np.ndarray, labels: np.ndarray | None,
                   notes: list, latent_stats: dict | None, encoder: str, resolution: int) -> dict:
    """The artifact: images.npy (the encoded `array`), labels.npy, manifest.json (source, class names and
    where the labels came from: `raw`'s), written beside and renamed into place."""
    d = cfg.data

    def same_data(theirs: Path) -> bool:            # another process published the same encoding first
        try:
            return json.loads((theirs / "manifest.json").read_text())["sha256"] == manifest["sha256"]
        except (OSError, ValueError, KeyError, NameError):
            return False

    with published_folder(out, replace=True, theirs_complete=same_data) as tmp:
        np.save(tmp / "images.npy", array)
        np.save(tmp / "labels.npy", labels if labels is not None else np.full(len(array), -1, np.int64))
        manifest = {
            "format": MANIFEST_FORMAT, "count": int(len(array)), "shape": list(array.shape[1:]),
            "dtype": str(array.dtype), "encoder": encoder, "source": raw.source, "split": split,
            **({"latent_convention": d.latent_convention} if encoder == "vae" else {}),
            "resolution": resolution, "channels": int(array.shape[1]) if encoder == "pixel" else int(array.shape[1] // 2),
            "resize": d.resize, "label_count": len(raw.class_names) if labels is not None else 0,
            "class_names": raw.class_names if labels is not None else [],
            "labels_from": raw.labels_from if labels is not None else "none",
            "sha256": sha256_files([tmp / "images.npy", tmp / "labels.npy"]),
            "notes": notes, "latent_stats": latent_stats,
        }
        atomic_write_text(json.dumps(manifest, indent=2), tmp / "manifest.json")
    return manifest

