"""The sections of params.yaml as typed models (method.md cites each field's equation): data,
network, loss, train, ema, sampler, metrics, evaluate, tracking, launcher; `Config` checks what
spans sections and gives the run key (every value that changes what a training computes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from ..backends import BACKENDS as _BACKENDS
from ..data.sources import SOURCES as _SOURCES
from ..options import METRIC_NAMES
from ..options import NOISE_LAWS as _NOISE_LAWS
from ..options import SOLVERS as _SOLVERS
from .fields import (SEED_LIMIT, Balance, CompileSwitch, Device, NonNegFloat, NonNegInt, PosFloat, PosInt, Seed,
                     SigmaRel, _at_most, _in_unit, at_least, _not_nan, _power_of_two, _Section, _unit_interval, flatten,
                     off_key)


class DataConfig(_Section):
    source: Literal[tuple(_SOURCES)] = "fashion-mnist"   # sources.SOURCES
    path: Optional[str] = None             # folder/zip path; fashion-mnist: the folder of its .gz files (filled when absent)
    resolution: Annotated[int, AfterValidator(_power_of_two)] = 32
    channels: Literal[1, 3, 4] = 1         # image channels after encoding (latents: VAE channels)
    resize: Literal["pad", "resize", "center-crop", "adm-center-crop"] = "pad"   # adm-center-crop: EDM2's ImageNet
    use_labels: bool = True
    encoder: Literal["pixel", "vae"] = "pixel"
    vae_path: Optional[str] = None         # local diffusers AutoencoderKL folder; never downloaded
    latent_convention: Literal["edm2", "data-stats"] = "edm2"   # VAE latents: EDM2's exactly, or per-dataset
    #                                                             statistics (pipeline/data/latents.py, method.md 7)
    max_images: Optional[PosInt] = None    # cap for quick runs; None = all
    reference_split: Optional[PosFloat] = None   # held out of training for the FID reference (metrics.reference:
    #                                              held-out): a fraction < 1 or a count of images
    split_seed: Seed = 0                   # which images are held out (a seeded permutation)
    dataset_dir: str = off_key("data/encoded")   # where the encode stage writes the artifact + manifest

    @model_validator(mode="after")
    def _check(self):
        if _SOURCES[self.source].needs_path and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source}")
        if self.encoder == "vae" and not self.vae_path:
            raise ValueError("data.vae_path is required when data.encoder=vae")
        r = self.reference_split
        if r is not None and r >= 1 and r != int(r):
            raise ValueError(f"data.reference_split={r}: a fraction below 1 or a whole number of images")
        return self


class NetworkConfig(_Section):
    model_channels: Annotated[PosInt, _at_most(1 << 16)] = 32     # C in method.md 4
    channel_mult: Annotated[list[PosInt], Field(max_length=16)] = Field(default_factory=lambda: [1, 2, 2])
    num_blocks: Annotated[PosInt, _at_most(64)] = 2
    attn_resolutions: list[PosInt] = Field(default_factory=lambda: [8])
    channels_per_head: PosInt = 32
    # Heads per attention block: "exact" requires channels_per_head to divide each attention width;
    # "floor" takes width // channels_per_head as EDM2's code does (imports of NVIDIA's networks).
    # The same heads wherever both apply, so it is not part of the run key.
    attention_heads: Literal["exact", "floor"] = off_key("exact")
    dropout: Annotated[float, AfterValidator(lambda v: _in_unit(v, "dropout"))] = 0.0
    label_balance: Balance = 0.5                         # MP-sum t for the label embedding
    concat_balance: Balance = 0.5                        # MP-concat t for U-Net skips
    res_balance: Balance = 0.3                           # MP-sum t for residual / attention
    clip_act: PosFloat = 256.0
    logvar_channels: Annotated[PosInt, _at_most(1 << 16)] = 128   # uncertainty head Fourier width
    label_dim: Optional[NonNegInt] = None                # None: the dataset's class count (0 if unlabelled)

    @model_validator(mode="after")
    def _check(self):
        if not self.channel_mult:
            raise ValueError("network.channel_mult must not be empty")
        return self

NOISE_LAWS = tuple(_NOISE_LAWS)              # noise-level laws of training: the table in options.py


# The loss section is a tagged union: `loss.noise` names the law (the tag) and the section holds that
# law's own fields and sigma_data, nothing else (method.md 2). Until 2026-12 one flat section held every
# law's fields; the run key still counts the other laws' fields at those old defaults (KEY_FILL), so
# runs, checkpoints and snapshots made before resume and match (tests/unit/test_noise_laws.py).
class _NoiseLaw(_Section):
    noise: str                             # the tag: each law below fixes it
    sigma_data: PosFloat = 0.5             # s in method.md 1: the data's standard deviation
    KEY_FILL: ClassVar[dict] = {}


class LognormalLoss(_NoiseLaw):
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM2 eq. 14)."""
    noise: Literal["lognormal"] = "lognormal"
    P_mean: float = -0.8
    P_std: PosFloat = 1.6
    KEY_FILL: ClassVar[dict] = {"sigma_lo": 0.002, "sigma_hi": 80.0}


class LoguniformLoss(_NoiseLaw):
    """ln(sigma) ~ U(ln sigma_lo, ln sigma_hi)."""
    noise: Literal["loguniform"] = "loguniform"
    sigma_lo: PosFloat = 0.002
    sigma_hi: PosFloat = 80.0
    KEY_FILL: ClassVar[dict] = {"P_mean": -0.8, "P_std": 1.6}

    @model_validator(mode="after")
    def _check(self):
        if self.sigma_lo >= self.sigma_hi:
            raise ValueError(f"loss.sigma_lo={self.sigma_lo} must be < loss.sigma_hi={self.sigma_hi}")
        return self


LOSS_LAWS: dict[str, type[_NoiseLaw]] = {"lognormal": LognormalLoss, "loguniform": LoguniformLoss}
DEFAULT_NOISE_LAW = "lognormal"


def noise_tag(v) -> str | None:
    """The law a loss section names: its `noise`, the default law when a mapping leaves it out."""
    return v.get("noise", DEFAULT_NOISE_LAW) if isinstance(v, dict) else getattr(v, "noise", None)


LossConfig = Annotated[Union[tuple(Annotated[cls, Tag(name)] for name, cls in LOSS_LAWS.items())],
                       Discriminator(noise_tag, custom_error_type="noise_law",
                                     custom_error_message=f"loss.noise: one of {', '.join(LOSS_LAWS)}")]


def loss_config(noise: str = DEFAULT_NOISE_LAW, **fields) -> LognormalLoss | LoguniformLoss:
    """The loss section of the law `noise` with `fields` (the rest at their defaults)."""
    return LOSS_LAWS[noise](**fields)


def law_fields(noise: str) -> list[str]:
    """The fields that belong to one law (without sigma_data and the tag, which every law has)."""
    return [f for f in LOSS_LAWS[noise].model_fields if f not in _NoiseLaw.model_fields]


class TrainConfig(_Section):
    """Optimizer, schedule and run length. Time is counted in images (method.md: nimg)."""
    ref_lr: PosFloat = 0.012               # method.md 3, eq. 11
    ref_batches: PosFloat = 35000          # iterations before the 1/sqrt(t) decay starts
    rampup_nimg: NonNegInt = 0             # linear warm-up length in images
    batch_size: PosInt = 2048              # global batch
    batch_gpu: Optional[PosInt] = None     # per-device batch; smaller than the share -> accumulation
    duration_nimg: PosInt = off_key(2**31)  # longer training continues the same run
    beta1: Annotated[float, AfterValidator(_unit_interval)] = 0.9
    beta2: Annotated[float, AfterValidator(_unit_interval)] = 0.99
    eps: PosFloat = 1e-8
    seed: Seed = 0
    label_dropout: Annotated[float, AfterValidator(_unit_interval)] = 0.0   # P(zero label): trains the unconditional guide
    checkpoint_nimg: PosInt = off_key(2**24)       # checkpoint interval in images
    status_nimg: PosInt = off_key(2**17)           # metric logging interval in images
    sample_nimg: Optional[PosInt] = off_key(None)  # sample-grid interval in images (None = at the end only)
    run_dir: str = off_key("runs/default")         # persistent run folder: checkpoints, snapshots, logs
    device: Device = off_key("auto")       # auto | cpu | cuda | cuda:N
    max_nonfinite_steps: PosInt = off_key(10)      # consecutive non-finite losses before the run stops
    # Speed switches (issue: benchmarks). Each keeps the numerics within a tested tolerance.
    # portable: each seed's noise drawn on the CPU in float64 (the same image on every device);
    # nvidia: as EDM2's generate_images.py (a generator per seed on the sampling device, float32, class
    # labels drawn from it): NVIDIA's images for NVIDIA's seeds, but they depend on the device type.
    seeding: Literal["portable", "nvidia"] = "portable"
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast of the network (GPU; also works on CPU)
    channels_last: bool = off_key(False)   # NHWC memory format for convolutions
    compile: CompileSwitch = off_key("auto")   # torch.compile the network (auto: when it pays, devices.COMPILE_BREAK_EVEN); falls back (with a warning) on failure
    fused_adam: bool = off_key(False)      # fused Adam kernel (foreach otherwise)
    # bit-identical to the plain path (tested), so not part of the run key:
    async_snapshots: bool = off_key(False)  # write EMA snapshots in a background thread (in order; drained before checkpoints)
    prefetch_batches: NonNegInt = off_key(0)  # batches assembled ahead in a background thread (pinned memory on a GPU)


class EMAConfig(_Section):
    """Power-function EMA (method.md 6): tracked profiles, snapshots, post-hoc targets."""
    stds: list[SigmaRel] = Field(default_factory=lambda: [0.05, 0.10])
    snapshot_nimg: PosInt = 2**23
    targets: list[SigmaRel] = off_key(default_factory=lambda: [0.05, 0.10, 0.15])
    target_nimg: Optional[PosInt] = off_key(None)   # reconstruction time; None = the last snapshot
    snapshot_dtype: Literal["float16", "bfloat16", "float32"] = off_key("float16")

    @model_validator(mode="after")
    def _check(self):
        if not self.stds:
            raise ValueError("ema.stds must list at least one tracked sigma_rel")
        if not self.targets:
            raise ValueError("ema.targets must list at least one sigma_rel")
        named = [f"{x:.3f}" for x in self.stds]      # snapshot names carry 3 decimals
        if len(set(named)) != len(named):
            raise ValueError(f"ema.stds={self.stds}: each tracked sigma_rel once (two would write the same "
                             f"snapshot file)")
        return self


class SamplerConfig(_Section):
    """EDM Algorithm 2 (method.md 5)."""
    steps: Annotated[int, AfterValidator(lambda v: at_least(v, 2))] = 32
    rho: PosFloat = 7.0
    sigma_min: PosFloat = 0.002
    sigma_max: PosFloat = 80.0
    churn: NonNegFloat = 0.0               # S_churn
    S_min: NonNegFloat = 0.0
    S_max: Annotated[float, Field(allow_inf_nan=True), AfterValidator(_not_nan)] = float("inf")
    S_noise: PosFloat = 1.0
    solver: Literal[tuple(_SOLVERS)] = "heun"   # options.SOLVERS
    guidance: NonNegFloat = 1.0            # w >= 0: 1 = unguided, 0 = the guide alone (method.md 5)
    # Fields marked off_key here do not change the samples (records.sampler_record leaves them out).
    batch_size: PosInt = off_key(64)
    compile: CompileSwitch = off_key("auto")   # torch.compile the network for sampling (CUDA graphs on a GPU; auto: when it pays); falls back on failure
    # portable: each seed's noise drawn on the CPU in float64 (the same image on every device);
    # nvidia: as EDM2's generate_images.py (a generator per seed on the sampling device, float32, class
    # labels drawn from it): NVIDIA's images for NVIDIA's seeds, but they depend on the device type.
    seeding: Literal["portable", "nvidia"] = "portable"
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast of the network's evaluations (the ODE stays float64/32)

    @model_validator(mode="after")
    def _check(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sampler.sigma_min={self.sigma_min} must be < sampler.sigma_max={self.sigma_max}")
        if self.S_max < self.S_min:
            raise ValueError(f"sampler.S_max={self.S_max} must be >= sampler.S_min={self.S_min} (churn between them)")
        return self

    @property
    def nfe(self) -> int:
        return _SOLVERS[self.solver].nfe(self.steps)


class MetricsConfig(_Section):
    """What evaluations measure and how (method.md 8): the generated images, the reference, the metrics."""
    feature_net: Literal["auto", "clean-fid", "fid-helper"] = "auto"
    num_images: Annotated[int, AfterValidator(lambda v: at_least(v, 2))] = 50000
    reference: str = "fashion-mnist-test"  # fashion-mnist-test | held-out (data.reference_split) | an encoded
    #                                        dataset folder | an image folder or zip (encoded on demand, cached) |
    #                                        NVIDIA's statistics (.pkl: dataset-refs/img512.pkl; EDM's .npz)
    ref_num_images: Optional[Annotated[int, AfterValidator(lambda v: at_least(v, 2))]] = None  # None: the whole set
    seed: Seed = 0                         # generated image i uses seed `seed + i`
    seed_sets: PosInt = 1                  # K disjoint sets of num_images (set k: seeds seed + k*num_images + i);
    #                                        EDM/EDM2 report the minimum over 3 sets of 50,000 (method.md 8)
    batch_size: PosInt = 64
    shard_images: PosInt = 1024            # features written in finished shards of this many images (resume, ranks)
    mode: Literal["clean", "legacy"] = "clean"   # legacy: EDM2's calculate_metrics (method.md 8)
    device: Device = "auto"                # sampling and features (reference, evaluate): auto | cpu | cuda | cuda:N
    names: list[str] = Field(default_factory=lambda: ["fid"])   # metrics.METRICS entries; fid first (+ KID)
    dinov2_weights: Optional[str] = None   # local DINOv2 checkpoint for fd_dinov2 (never downloaded)

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        if not v or v[0] != "fid" or len(set(v)) != len(v):
            raise ValueError("list fid first, then other metrics once each, e.g. [fid, precision_recall, fd_dinov2]")
        unknown = [m for m in v if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRIC_NAMES)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.seed + self.seed_sets * self.num_images > SEED_LIMIT:
            raise ValueError(f"metrics.seed={self.seed}: the seeds seed .. seed + seed_sets x num_images must stay "
                             f"below 2^63")
        return self


class GuideSpec(_Section):
    """An autoguidance guide: a reconstruction of the same run (an earlier training time `nimg` and/or
    another EMA length `sigma_rel`; unset = the main model's), or a model file."""
    nimg: Optional[PosInt] = None
    sigma_rel: Optional[SigmaRel] = None
    file: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if self.file is not None and (self.nimg is not None or self.sigma_rel is not None):
            raise ValueError("a guide is either {file: ...} or {nimg: ..., sigma_rel: ...}, not both")
        if self.file is None and self.nimg is None and self.sigma_rel is None:
            raise ValueError("a guide needs file, or nimg and/or sigma_rel (use `none` for no guide)")
        return self

    def target(self, sigma_rel: float) -> tuple[int | None, float]:
        """(training time, EMA length) of this guide for a main model of `sigma_rel` (None: the main
        model's time): the reconstruction the reconstruct stage makes for it."""
        return self.nimg, self.sigma_rel if self.sigma_rel is not None else sigma_rel

    def label(self) -> str:
        if self.file is not None:
            return f"file {Path(self.file).name}"
        return "ema" + (f" {self.sigma_rel:.3f}" if self.sigma_rel is not None else "") + \
            (f" at {self.nimg} img" if self.nimg is not None else "")


class GridConfig(_Section):
    """Post-hoc axes evaluated from one training (method.md 5, 6): every combination is one point."""
    sigma_rel: list[SigmaRel] = Field(default_factory=list)        # empty: ema.targets
    guidance: list[NonNegFloat] = Field(default_factory=lambda: [1.0])  # w >= 0; 1 = unguided, 0 = the guide alone
    guide: list[Any] = Field(default_factory=lambda: ["none"])    # none | unconditional | GuideSpec mapping
    steps: list[Annotated[int, AfterValidator(lambda v: at_least(v, 2))]] = Field(default_factory=list)  # empty: sampler.steps
    nimg: list[PosInt] = Field(default_factory=list)     # training lengths (snapshot times); empty: the final one

    @field_validator("guide")
    @classmethod
    def _guides(cls, v):
        out = []
        for g in v:
            if g in ("none", "unconditional", None):
                out.append(g or "none")
            elif isinstance(g, (dict, GuideSpec)):
                out.append(GuideSpec.model_validate(g))
            else:
                raise ValueError(f"guide {g!r}: expected none, unconditional, or a mapping "
                                 f"{{nimg: ..., sigma_rel: ...}} / {{file: ...}}")
        return out


class EvaluateConfig(_Section):
    grid: Optional[GridConfig] = None      # None: the ema.targets at the sampler's settings, unguided


class TrackingConfig(_Section):
    uri: Optional[str] = None              # None: $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db
    experiment: str = "edm2"
    enabled: bool = True


class SlurmSettings(_Section):
    """What only a SLURM job is given (launchers.SubmititLauncher passes them to sbatch)."""
    partition: Optional[str] = None
    gpus_per_node: NonNegInt = 0
    cpus_per_task: PosInt = 2
    mem_gb: Optional[PosFloat] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    array_parallelism: PosInt = 16             # array jobs running at once


class LauncherConfig(_Section):
    """Where jobs run (backends.BACKENDS, launchers.LAUNCHERS): the job's shape, then each backend's own
    settings in its section."""
    executor: Literal[tuple(_BACKENDS)] = "local"     # backends.BACKENDS
    nproc_per_node: PosInt = 1                 # processes (tasks) per node: one per GPU
    nnodes: PosInt = 1
    timeout_min: PosInt = 60                   # a job's time limit; training requeues itself before it
    max_requeues: NonNegInt = 10
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)


class Config(_Section):
    """The whole resolved configuration; `params.yaml` is one instance of it."""
    preset: Optional[str] = off_key(None)              # its values are resolved into the sections below
    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    loss: LossConfig = Field(default_factory=LognormalLoss)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    sampler: SamplerConfig = off_key(default_factory=SamplerConfig)
    metrics: MetricsConfig = off_key(default_factory=MetricsConfig)
    evaluate: EvaluateConfig = off_key(default_factory=EvaluateConfig)
    tracking: TrackingConfig = off_key(default_factory=TrackingConfig)
    launcher: LauncherConfig = off_key(default_factory=LauncherConfig)

    @model_validator(mode="after")
    def _check(self):
        res = self.data.resolution
        levels = len(self.network.channel_mult)
        if res >> (levels - 1) < 2:
            raise ValueError(f"network.channel_mult has {levels} levels, too many for "
                             f"data.resolution={res} (coarsest level would be below 2x2)")
        per_level = {res >> i for i in range(levels)}
        for i, r in enumerate(self.network.attn_resolutions):
            if r not in per_level:
                raise ValueError(f"network.attn_resolutions[{i}]={r}: must be one of the U-Net "
                                 f"resolutions {sorted(per_level, reverse=True)}")
        for i, mult in enumerate(self.network.channel_mult):
            width, cph = self.network.model_channels * mult, self.network.channels_per_head
            if not any((res >> i) == r for r in self.network.attn_resolutions):
                continue
            if self.network.attention_heads == "exact" and width % cph:
                raise ValueError(f"network.channels_per_head={cph}: must divide the width {width} of attention level "
                                 f"{i} (or set network.attention_heads=floor, EDM2's width // channels_per_head)")
            heads = width // cph
            if heads and width % heads:   # the attention's reshape needs whole heads
                raise ValueError(f"network.channels_per_head={cph}: {heads} heads cannot split the width {width} of "
                                 f"attention level {i} evenly")
        b = self.train.batch_size
        for name, value in (("ema.snapshot_nimg", self.ema.snapshot_nimg), ("train.checkpoint_nimg",
                            self.train.checkpoint_nimg), ("train.duration_nimg", self.train.duration_nimg)):
            if value % b:   # snapshot and checkpoint times must fall on step boundaries
                raise ValueError(f"{name}={value}: must be a multiple of train.batch_size={b}")
        grid = self.evaluate.grid
        for i, n in enumerate(grid.nimg if grid is not None else []):
            if n % self.ema.snapshot_nimg or n > self.train.duration_nimg:
                raise ValueError(f"evaluate.grid.nimg[{i}]={n}: a training length is a snapshot time: a multiple of "
                                 f"ema.snapshot_nimg={self.ema.snapshot_nimg} up to train.duration_nimg="
                                 f"{self.train.duration_nimg}")
        if self.ema.target_nimg is not None and self.ema.target_nimg % self.ema.snapshot_nimg:
            raise ValueError(f"ema.target_nimg={self.ema.target_nimg}: must be a multiple of ema.snapshot_nimg="
                             f"{self.ema.snapshot_nimg} (a snapshot time)")
        if self.train.batch_gpu is not None and self.train.batch_size % self.train.batch_gpu:
            raise ValueError(f"train.batch_gpu={self.train.batch_gpu}: must divide train.batch_size="
                             f"{self.train.batch_size}")
        return self

    # --- derived values --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (MLflow params, DVC-style overrides)."""
        return flatten(self.to_dict())

    def key_flat(self) -> dict[str, Any]:
        """Dotted keys -> values of the run key's fields (what run_key hashes, comparable field by field)."""
        return flatten(key_values(self))

    def run_key(self) -> str:
        """Identity of a training run: every value that changes what the run computes.

        Checkpoints and snapshots carry it; resuming or reconstructing across different keys is
        refused. Fields marked NOT_IN_KEY (paths, devices, logging intervals, evaluation settings,
        bit-identical speed switches) are left out.
        """
        return hashlib.sha256(json.dumps(key_values(self), sort_keys=True).encode()).hexdigest()[:16]

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def key_values(model: BaseModel) -> dict:
    """The model's values without the fields marked NOT_IN_KEY, recursively (a noise law adds its
    KEY_FILL: the run key as it was before the loss section became a tagged union)."""
    out = dict(getattr(model, "KEY_FILL", {}))
    for name, f in type(model).model_fields.items():
        if (f.json_schema_extra or {}).get("run_key") is False:
            continue
        v = getattr(model, name)
        out[name] = key_values(v) if isinstance(v, BaseModel) else (v if not isinstance(v, tuple) else list(v))
    return out
