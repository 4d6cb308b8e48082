"""Settings: the YAML schema and loading, per-file output profiles, usable CPU counts.

The names below are the package's public API; import them from `rmbgd.config`, not from the
module that happens to hold them, so the modules can be rearranged without touching callers.
"""

from rmbgd.config.folders import check_folders, prepare_folders
from rmbgd.config.limits import effective_max_in_flight, effective_workers
from rmbgd.config.load import commented_out_colours, load_config
from rmbgd.config.parse import parse_config
from rmbgd.config.schema import (
    BACKEND_AUTO,
    BACKEND_ONNXRUNTIME,
    BACKEND_OPENVINO,
    BACKEND_TORCH,
    DYNAMIC_INPUT_SIZE,
    FORMAT_SUFFIXES,
    HttpConfig,
    MASK_ALSO,
    MASK_NONE,
    MASK_ONLY,
    MASK_SUFFIX,
    BatchConfig,
    Config,
    ConfigError,
    InputConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    OutputConfig,
    Padding,
    PathsConfig,
    PipelineConfig,
    StateConfig,
    WatchConfig,
)

__all__ = [
    "BACKEND_AUTO",
    "BACKEND_ONNXRUNTIME",
    "BACKEND_OPENVINO",
    "BACKEND_TORCH",
    "DYNAMIC_INPUT_SIZE",
    "FORMAT_SUFFIXES",
    "HttpConfig",
    "MASK_ALSO",
    "MASK_NONE",
    "MASK_ONLY",
    "MASK_SUFFIX",
    "BatchConfig",
    "Config",
    "ConfigError",
    "InputConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "OutputConfig",
    "Padding",
    "PathsConfig",
    "PipelineConfig",
    "StateConfig",
    "WatchConfig",
    "check_folders",
    "commented_out_colours",
    "effective_max_in_flight",
    "effective_workers",
    "load_config",
    "parse_config",
    "prepare_folders",
]
