"""One typed configuration schema for params.yaml and presets (sweep files: pipeline/sweep/schema.py).

Every stage, sweep trial and launcher builds its settings through `load_config` / `resolve`, so a
wrong value fails here, at load time, before any GPU time is spent, with one line naming the field,
the value and the rule (for example `ema.targets[2]=0.31: sigma_rel must be in (0, 0.2887)`).

- fields.py   field types and rules, the section base, run-key marks, dotted keys
- schema.py   the sections and `Config` (cross-section checks, the run key)
- loading.py  YAML, presets, overrides -> Config; writing it back

The names below are the package's interface (`from pipeline import config as C; C.load_config`).
"""
from .fields import (SEED_LIMIT, SIGMA_REL_MAX, ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, SigmaRel, _Section,
                     at_least, flatten, set_dotted)
from .loading import (PRESETS_FILE, diff, format_errors, json_dump, load_config, parse_override, preset, presets,
                      read_yaml, resolve, yaml_dump)
from .schema import (LOSS_LAWS, NOISE_LAWS, Config, DataConfig, EMAConfig, EvaluateConfig, GridConfig, GuideSpec,
                     LauncherConfig, LognormalLoss, LoguniformLoss, LossConfig, MetricsConfig, NetworkConfig,
                     SamplerConfig, TrackingConfig, TrainConfig, key_values, law_fields, loss_config)

__all__ = ["SEED_LIMIT", "SIGMA_REL_MAX", "ConfigError", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt", "SigmaRel",
           "_Section", "at_least", "flatten", "set_dotted", "PRESETS_FILE", "diff", "format_errors", "json_dump",
           "load_config", "parse_override", "preset", "presets", "read_yaml", "resolve", "yaml_dump", "NOISE_LAWS",
           "Config", "DataConfig", "EMAConfig", "EvaluateConfig", "MetricsConfig", "GridConfig", "GuideSpec",
           "LauncherConfig", "LossConfig", "NetworkConfig", "SamplerConfig", "TrackingConfig", "TrainConfig",
           "key_values", "LOSS_LAWS", "LognormalLoss", "LoguniformLoss", "law_fields", "loss_config"]
