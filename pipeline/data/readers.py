"""Sources -> RawImages (method.md 7): Fashion-MNIST from Debian's package, image folders and zips
(class subfolders or EDM2's dataset.json labels), NVIDIA's latent files; the held-out reference
split. `READERS` is the table data/sources.py's entries name; `load_source` is the one way in.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..io import published_folder
from .manifest import MAX_CLASSES
from .pixels import DataError
from .sources import SOURCES

FMNIST_DEB = "dataset-fashion-mnist"

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
    # (an empty `dest` is replaced by the rename itself; two fetches at once keep the first whole copy)
    with published_folder(dest, theirs_complete=lambda d: sorted(p.name for p in d.iterdir()) == sorted(names)) as tmp:
        for f in names:
            shutil.copyfile(src / f, tmp / f)
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
                def whole(t: Path) -> bool:
                    return all((t / "usr/share/datasets/fashion-mnist" / f).is_file()
                               for pair in FMNIST_FILES.values() for f in pair)
                try:                                    # whole or not at all, also with two fetches at once
                    with published_folder(target, theirs_complete=whole) as unpacked:
                        x = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True,
                                           text=True)
                        if x.returncode != 0:
                            raise DataError(f"`dpkg-deb -x` failed: {x.stderr.strip()[-200:]}")
                    return find_fashion_mnist(None, cache_dir)
                except DataError as err:
                    tried.append(str(err))
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


def class_count(cfg_data) -> int | None:
    """How many classes the source's labels have, read from names only (no image decoded): Fashion-MNIST
    10; a folder or zip by dataset.json's labels, else its class sub-folders (0: unlabelled); None when
    the source cannot be listed (not there yet: the encode stage says why)."""
    if cfg_data.source == "fashion-mnist":
        return len(FMNIST_CLASSES)
    path = Path(cfg_data.path or "")
    try:
        if cfg_data.source == "folder" and path.is_dir():
            rels = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS]
            table = (path / LABELS_FILE).read_bytes() if (path / LABELS_FILE).is_file() else None
        elif cfg_data.source == "zip" and path.is_file():
            with zipfile.ZipFile(path) as zf:
                rels = [n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_EXTS]
                table = zf.read(LABELS_FILE) if LABELS_FILE in zf.namelist() else None
        else:
            return None
    except (OSError, zipfile.BadZipFile):
        return None
    if table is not None:
        labels = read_labels_json(table, str(path)) or {}
        values = [v for v in labels.values() if v is not None]
        return max(values) + 1 if values else 0
    parents = [str(Path(r).parent) for r in rels]
    return len(set(parents)) if parents and all(p != "." for p in parents) else 0


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
    source = SOURCES[cfg_data.source]
    if split not in source.splits:
        raise DataError(f"data.source={cfg_data.source} has no '{split}' split; give the reference as a folder")
    return READERS[source.reader](cfg_data, split, cache_dir)


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



# The readers the entries of sources.SOURCES name: (cfg.data, split, cache_dir) -> RawImages.
READERS = {"read_fashion_mnist": read_fashion_mnist, "read_folder_source": read_folder_source,
           "read_zip_source": read_zip_source}
