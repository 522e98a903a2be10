"""Datasets: sources (Fashion-MNIST, image folders, zips), encoders (pixels; VAE latents), the
encoded-dataset artifact with its manifest, and the memory-mapped training loader (method.md 7).

An encoded dataset is a folder holding `images.npy` (uint8, N x C x H x W; or float16 latent
mean/std for the VAE encoder), `labels.npy` (int64, N) and `manifest.json` (count, shape, dtype,
encoder, source, label count, sha256). It is immutable and content-addressed by the sha256.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import queue
import shutil
import subprocess
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .io import atomic_write_text
from .errors import PipelineError

FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_FORMAT = "edm2-pipeline/encoded-dataset/1"


class DataError(PipelineError, ValueError):
    """Missing, corrupt or mismatched data; the message says what was tried or what differs."""


# ----------------------------------------------------------------------------------------------
# method.md 7: pixel encoding.

def encode_pixels(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 -> x / 127.5 - 1 (std about 0.5 = sigma_data)."""
    if not isinstance(x_uint8, torch.Tensor):
        x_uint8 = torch.from_numpy(np.array(x_uint8, dtype=np.float32))   # copies: memory maps are read-only
    return x_uint8.to(torch.float32) / 127.5 - 1


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model output -> uint8: clip(x * 127.5 + 128)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package (system, a user folder, or the .deb unpacked without root).

def fetch_fashion_mnist(dest: str | Path, cache_dir: str | Path = "data/raw") -> Path:
    """The four Fashion-MNIST .gz files copied into `dest` (from the system package, or its .deb
    unpacked without root): the folder the default params name as data.path, so that DVC hashes the
    input like any other. Written beside and renamed into place."""
    dest = Path(dest)
    names = [f for pair in FMNIST_FILES.values() for f in pair]
    if dest.is_dir() and any(dest.iterdir()):
        if sorted(p.name for p in dest.iterdir()) == sorted(names):
            return dest                                     # already there (DVC removes it before a rerun)
        raise DataError(f"{dest} holds other files than Fashion-MNIST's four .gz files: not replaced")
    src = find_fashion_mnist(None, cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in names:
            shutil.copyfile(src / f, tmp / f)
        tmp.chmod(0o755)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def find_fashion_mnist(user_dir: str | Path | None = None, cache_dir: str | Path = "data/raw") -> Path:
    """A folder with the four Fashion-MNIST .gz files; fetches the Debian package if needed. A named
    folder that does not exist yet (or is empty) is filled from the package (fetch_fashion_mnist)."""
    if user_dir and (not Path(user_dir).exists() or (Path(user_dir).is_dir() and not any(Path(user_dir).iterdir()))):
        return fetch_fashion_mnist(user_dir, cache_dir)
    tried = []
    candidates = [Path(user_dir)] if user_dir else [
        FMNIST_SYSTEM_DIR, Path(cache_dir) / "fashion-mnist-deb" / "usr/share/datasets/fashion-mnist"]
    for d in candidates:
        if all((d / f).is_file() for pair in FMNIST_FILES.values() for f in pair):
            return d
        tried.append(f"{d} (no Fashion-MNIST files)")
    if user_dir:   # the user named a folder: do not silently take another source
        raise DataError(f"Fashion-MNIST not found in data.path={user_dir}: expected "
                        f"{', '.join(f for pair in FMNIST_FILES.values() for f in pair)}")
    target = Path(cache_dir) / "fashion-mnist-deb"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run(["apt-get", "download", FMNIST_DEB], cwd=tmp, capture_output=True, text=True,
                               timeout=600)
            debs = list(Path(tmp).glob(f"{FMNIST_DEB}_*.deb"))
            if r.returncode != 0 or not debs:
                tried.append(f"`apt-get download {FMNIST_DEB}` failed: {(r.stderr or r.stdout).strip()[-200:]}")
            else:
                target.mkdir(parents=True, exist_ok=True)
                x = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], capture_output=True, text=True)
                if x.returncode != 0:
                    tried.append(f"`dpkg-deb -x` failed: {x.stderr.strip()[-200:]}")
                else:
                    return find_fashion_mnist(None, cache_dir)
        except (OSError, subprocess.SubprocessError) as err:
            tried.append(f"`apt-get download {FMNIST_DEB}` could not run: {err}")
    raise DataError("Fashion-MNIST not found. Tried: " + "; ".join(tried) +
                    f". Fix: `sudo apt-get install {FMNIST_DEB}`, or `apt-get download {FMNIST_DEB}` + "
                    f"`dpkg-deb -x`, or set data.path to a folder holding the four .gz files.")


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """IDX files: images have a 16-byte header, labels an 8-byte header."""
    try:
        with gzip.open(images_gz, "rb") as f:
            raw = f.read()
        magic, n, h, w = np.frombuffer(raw[:16], dtype=">u4")
        images = np.frombuffer(raw[16:], dtype=np.uint8)
        with gzip.open(labels_gz, "rb") as f:
            lraw = f.read()
        lmagic, ln = np.frombuffer(lraw[:8], dtype=">u4")
        labels = np.frombuffer(lraw[8:], dtype=np.uint8)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"corrupt IDX file {images_gz} / {labels_gz}: {err}") from None
    if magic != 2051 or lmagic != 2049 or images.size != n * h * w or labels.size != ln or n != ln:
        raise DataError(f"corrupt IDX files {images_gz.name}/{labels_gz.name}: header and size disagree")
    return images.reshape(n, h, w), labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Image folders and zips.

@dataclass
class RawImages:
    images: list[np.ndarray]           # each H x W x C uint8 (C = 1 or 3), sizes may differ
    labels: np.ndarray | None
    class_names: list[str]
    source: str
    skipped: list[str]                 # unreadable files, by name
    labels_from: str = "none"          # "dataset.json", "folder names", "idx file" or "none"


LABELS_FILE = "dataset.json"           # EDM2's dataset layout: {"labels": [[relative path, class], ...] or null}


MAX_IMAGE_PIXELS = 1 << 26            # 8192 x 8192: far above any training image; more is a decompression bomb
MAX_ENTRY_BYTES = 256 << 20            # one image file (a zip entry, uncompressed)


class ImageTooLarge(DataError):
    pass


def _decode_image(data: bytes | Path, rel: str = "") -> np.ndarray:
    from PIL import Image
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)   # reads the header only
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:                            # before decoding: 13000 x 13000 would take GBs
        raise ImageTooLarge(f"{rel}: {w} x {h} = {w * h:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
                            f"(a decompression bomb, or an image to downscale first)")
    img.load()
    if img.mode in ("RGBA", "LA", "P"):                    # composite transparency on white
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img).convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def read_image_folder(path: str | Path) -> RawImages:
    """Images under `path`, labelled by its dataset.json when there is one (EDM2's layout, whose folders
    are shards), else by class sub-folders (sorted names), else unlabelled."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = inside(root, sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()))
    labels_json = root / LABELS_FILE
    return _collect(((p.relative_to(root).as_posix(), p) for p in files), f"folder:{root}",
                    labels_json.read_bytes() if labels_json.is_file() else None)


def read_image_zip(path: str | Path) -> RawImages:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"zip file {p} does not exist")
    try:
        zf = zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        raise DataError(f"{p} is not a readable zip file") from None
    with zf:
        check_zip_entries(zf, p)
        names = sorted(n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_EXTS)
        labels_json = zf.read(LABELS_FILE) if LABELS_FILE in zf.namelist() else None
        return _collect(((n, zf.read(n)) for n in names), f"zip:{p}", labels_json)


def inside(root: Path, files: list[Path]) -> list[Path]:
    """The files, each of which must lie inside `root` once links are followed: a symlink out of a data
    folder is refused (it would read files the folder's owner did not put there)."""
    top = root.resolve()
    for f in files:
        if not f.resolve().is_relative_to(top):
            raise DataError(f"{f}: a link to {f.resolve()}, outside the data folder {root}; copy the file in instead")
    return files


def check_zip_entries(zf: zipfile.ZipFile, path: Path) -> None:
    """Entry names that stay inside the archive (no `..`, no absolute names), each once, each of a size
    an image can have: checked from the directory, before any entry is read."""
    seen = set()
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
            raise DataError(f"{path}: entry {name!r} points outside the archive; refused")
        if name in seen:
            raise DataError(f"{path}: entry {name!r} appears twice; refused (which one is the image?)")
        seen.add(name)
        if info.file_size > MAX_ENTRY_BYTES:
            raise DataError(f"{path}: entry {name!r} unpacks to {info.file_size:,} bytes, above the limit of "
                            f"{MAX_ENTRY_BYTES:,} for one file; refused")


def read_labels_json(data: bytes, source: str) -> dict[str, int | None] | None:
    """dataset.json -> {relative path: class or None}, or None for `{"labels": null}`."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{source}/{LABELS_FILE}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or "labels" not in doc:
        raise DataError(f"{source}/{LABELS_FILE}: expected {{\"labels\": [[path, class], ...]}} or {{\"labels\": null}}")
    if doc["labels"] is None:
        return None
    if not isinstance(doc["labels"], list):
        raise DataError(f"{source}/{LABELS_FILE}: \"labels\" is a {type(doc['labels']).__name__}, not a list")
    out: dict[str, int | None] = {}
    for i, entry in enumerate(doc["labels"]):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataError(f"{source}/{LABELS_FILE}: labels[{i}] is {str(entry)[:60]}, not [path, class]")
        rel, label = entry[0].replace("\\", "/"), entry[1]
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < MAX_CLASSES):
            raise DataError(f"{source}/{LABELS_FILE}: the label of {rel} is {label!r}, not a class number "
                            f"0..{MAX_CLASSES - 1}")
        if rel in out:
            raise DataError(f"{source}/{LABELS_FILE}: {rel} is labelled twice")
        out[rel] = label
    return out


def _collect(items: Iterator[tuple[str, bytes | Path]], source: str, labels_json: bytes | None = None) -> RawImages:
    images, rels, skipped = [], [], []
    for rel, data in items:
        try:
            images.append(_decode_image(data, f"{source}/{rel}"))
            rels.append(rel)
        except ImageTooLarge:
            raise
        except Exception:                                   # PIL raises many types for bad files
            skipped.append(rel)
    if not images:
        raise DataError(f"{source}: no readable images" + (f" ({len(skipped)} unreadable)" if skipped else ""))
    if labels_json is not None:
        return _labelled_by_json(images, rels, skipped, source, read_labels_json(labels_json, source))
    parents = [str(Path(r).parent) for r in rels]
    if all(p != "." for p in parents):
        class_names = sorted(set(parents))
        labels = np.array([class_names.index(p) for p in parents], dtype=np.int64)
        return RawImages(images, labels, class_names, source, skipped, "folder names")
    return RawImages(images, None, [], source, skipped)


def _labelled_by_json(images, rels, skipped, source, table) -> RawImages:
    """Labels from dataset.json; it must name exactly the images there are (unreadable ones aside)."""
    if table is None:
        return RawImages(images, None, [], source, skipped, LABELS_FILE)
    present = set(rels) | set(skipped)
    absent = sorted(set(table) - present)
    if absent:
        raise DataError(f"{source}/{LABELS_FILE} names {len(absent)} image(s) that are not there (e.g. {absent[0]})")
    unlabelled = [r for r in rels if r not in table]
    if unlabelled:
        raise DataError(f"{source}/{LABELS_FILE} has no label for {len(unlabelled)} image(s) (e.g. {unlabelled[0]})")
    missing = [r for r in rels if table[r] is None]
    if missing and len(missing) < len(rels):
        raise DataError(f"{source}/{LABELS_FILE}: {len(missing)} of {len(rels)} images have the label null (e.g. "
                        f"{missing[0]}): label them all, or set data.use_labels=false")
    if missing:
        return RawImages(images, None, [], source, skipped, LABELS_FILE)
    labels = np.array([table[r] for r in rels], dtype=np.int64)
    return RawImages(images, labels, [str(c) for c in range(int(labels.max()) + 1)], source, skipped, LABELS_FILE)


# ----------------------------------------------------------------------------------------------
# Resolution and channel handling.

def to_resolution(img: np.ndarray, resolution: int, mode: str) -> np.ndarray:
    """H x W x C uint8 -> resolution x resolution x C: 'pad' (centre, zeros), 'resize' (Lanczos to a
    square) or 'center-crop' (largest centred square, then Lanczos)."""
    h, w = img.shape[:2]
    if mode == "pad":
        if h > resolution or w > resolution:
            raise DataError(f"image of {w}x{h} is larger than data.resolution={resolution}: "
                            f"use data.resize=resize or center-crop")
        out = np.zeros((resolution, resolution, img.shape[2]), dtype=np.uint8)
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out[top:top + h, left:left + w] = img
        return out
    from PIL import Image
    if mode == "adm-center-crop":
        return _adm_center_crop(img, resolution)
    if mode == "center-crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    out = np.asarray(pil.resize((resolution, resolution), Image.LANCZOS))
    return out[..., None] if out.ndim == 2 else out


def _adm_center_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """The centre crop EDM2 prepares ImageNet with (from ADM): halve with a box filter while the short
    side is at least twice the target, bicubic to a short side of exactly the target, then the central
    square."""
    from PIL import Image
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    while min(pil.size) >= 2 * resolution:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), Image.BOX)
    scale = resolution / min(pil.size)
    pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    arr = arr[top:top + resolution, left:left + resolution]
    return arr[..., None] if arr.ndim == 2 else arr


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.shape[2] == channels:
        return img
    if channels == 1:   # ITU-R 601-2 luma, as PIL's convert("L")
        return (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().clip(0, 255) \
            .astype(np.uint8)[..., None]
    if channels == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    raise DataError(f"cannot convert {img.shape[2]}-channel images to {channels} channels")


# ----------------------------------------------------------------------------------------------
# Encoding into the artifact.

def held_out(count: int, reference_split: float, seed: int) -> np.ndarray:
    """The indices held out for the reference (sorted): a seeded permutation's first n, n = the count
    or round(fraction * count); at least one image stays for training."""
    n = int(reference_split) if reference_split >= 1 else int(round(reference_split * count))
    if not 1 <= n < count:
        raise DataError(f"data.reference_split={reference_split} holds out {n} of {count} images: keep at least one "
                        f"for each side")
    return np.sort(np.random.default_rng(seed).permutation(count)[:n])


def load_source(cfg_data, split: str = "train", cache_dir: str | Path = "data/raw") -> RawImages:
    """A split of the source: with data.reference_split, `train` leaves out the held-out images and
    `reference` is them (a seeded choice, recorded in the source name)."""
    if split == "reference" and cfg_data.reference_split is None:
        raise DataError("the 'reference' split needs data.reference_split (a fraction or a count to hold out)")
    if split in ("train", "reference") and cfg_data.reference_split is not None:
        whole = load_source(cfg_data.model_copy(update={"reference_split": None}), "train", cache_dir)
        return _split(whole, cfg_data, keep_held_out=split == "reference")
    from .sources import SOURCES
    source = SOURCES[cfg_data.source]
    if split not in source.splits:
        raise DataError(f"data.source={cfg_data.source} has no '{split}' split; give the reference as a folder")
    return globals()[source.reader](cfg_data, split, cache_dir)


def read_fashion_mnist(d, split: str, cache_dir) -> RawImages:
    """The `fashion-mnist` source: one split of the idx files from Debian's package."""
    folder = find_fashion_mnist(d.path, cache_dir)
    imgs, labels = read_idx(*(folder / f for f in FMNIST_FILES[split]))
    return RawImages(list(imgs[..., None]), labels, list(FMNIST_CLASSES), f"fashion-mnist:{split}:{folder}", [],
                     "idx file")


def read_folder_source(d, split: str, cache_dir) -> RawImages:
    """The `folder` source (train only)."""
    return read_image_folder(d.path)


def read_zip_source(d, split: str, cache_dir) -> RawImages:
    """The `zip` source (train only)."""
    return read_image_zip(d.path)


def _split(raw: RawImages, cfg_data, keep_held_out: bool) -> RawImages:
    idx = held_out(len(raw.images), cfg_data.reference_split, cfg_data.split_seed)
    mask = np.zeros(len(raw.images), bool)
    mask[idx] = True
    pick = np.flatnonzero(mask if keep_held_out else ~mask)
    what = (f"held-out {len(idx)} of {len(raw.images)} (seed {cfg_data.split_seed})" if keep_held_out else
            f"without the {len(idx)} held out (seed {cfg_data.split_seed})")
    return RawImages([raw.images[i] for i in pick], raw.labels[pick] if raw.labels is not None else None,
                     raw.class_names, f"{raw.source} {what}", raw.skipped, raw.labels_from)


def write_edm2_dataset(cfg, out: str | Path, split: str = "train", cache_dir: str | Path = "data/raw",
                       progress: bool = True) -> dict:
    """Any source -> EDM2's dataset layout (what its dataset tool writes): PNGs in shards of 1000,
    `00000/img00000000.png`, and `dataset.json` with the labels, as a folder or (out ending in .zip) a
    zip. Brought to data.resolution / data.resize / data.channels as the encode stage would. Written
    beside and renamed into place; an existing `out` is never replaced."""
    from PIL import Image
    d, out = cfg.data, Path(out)
    if out.exists():
        raise DataError(f"{out} exists: choose another output (nothing is replaced)")
    raw = load_source(d, split, cache_dir)
    if d.max_images:
        raw.images = raw.images[:d.max_images]
        raw.labels = raw.labels[:d.max_images] if raw.labels is not None else None
    labels = raw.labels if d.use_labels else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        as_zip = out.suffix.lower() == ".zip"
        zf = zipfile.ZipFile(tmp / "d.zip", "w", zipfile.ZIP_STORED) if as_zip else None
        entries = []
        it = enumerate(raw.images)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(raw.images), desc=f"write {out.name}", unit="img", mininterval=1.0)
        for i, img in it:
            rel = f"{i // 1000:05d}/img{i:08d}.png"
            arr = to_channels(to_resolution(img, d.resolution, d.resize), d.channels)
            buf = io.BytesIO()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="png", compress_level=0,
                                                                             optimize=False)
            if zf is not None:
                zf.writestr(rel, buf.getvalue())
            else:
                (tmp / rel).parent.mkdir(exist_ok=True)
                (tmp / rel).write_bytes(buf.getvalue())
            entries.append([rel, int(labels[i])] if labels is not None else None)
        doc = json.dumps({"labels": entries if labels is not None else None})
        if zf is not None:
            zf.writestr(LABELS_FILE, doc)
            zf.close()
            os.replace(tmp / "d.zip", out)
            shutil.rmtree(tmp)
        else:
            (tmp / LABELS_FILE).write_text(doc)
            tmp.chmod(0o755)
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"count": len(raw.images), "labels": len(raw.class_names) if labels is not None else 0,
            "source": raw.source, "out": str(out)}


def sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def dataset_splits(cfg) -> list[str]:
    """The splits the encode stage writes: Fashion-MNIST's train (training) and test (FID reference);
    a folder or zip source has train only; with data.reference_split also `reference` (held out)."""
    held = ["reference"] if cfg.data.reference_split is not None else []
    from .sources import SOURCES
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
    from .sources import SOURCES
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
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
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------------------
# Optional latent encoder (method.md 7): a local diffusers AutoencoderKL, never downloaded.

def load_vae(vae_path: str | Path):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("data.encoder=vae needs diffusers: pip install 'edm2-pipeline[vae]'") from None
    p = Path(vae_path)
    if not p.is_dir():
        raise DataError(f"data.vae_path={vae_path}: no such folder (a local diffusers AutoencoderKL; "
                        f"nothing is downloaded)")
    return AutoencoderKL.from_pretrained(p, local_files_only=True).eval()


def vae_downsampling(vae) -> int:
    """Pixel-to-latent size ratio of an AutoencoderKL (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(pixels: np.ndarray, vae, batch_size: int = 32, progress: bool = False,
                   convention: str = "edm2"):
    """Pixels (N x 3 x H x W uint8) -> the VAE posterior's [mean, std] (N x 2C x h x w; float32 for the
    edm2 convention, as EDM2 stores them, float16 for data-stats), plus per-channel statistics of the
    latents (what data-stats scales by; recorded for both)."""
    from .latents import vae_input
    out = []
    rng = range(0, len(pixels), batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="vae encode", unit="batch")
    dtype = torch.float32 if convention == "edm2" else torch.float16
    for i in rng:
        dist = vae.encode(vae_input(torch.from_numpy(pixels[i:i + batch_size]), convention)).latent_dist
        out.append(torch.cat([dist.mean, dist.std], dim=1).to(dtype).numpy())
    return np.concatenate(out), latent_statistics(np.concatenate(out))


def latent_statistics(arr: np.ndarray) -> dict:
    c = arr.shape[1] // 2
    mean = arr[:, :c].astype(np.float64)
    std = arr[:, c:].astype(np.float64)
    ch_mean = mean.mean(axis=(0, 2, 3))
    ch_std = np.sqrt((mean ** 2 + std ** 2).mean(axis=(0, 2, 3)) - ch_mean ** 2)
    return {"mean": ch_mean.tolist(), "std": ch_std.tolist()}


LATENT_RE = re.compile(r"(^|/)img-mean-std-\d+\.npy$")   # NVIDIA's dataset tool: one posterior per image


def read_latent_source(path: str | Path, kind: str) -> RawImages | None:
    """A latent dataset made by NVIDIA's dataset tool (`00000/img-mean-std-00000000.npy` + dataset.json),
    as a folder or zip: the stored posteriors (2C x h x w each) as they are; None when `path` holds none."""
    p = Path(path)
    if kind == "folder" and p.is_dir():
        files = sorted(f.relative_to(p).as_posix() for f in inside(p, list(p.rglob("*.npy")))
                       if LATENT_RE.search(f.relative_to(p).as_posix()))
        if not files:
            return None
        read = lambda rel: (p / rel).read_bytes()
        labels_json = (p / LABELS_FILE).read_bytes() if (p / LABELS_FILE).is_file() else None
    elif kind == "zip" and p.is_file() and zipfile.is_zipfile(p):
        zf = zipfile.ZipFile(p)
        check_zip_entries(zf, p)
        files = sorted(n for n in zf.namelist() if LATENT_RE.search(n))
        if not files:
            return None
        read = zf.read
        labels_json = zf.read(LABELS_FILE) if LABELS_FILE in zf.namelist() else None
    else:
        return None
    arrays = []
    for rel in files:
        try:
            a = np.load(io.BytesIO(read(rel)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{path}/{rel}: not a plain numeric array ({str(err)[:80]})") from None
        if a.ndim != 3 or a.shape[0] % 2 or a.dtype.kind != "f" or (arrays and a.shape != arrays[0].shape):
            raise DataError(f"{path}/{rel}: {a.shape} {a.dtype}, expected 2C x h x w floats like the others "
                            f"({arrays[0].shape if arrays else 'the first'})")
        if not np.isfinite(a).all():
            raise DataError(f"{path}/{rel}: holds non-finite values")
        arrays.append(a.astype(np.float32))
    source = f"{kind}:{p} (NVIDIA latents)"
    if labels_json is None:
        return RawImages(arrays, None, [], source, [])
    return _labelled_by_json(arrays, files, [], source, read_labels_json(labels_json, source))


# ----------------------------------------------------------------------------------------------
# The training loader: memory-mapped, checked against its manifest and the config.

MANIFEST_FIELDS = {"count": int, "shape": list, "dtype": str, "encoder": str, "channels": int, "label_count": int,
                   "sha256": str}
ENCODED_DTYPES = ("uint8", "float16", "float32")
MAX_CLASSES = 100_000                                  # one-hot labels: more is a damaged manifest, not a dataset


def read_manifest(path: str | Path) -> dict:
    """An encoded dataset's manifest.json, checked field by field: anything malformed is a DataError
    naming the file and the field (never a traceback)."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        raise DataError(f"{path} is not an encoded dataset (no manifest.json): run the encode stage first")
    try:
        m = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{f} is corrupt: not UTF-8 text; re-run the encode stage") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{f} is corrupt: {err}") from None
    if not isinstance(m, dict):
        raise DataError(f"{f} is corrupt: expected a JSON object, got {type(m).__name__}; re-run the encode stage")
    if m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{f}: unknown format {m.get('format')!r}")
    for key, typ in MANIFEST_FIELDS.items():
        v = m.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise DataError(f"{f}: field {key!r} is {'missing' if key not in m else repr(v)[:40]} (expected "
                            f"{typ.__name__}); re-run the encode stage")
    if not (m["count"] >= 1 and len(m["shape"]) == 3 and all(isinstance(x, int) and x >= 1 for x in m["shape"])
            and m["dtype"] in ENCODED_DTYPES and m["encoder"] in ("pixel", "vae") and 0 <= m["label_count"] <= MAX_CLASSES
            and re.fullmatch(r"[0-9a-f]{64}", m["sha256"])):
        raise DataError(f"{f}: inconsistent values (count {m['count']}, shape {m['shape']}, dtype {m['dtype']!r}, "
                        f"encoder {m['encoder']!r}, label_count {m['label_count']}); re-run the encode stage")
    ls = m.get("latent_stats")
    if m["encoder"] == "vae" and ls is not None:
        c = m["shape"][0] // 2
        if not (isinstance(ls, dict) and all(isinstance(ls.get(k), list) and len(ls[k]) == c and
                                             all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 and math.isfinite(x) for x in ls[k]) for k in ("mean", "std"))
                and all(x > 0 for x in ls["std"])):
            raise DataError(f"{f}: field 'latent_stats' must hold {c} finite means and positive stds; re-run the "
                            f"encode stage")
    if m["encoder"] == "vae":
        m.setdefault("latent_convention", "data-stats")    # manifests before conventions were recorded
        if m["latent_convention"] not in ("edm2", "data-stats") or (m["latent_convention"] == "data-stats" and not ls):
            raise DataError(f"{f}: latent_convention {m['latent_convention']!r} (edm2, or data-stats with its "
                            f"latent_stats); re-run the encode stage")
    elif m["encoder"] == "pixel":
        m["latent_stats"] = None                          # pixels: nothing to scale
    return m


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
            from .latents import scale_bias
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
            from .latents import draw
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
