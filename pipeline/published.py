"""EDM2's published results (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", tables 2-3 and its released configurations), shown beside a run's own number only
when the run's preset and measurement protocol are the paper's. Verify against the paper before
relying on a value.

The paper's protocol: 50,000 generated images, the minimum FID over three seed sets, the whole
training set as reference, at the EMA length best for that metric (fid.seed_sets = 3,
fid.num_images = 50000).
"""
from __future__ import annotations

PAPER = "EDM2 (Karras et al. 2024)"
PROTOCOL = {"num_images": 50000, "seed_sets": 3}

# preset -> metric -> (value, sigma_rel[, guidance w]); unguided unless a w is given.
PUBLISHED: dict[str, dict[str, tuple]] = {
    "img512-xs": {"fid": (3.53, 0.135), "fd_dinov2": (103.39, 0.200), "fid_guided": (2.91, 0.045, 1.4)},
    "img512-s": {"fid": (2.56, 0.130), "fd_dinov2": (68.64, 0.190), "fid_guided": (2.23, 0.025, 1.4)},
    "img512-m": {"fid": (2.25, 0.100), "fd_dinov2": (58.44, 0.155), "fid_guided": (2.01, 0.030, 1.2)},
    "img512-l": {"fid": (2.06, 0.085), "fd_dinov2": (52.25, 0.155), "fid_guided": (1.88, 0.015, 1.2)},
    "img512-xl": {"fid": (1.96, 0.085), "fd_dinov2": (45.96, 0.155), "fid_guided": (1.85, 0.020, 1.2)},
    "img512-xxl": {"fid": (1.91, 0.070), "fd_dinov2": (42.84, 0.150), "fid_guided": (1.81, 0.015, 1.2)},
    "img64-s": {"fid": (1.58, 0.075)},
    "img64-m": {"fid": (1.43, 0.060)},
    "img64-l": {"fid": (1.33, 0.040)},
    "img64-xl": {"fid": (1.33, 0.040)},
}


def protocol_matches(record: dict) -> bool:
    return record.get("num_images") == PROTOCOL["num_images"] and record.get("seed_sets", 1) == PROTOCOL["seed_sets"]


def paper_line(preset: str | None, records: list[dict]) -> str | None:
    """'paper: 3.53 at sigma_rel 0.135 (...); this run: ...' when the preset has a published number and
    the records were measured with the paper's protocol; else None (nothing is compared)."""
    entry = PUBLISHED.get(preset or "")
    if not entry or not records or not all(protocol_matches(r) for r in records):
        return None
    unguided = [r for r in records if (r.get("sampler") or {}).get("guidance", 1.0) == 1.0 and r.get("fid_min") is not None]
    if not unguided:
        return None
    best = min(unguided, key=lambda r: r["fid_min"])
    value, sigma = entry["fid"]
    return (f"paper ({PAPER}, {preset}, unguided): FID {value:.2f} at sigma_rel {sigma:.3f}; this run: "
            f"{best['fid_min']:.2f} at sigma_rel {best['sigma_rel']:.3f} (both: min over {PROTOCOL['seed_sets']} "
            f"seed sets of {PROTOCOL['num_images']:,} images)")
