"""The encoded dataset's manifest (method.md 7): its format, its fields, reading it with one-line
refusals, and the content hash it is addressed by.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Sequence

from .pixels import DataError

MANIFEST_FORMAT = "edm2-pipeline/encoded-dataset/1"


def sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()

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

