"""The rmbgd configuration's shape: frozen, typed dataclasses and the error that lists problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable

from rmbgd.config.profiles import Profile, output_for

__all__ = [
    "BACKEND_AUTO",
    "BACKEND_ONNXRUNTIME",
    "BACKEND_OPENVINO",
    "BACKEND_TORCH",
    "BatchConfig",
    "Config",
    "ConfigError",
    "DYNAMIC_INPUT_SIZE",
    "FORMAT_SUFFIXES",
    "InputConfig",
    "LoggingConfig",
    "MASK_ALSO",
    "MASK_NONE",
    "MASK_ONLY",
    "MASK_SUFFIX",
    "MetricsConfig",
    "ModelConfig",
    "OutputConfig",
    "Padding",
    "PathsConfig",
    "PipelineConfig",
    "StateConfig",
    "WatchConfig",
]

@dataclass(frozen=True)
class PathsConfig:
    inbox: Path
    outbox: Path
    errors: Path
    # None means originals are deleted after success; the key is still required so that
    # deletion is always a deliberate choice, never the result of a forgotten line.
    done: Path | None


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = 1.0
    # inotify queues can overflow and network filesystems may not deliver events at all.
    rescan_seconds: float = 30.0
    # A writer that keeps a file open but stops writing must not block it forever.
    writer_timeout_seconds: float = 300.0
    # inotify does not see writes made by other NFS/SMB clients: poll the inbox instead.
    polling: bool = False


@dataclass(frozen=True)
class BatchConfig:
    size: int = 8
    max_wait_ms: int = 200


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ZhengPeng7/BiRefNet"
    device: str = "auto"
    trust_remote_code: bool = True
    # An int (the side of the square every image is resized to) or "dynamic" (each image at
    # its own size, rounded to a multiple of 32 and capped by max_input_size).
    input_size: int | str = 1024
    revision: str | None = None
    # auto = float16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    max_input_size: int = 2048
    compile: bool = False
    # What runs the model: torch, or an export of it run by onnxruntime or openvino (CPU
    # only); auto = the fastest one installed on CPU-only hosts, torch elsewhere. torch by
    # default: an export drops whatever the model's Python does besides tensor maths (the
    # test models' simulated accelerator delays) and costs minutes at the first start.
    backend: str = "torch"


@dataclass(frozen=True)
class InputConfig:
    max_pixels: int = 100_000_000


# output.format values, and the file suffix each writes.
FORMAT_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
MASK_SUFFIX = ".mask.png"
# output.mask values: no mask file, a mask file next to the result, or only the mask file.
MASK_NONE, MASK_ALSO, MASK_ONLY = "none", "also", "only"


@dataclass(frozen=True)
class Padding:
    """Room kept around the subject when cropping: `pixels` on every side plus `fraction` of
    the subject box's own width (left and right) and height (top and bottom)."""

    pixels: int = 0
    fraction: float = 0.0


@dataclass(frozen=True)
class OutputConfig:
    format: str = "png"
    # (r, g, b) to composite onto; None keeps the transparency.
    background: tuple[int, int, int] | None = None
    jpeg_quality: int = 90
    crop: bool = False
    crop_padding: Padding = field(default_factory=Padding)
    mask: str = MASK_NONE
    # Longest side of the written result; None keeps the input's size.
    max_size: int | None = None
    refine_foreground: bool = False
    keep_exif: bool = False
    png_compress_level: int = 1
    clean_transparent: bool = True

    @property
    def suffix(self) -> str:
        return MASK_SUFFIX if self.mask == MASK_ONLY else FORMAT_SUFFIXES[self.format]


@dataclass(frozen=True)
class PipelineConfig:
    workers: int = 0
    max_in_flight: int = 0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    # A copy of the log as JSON lines, for hosts that do not keep the journal.
    file: Path | None = None
    # A `progress` event this often while there is work; 0 turns it off.
    progress_seconds: float = 10.0


@dataclass(frozen=True)
class StateConfig:
    # None: <inbox>/.rmbgd/state, a place `rmbgd status` finds from the config alone.
    dir: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    # None: no metrics endpoint, and prometheus-client is never imported.
    port: int | None = None
    # Loopback by default: an unauthenticated endpoint should not face the network unasked.
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    # Defaults here mirror "a section may be omitted" and let code build a Config by hand.
    watch: WatchConfig = field(default_factory=WatchConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # First match wins; see profiles.py for the glob rules.
    profiles: tuple[Profile, ...] = ()
    source: Path | None = None

    def output_for(self, rel: PurePath) -> OutputConfig:
        """The output settings for the input at `rel` under the inbox."""
        return output_for(self.profiles, self.output, rel)


class ConfigError(Exception):
    """The config or its folders are unusable; `problems` lists every reason, one line each."""

    def __init__(self, problems: Iterable[str] | str) -> None:
        listed = [problems] if isinstance(problems, str) else list(problems)
        self.problems: list[str] = listed or ["invalid configuration"]
        super().__init__(self.problems[0])

    def __str__(self) -> str:
        return self.problems[0]

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduction would rebuild the error from args, keeping only the first problem.
        return (type(self), (self.problems,))


DYNAMIC_INPUT_SIZE = "dynamic"
# model.backend values.
BACKEND_AUTO, BACKEND_TORCH, BACKEND_ONNXRUNTIME, BACKEND_OPENVINO = (
    "auto",
    "torch",
    "onnxruntime",
    "openvino",
)
