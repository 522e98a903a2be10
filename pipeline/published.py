"""EDM2's published results (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", tables 2-3 and its released configurations), shown beside a run's own number only
when the run's preset and measurement protocol are the paper's. Verify against the paper before
relying on a value.

The paper's protocol: 50,000 generated images, the minimum FID over three seed sets, EDM2's legacy
Inception features against NVIDIA's published reference statistics of the whole training set, the
sampler of EDM2's presets, at the EMA length best for that metric (the img512/img64 presets set it).
"""
from __future__ import annotations

PAPER = "EDM2 (Karras et al. 2024)"
PROTOCOL = {"num_images": 50000, "seed_sets": 3}
# What else a number depends on: EDM2's feature protocol, NVIDIA's published reference statistics for the
# preset's dataset, and the sampler of EDM2's generate_images presets (32 Heun steps, EDM's schedule).
PAPER_MODE = "legacy"
PAPER_SAMPLER = {"steps": 32, "solver": "heun", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": 0.0}

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


def protocol_differences(preset: str, record: dict) -> list[str]:
    """What in a record is not the paper's protocol for `preset` ("metrics.mode is clean, the paper's legacy")."""
    dataset = preset.split("-")[0]                       # img512 / img64: NVIDIA's dataset-refs/<dataset>.pkl
    out = []
    if record.get("mode") != PAPER_MODE:
        out.append(f"metrics.mode is {record.get('mode')}, the paper's {PAPER_MODE}")
    if record.get("ref_num_images") or not str(record.get("reference", "")).startswith(dataset):
        out.append(f"the reference is {record.get('reference')}, the paper's NVIDIA's {dataset}.pkl")
    if record.get("num_images") != PROTOCOL["num_images"]:
        out.append(f"metrics.num_images is {record.get('num_images')}, the paper's {PROTOCOL['num_images']}")
    if record.get("seed_sets", 1) != PROTOCOL["seed_sets"]:
        out.append(f"metrics.seed_sets is {record.get('seed_sets', 1)}, the paper's {PROTOCOL['seed_sets']}")
    s = record.get("sampler") or {}
    for k, v in PAPER_SAMPLER.items():
        if k in s and s[k] != v:
            out.append(f"sampler.{k} is {s[k]}, the paper's {v}")
    return out


def paper_lines(preset: str | None, records: list[dict]) -> list[str]:
    """'paper: 3.53 at sigma_rel 0.135 ...; this run: ...' for FID, FD-DINOv2 (when measured) and guided
    FID (when the run has guided points), only when the preset has published numbers and the records were
    measured with the paper's whole protocol (feature mode, NVIDIA's reference, 50,000 images x 3 seed sets,
    the sampler); with another protocol one line saying what differs, and no numbers side by side."""
    entry = PUBLISHED.get(preset or "")
    from .records import record_metrics
    if not entry or not records:
        return []
    differ = sorted({d for r in records for d in protocol_differences(preset, r)})
    if differ:                                       # two protocols side by side would mislead: say why not
        return [f"paper ({PAPER}, {preset}): not compared, the protocol differs: {'; '.join(differ[:4])}"
                f"{' ...' if len(differ) > 4 else ''}"]
    both = f"both: min over {PROTOCOL['seed_sets']} seed sets of {PROTOCOL['num_images']:,} images"
    plain = [r for r in records if (r.get("sampler") or {}).get("guidance", 1.0) == 1.0 and r.get("fid_min") is not None]
    guided = [r for r in records if (r.get("sampler") or {}).get("guidance", 1.0) != 1.0 and r.get("fid_min") is not None]
    lines = []
    if plain and "fid" in entry:
        value, sigma = entry["fid"]
        best = min(plain, key=lambda r: r["fid_min"])
        lines.append(f"paper ({PAPER}, {preset}, unguided): FID {value:.2f} at sigma_rel {sigma:.3f}; this run: "
                     f"{best['fid_min']:.2f} at sigma_rel {best['sigma_rel']:.3f} ({both})")
    fd = [r for r in plain if record_metrics(r).get("fd_dinov2", {}).get("min") is not None]
    if fd and "fd_dinov2" in entry:
        value, sigma = entry["fd_dinov2"]
        best = min(fd, key=lambda r: record_metrics(r)["fd_dinov2"]["min"])
        lines.append(f"paper ({PAPER}, {preset}, unguided): FD-DINOv2 {value:.2f} at sigma_rel {sigma:.3f}; this run: "
                     f"{record_metrics(best)['fd_dinov2']['min']:.2f} at sigma_rel {best['sigma_rel']:.3f} ({both})")
    if guided and "fid_guided" in entry:
        value, sigma, w = entry["fid_guided"]
        best = min(guided, key=lambda r: r["fid_min"])
        lines.append(f"paper ({PAPER}, {preset}, guided by an unconditional XS): FID {value:.2f} at sigma_rel "
                     f"{sigma:.3f}, w {w:g}; this run: {best['fid_min']:.2f} at sigma_rel {best['sigma_rel']:.3f}, "
                     f"w {best['sampler']['guidance']:g}, guide {best.get('guide', 'none')} ({both})")
    return lines
