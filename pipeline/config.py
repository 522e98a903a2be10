"""One typed configuration schema for params.yaml and presets (sweep files: pipeline/sweep/schema.py).

Every stage, sweep trial and launcher builds its settings through `load_config` / `resolve`, so a
wrong value fails here, at load time, before any GPU time is spent, with one line naming the field,
the value and the rule (for example `ema.targets[2]=0.31: sigma_rel must be in (0, 0.2887)`).
"""
from __future__ import annotations

import copy
import hashlib
import re
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from .devices import DEVICE_PATTERN
from .errors import PipelineError
from .backends import BACKENDS as _BACKENDS
from .options import NOISE_LAWS as _NOISE_LAWS, SOLVERS as _SOLVERS
from .data.sources import SOURCES as _SOURCES

SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)  # method.md 6: sigma_rel < sqrt(1/12) ~= 0.2887
PRESETS_FILE = Path(__file__).with_name("presets.yaml")


# A torch.compile switch: true, false, or "auto" (compile when the run's work passes the measured
# break-even, networks.COMPILE_BREAK_EVEN).
CompileSwitch = Union[bool, Literal["auto"]]


class ConfigError(PipelineError, ValueError):
    """A configuration value broke a rule; the message is one line per broken rule."""


# ----------------------------------------------------------------------------------------------
# Reusable value rules. Each raises ValueError with the rule only; the field path and value are
# added by `_format_errors`, so every message has the same `field=value: rule` shape.

def _sigma_rel(v: float) -> float:
    if not (0.0 < v < SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f})")
    return v


def _positive(v):
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def _non_negative(v):
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


def _power_of_two(v: int) -> int:
    if v < 4 or (v & (v - 1)) != 0:
        raise ValueError("must be a power of two >= 4")
    return v


SigmaRel = Annotated[float, AfterValidator(_sigma_rel)]
PosFloat = Annotated[float, AfterValidator(_positive)]
PosInt = Annotated[int, AfterValidator(_positive)]
NonNegFloat = Annotated[float, AfterValidator(_non_negative)]
NonNegInt = Annotated[int, AfterValidator(_non_negative)]
SEED_LIMIT = 1 << 63                   # torch's generators take seeds below 2^63 (signed 64-bit)


def _seed(v: int) -> int:
    if not 0 <= v < SEED_LIMIT:
        raise ValueError("a seed must be in [0, 2^63)")
    return v


Seed = Annotated[int, AfterValidator(_seed)]


def _device(v: str) -> str:
    if not re.match(DEVICE_PATTERN, v):
        raise ValueError("expected auto, cpu, cuda or cuda:N (GPU N of several)")
    return v


Device = Annotated[str, AfterValidator(_device)]     # resolved by devices.pick_device


def _not_nan(v: float) -> float:
    if math.isnan(v):
        raise ValueError("must be a number (not NaN)")
    return v


def _unit_interval(v: float) -> float:
    if not (0.0 <= v < 1.0):
        raise ValueError("must be in [0, 1)")
    return v


# Fields marked NOT_IN_KEY do not change what a training run computes (paths, devices, logging
# intervals, evaluation settings, bit-identical speed switches): Config.run_key() leaves them out,
# so changing one resumes the same run instead of archiving it.
NOT_IN_KEY = {"run_key": False}


def off_key(*default: Any, **kw) -> Any:
    """A field that is not part of the run key (see NOT_IN_KEY): off_key(value) or off_key(default_factory=f)."""
    return Field(*default, json_schema_extra=NOT_IN_KEY, **kw)


def _takes_numbers_only(annotation) -> bool:
    """True for int/float fields (bare, Annotated, Optional, Literal of numbers): pydantic would turn a
    YAML `true` into 1 there."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (int, float):
        return True
    if origin is Annotated:
        return _takes_numbers_only(args[0])
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_takes_numbers_only(a) for a in kinds)
    if origin is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    return False


def _element_type(annotation):
    """The element type of list[...] / tuple[...] (also inside Optional/Annotated), else None."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _element_type(args[0])
    if origin in (Union, types.UnionType):
        for a in args:
            if _element_type(a) is not None:
                return _element_type(a)
    if origin in (list, tuple) and args:
        return args[0]
    return None


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and infinities are refused at load time (a float field that may be
    # infinite says so itself), not found after ten steps of non-finite losses.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, v, info):
        """`true`/`false` are not numbers and numbers are not switches: `-S train.batch_size=true` and
        `-S train.compile=1` are refused, not read as 1 and true."""
        ann = cls.model_fields[info.field_name].annotation
        if (ann is bool or ann == Optional[bool]) and not isinstance(v, bool) and not (ann != bool and v is None):
            raise ValueError("expected true or false")
        if ann == CompileSwitch and not isinstance(v, bool) and v != "auto":
            raise ValueError("expected true or false (or auto)")
        if isinstance(v, bool) and _takes_numbers_only(ann):
            raise ValueError("expected a number, got a boolean (true/false)")
        elem = _element_type(ann)
        if isinstance(v, (list, tuple)) and elem is not None and _takes_numbers_only(elem) \
                and any(isinstance(x, bool) for x in v):
            raise ValueError("expected numbers, got a boolean (true/false)")
        return v


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
    reference_split: Optional[PosFloat] = None   # held out of training for the FID reference (fid.reference:
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


def _at_most(hi: int):
    def check(v: int) -> int:
        if v > hi:
            raise ValueError(f"must be <= {hi}")
        return v
    return AfterValidator(check)


def _balance(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("a blend weight t must be in [0, 1]")
    return v


Balance = Annotated[float, AfterValidator(_balance)]


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


def _in_unit(v: float, name: str) -> float:
    return _unit_interval(v)


NOISE_LAWS = tuple(_NOISE_LAWS)              # noise-level laws of training: the table in options.py


class LossConfig(_Section):
    noise: Literal[NOISE_LAWS] = "lognormal"   # lognormal: ln(sigma) ~ N(P_mean, P_std^2) (EDM2 eq. 14)
    P_mean: float = -0.8
    P_std: PosFloat = 1.6
    sigma_lo: PosFloat = 0.002             # loguniform: ln(sigma) ~ U(ln sigma_lo, ln sigma_hi)
    sigma_hi: PosFloat = 80.0
    sigma_data: PosFloat = 0.5

    @model_validator(mode="after")
    def _check(self):
        if self.sigma_lo >= self.sigma_hi:
            raise ValueError(f"loss.sigma_lo={self.sigma_lo} must be < loss.sigma_hi={self.sigma_hi}")
        return self


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
    compile: CompileSwitch = off_key("auto")   # torch.compile the network (auto: when it pays, networks.COMPILE_BREAK_EVEN); falls back (with a warning) on failure
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
    steps: Annotated[int, AfterValidator(lambda v: _min(v, 2))] = 32
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


def _min(v: int, lo: int) -> int:
    if v < lo:
        raise ValueError(f"must be >= {lo}")
    return v


class FIDConfig(_Section):
    feature_net: Literal["auto", "clean-fid", "fid-helper"] = "auto"
    num_images: Annotated[int, AfterValidator(lambda v: _min(v, 2))] = 50000
    reference: str = "fashion-mnist-test"  # fashion-mnist-test | held-out (data.reference_split) | an encoded
    #                                        dataset folder | an image folder or zip (encoded on demand, cached) |
    #                                        NVIDIA's statistics (.pkl: dataset-refs/img512.pkl; EDM's .npz)
    ref_num_images: Optional[Annotated[int, AfterValidator(lambda v: _min(v, 2))]] = None  # None: the whole set
    seed: Seed = 0                         # generated image i uses seed `seed + i`
    seed_sets: PosInt = 1                  # K disjoint sets of num_images (set k: seeds seed + k*num_images + i);
    #                                        EDM/EDM2 report the minimum over 3 sets of 50,000 (method.md 8)
    batch_size: PosInt = 64
    shard_images: PosInt = 1024            # features written in finished shards of this many images (resume, ranks)
    mode: Literal["clean", "legacy"] = "clean"   # legacy: EDM2's calculate_metrics (method.md 8)
    device: Device = "auto"                # sampling and features (reference, evaluate): auto | cpu | cuda | cuda:N
    metrics: list[str] = Field(default_factory=lambda: ["fid"])   # metrics.METRICS names; fid first (+ KID)
    dinov2_weights: Optional[str] = None   # local DINOv2 checkpoint for fd_dinov2 (never downloaded)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        if not v or v[0] != "fid" or len(set(v)) != len(v):
            raise ValueError("list fid first, then other metrics once each, e.g. [fid, precision_recall, fd_dinov2]")
        from .metrics import METRICS          # the metric table (its module imports torch: loaded on use)
        unknown = [m for m in v if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.seed + self.seed_sets * self.num_images > SEED_LIMIT:
            raise ValueError(f"fid.seed={self.seed}: the seeds seed .. seed + seed_sets x num_images must stay "
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
    steps: list[Annotated[int, AfterValidator(lambda v: _min(v, 2))]] = Field(default_factory=list)  # empty: sampler.steps
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


class LauncherConfig(_Section):
    executor: Literal[tuple(_BACKENDS)] = "local"     # backends.BACKENDS
    nproc_per_node: PosInt = 1
    nnodes: PosInt = 1
    partition: Optional[str] = None
    gpus_per_node: NonNegInt = 0
    cpus_per_task: PosInt = 2
    mem_gb: Optional[PosFloat] = None
    timeout_min: PosInt = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    array_parallelism: PosInt = 16
    max_requeues: NonNegInt = 10


class Config(_Section):
    """The whole resolved configuration; `params.yaml` is one instance of it."""
    preset: Optional[str] = off_key(None)              # its values are resolved into the sections below
    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    sampler: SamplerConfig = off_key(default_factory=SamplerConfig)
    fid: FIDConfig = off_key(default_factory=FIDConfig)
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
    """The model's values without the fields marked NOT_IN_KEY, recursively."""
    out = {}
    for name, f in type(model).model_fields.items():
        if (f.json_schema_extra or {}).get("run_key") is False:
            continue
        v = getattr(model, name)
        out[name] = key_values(v) if isinstance(v, BaseModel) else (v if not isinstance(v, tuple) else list(v))
    return out


# ----------------------------------------------------------------------------------------------
# Loading, overrides, presets.

def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; unknown keys are caught later by the schema (extra=forbid)."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.ref_lr=0.01` -> ('train.ref_lr', 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        reason = str(getattr(err, "problem", None) or err.__class__.__name__)
        raise ConfigError(f"override '{text}': the value is not valid YAML ({reason})") from None


def presets(internal: bool = False) -> dict[str, dict]:
    """The presets by name; entries whose name starts with '_' only serve as `base:` of others."""
    with open(PRESETS_FILE) as f:
        table = yaml.safe_load(f)
    return table if internal else {k: v for k, v in table.items() if not k.startswith("_")}


def preset(name: str) -> dict:
    """A preset's values, with `base:` presets merged underneath (deep merge)."""
    if name not in presets():
        raise ConfigError(f"preset={name!r}: unknown preset; choose one of {', '.join(sorted(presets()))}")
    return _merged(name, presets(internal=True))


def _merged(name: str, table: dict) -> dict:
    entry = dict(table[name])
    base = entry.pop("base", None)
    return _deep_merge(_merged(base, table), entry) if base else entry


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format_errors(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if path and isinstance(e.get("input"), dict) and re.match(r"^[\w.\[\]]+=", msg):
            lines.append(msg)                          # a section's own rule names its field already
        elif path:
            lines.append(f"{path}={e.get('input')!r}: {msg}" if e["type"] != "extra_forbidden" else f"{path}: {msg}")
        else:
            lines.append(msg)
    return "\n".join(lines)


def resolve(raw: dict | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Build a validated Config from a raw mapping, its preset and dotted overrides."""
    raw = copy.deepcopy(raw or {})
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for k, v in (overrides or {}).items():
        set_dotted(raw, k, v)
    if raw.get("preset") is not None and not isinstance(raw["preset"], str):
        raise ConfigError(f"preset={raw['preset']!r}: expected a preset name, one of {', '.join(sorted(presets()))}")
    if raw.get("preset"):
        raw = _deep_merge(preset(raw["preset"]), raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    raw = read_yaml(path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if not raw:
        raise ConfigError(f"{path}: empty (no sections); start from the project's params.yaml")
    return resolve(raw, overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's contents; a missing, unreadable, non-UTF-8 or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{path}: not valid YAML{where} ({reason})") from None


def yaml_dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def json_dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def diff(a: Config | dict, b: Config | dict, sections: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Fields whose values differ between two configs: {dotted key: (a, b)}."""
    fa = flatten(a.to_dict() if isinstance(a, Config) else a)
    fb = flatten(b.to_dict() if isinstance(b, Config) else b)
    keys = sorted(set(fa) | set(fb))
    if sections is not None:
        keys = [k for k in keys if k.split(".")[0] in sections]
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}
