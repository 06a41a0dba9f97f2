"""Typed job configuration: the schema (`sections`: one dataclass per section, cross-field
checks) and its loading (`loading`: YAML, `--set section.key=value` overrides, coercion, unknown
keys named with the nearest valid one). This package imports nothing else of the project."""
from pipeline.config.hierarchy import ReconcileConfig
from pipeline.config.loading import from_dict, load, read_raw
from pipeline.config.sections import (
    CALENDAR_FEATURES,
    PACKED_DECODERS,
    PACKED_ENCODERS,
    STATISTICAL,
    Config,
    ConfigError,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    EvaluateConfig,
    ModelConfig,
    OutputConfig,
    PerGroupConfig,
    RayConfig,
    TrackingConfig,
    TrainConfig,
    WindowsConfig,
    receptive_field,
)
from pipeline.config.tune import Domain, TuneConfig

__all__ = ["CALENDAR_FEATURES", "PACKED_DECODERS", "PACKED_ENCODERS", "Config", "ConfigError",
           "DataConfig", "DecoderConfig", "EncoderConfig", "EvaluateConfig", "ModelConfig",
           "OutputConfig", "PerGroupConfig", "RayConfig", "ReconcileConfig", "STATISTICAL",
           "TrackingConfig", "TrainConfig", "TuneConfig", "Domain",
           "WindowsConfig", "from_dict", "load", "read_raw", "receptive_field"]
