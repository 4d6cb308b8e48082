"""The rmbgd configuration's shape: frozen pydantic dataclasses, one per YAML section.

pydantic dataclasses rather than BaseModel: they stay standard dataclasses, so code that
builds a config by keyword or derives one with `dataclasses.replace` keeps working, and a
hand-built value is still checked against each field's type and bounds. How a YAML document
becomes one (every problem at once, in our words) is parse.py's job; each field's YAML rule is
its kind (kinds.py, output_kinds.py).
"""

from dataclasses import field
from pathlib import Path, PurePath
from typing import Annotated, Any, Iterable, Mapping, Optional

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass

from rmbgd.config import kinds
from rmbgd.config import output_kinds as out
from rmbgd.config.kinds import DYNAMIC as DYNAMIC_INPUT_SIZE
from rmbgd.config.http import HttpConfig
from rmbgd.config.kinds import Kept, problem, yaml_rule
from rmbgd.config.output_kinds import FORMAT_SUFFIXES, MASK_ALSO, MASK_NONE, MASK_ONLY, MASK_SUFFIX, Padding
from rmbgd.config.problems import describe
from rmbgd.config.profiles import glob_problem, matches, output_for

__all__ = [
    "BACKEND_AUTO",
    "BACKEND_ONNXRUNTIME",
    "BACKEND_OPENVINO",
    "BACKEND_TORCH",
    "BatchConfig",
    "Config",
    "ConfigError",
    "ConfigFile",
    "DYNAMIC_INPUT_SIZE",
    "FORMAT_SUFFIXES",
    "HttpConfig",
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
    "Profile",
    "StateConfig",
    "WatchConfig",
]

# model.backend values.
BACKEND_AUTO, BACKEND_TORCH, BACKEND_ONNXRUNTIME, BACKEND_OPENVINO = "auto", "torch", "onnxruntime", "openvino"

# Unknown keys are an error (a typo must not silently fall back to a default).
STRICT = ConfigDict(extra="forbid")


def _doc(text: str) -> Any:
    return Field(description=text)


_DEVICE = kinds.choice(r"auto|cpu|cuda|cuda:\d+", "auto, cpu, cuda or cuda:N", ["auto", "cpu", "cuda", "cuda:0"])
_DTYPE = kinds.choice(
    "auto|float16|bfloat16|float32", "auto, float16, bfloat16 or float32", ["auto", "float16", "bfloat16", "float32"]
)
_BACKEND = kinds.choice(
    "auto|torch|onnxruntime|openvino", "auto, torch, onnxruntime or openvino", ["auto", "torch", "onnxruntime", "openvino"]
)
_LEVEL = kinds.choice("debug|info|warning|error", "debug, info, warning or error", ["debug", "info", "warning", "error"])


@dataclass(frozen=True, config=STRICT)
class PathsConfig:
    inbox: Annotated[kinds.folder(), _doc("Watched folder; relative paths are taken from the config file's folder.")]
    outbox: Annotated[kinds.folder(), _doc("Where results are written, mirroring the inbox's folders.")]
    errors: Annotated[kinds.folder(), _doc("Where failed inputs go, each with a .error.json sidecar.")]
    # None means originals are deleted after success; the key is still required so that
    # deletion is always a deliberate choice, never the result of a forgotten line.
    done: Annotated[kinds.folder(nullable=True), _doc("Where originals go after success; null deletes them.")]


@dataclass(frozen=True, config=STRICT)
class WatchConfig:
    settle_seconds: Annotated[kinds.number(above=0), _doc("A file must stay unchanged this long before it is taken.")] = 1.0
    # inotify queues can overflow and network filesystems may not deliver events at all.
    rescan_seconds: Annotated[kinds.number(above=0), _doc("Full rescan of the inbox this often.")] = 30.0
    # A writer that keeps a file open but stops writing must not block it forever.
    writer_timeout_seconds: Annotated[
        kinds.number(above=0), _doc("A file still held open by a writer is taken after this long.")
    ] = 300.0
    # inotify does not see writes made by other NFS/SMB clients: poll the inbox instead.
    polling: Annotated[kinds.boolean, _doc("Poll the inbox instead of inotify (NFS/SMB).")] = False

    @field_validator("writer_timeout_seconds")
    @classmethod
    def _writer_waits_for_settling(cls, writer: float, info: ValidationInfo) -> float:
        settle = info.data.get("settle_seconds")
        if settle is not None and writer < settle:
            raise problem(f"must be at least watch.settle_seconds ({settle:g}), got {writer:g}")
        return writer


@dataclass(frozen=True, config=STRICT)
class BatchConfig:
    size: Annotated[kinds.integer(1, 1024), _doc("Most images in one model call.")] = 8
    max_wait_ms: Annotated[kinds.integer(0, 60_000), _doc("Longest a partial batch waits for more images.")] = 200


@dataclass(frozen=True, config=STRICT)
class ModelConfig:
    name: Annotated[
        kinds.text(then=kinds.model_name), _doc("Hugging Face repo id, or a local model folder.")
    ] = "ZhengPeng7/BiRefNet"
    device: Annotated[_DEVICE, _doc("Where the model runs.")] = "auto"
    trust_remote_code: Annotated[kinds.boolean, _doc("Allow the model repo's own Python code.")] = True
    # An int (the side of the square every image is resized to) or "dynamic" (each image at
    # its own size, rounded to a multiple of 32 and capped by max_input_size).
    input_size: Annotated[kinds.input_size, _doc("Model input side (multiple of 32), or dynamic.")] = 1024
    revision: Annotated[kinds.text(nullable=True), _doc("Model revision (branch, tag or commit); null: latest.")] = None
    # auto = float16 on CUDA, float32 on CPU.
    dtype: Annotated[_DTYPE, _doc("auto: float16 on CUDA, float32 on CPU.")] = "auto"
    max_input_size: Annotated[kinds.max_input_size, _doc("Largest side with input_size: dynamic.")] = 2048
    compile: Annotated[kinds.boolean, _doc("torch.compile the model (slow first start).")] = False
    # What runs the model: torch, or an export of it run by onnxruntime or openvino (CPU
    # only); auto = the fastest one installed on CPU-only hosts, torch elsewhere. torch by
    # default: an export drops whatever the model's Python does besides tensor maths (the
    # test models' simulated accelerator delays) and costs minutes at the first start.
    backend: Annotated[_BACKEND, _doc("What runs the model; onnxruntime and openvino are CPU only.")] = "torch"


@dataclass(frozen=True, config=STRICT)
class InputConfig:
    # Far above any real image: a typo with extra digits must not become a budget no image reaches.
    max_pixels: Annotated[kinds.integer(1, 10**12), _doc("Larger images are refused before decoding.")] = 100_000_000


@dataclass(frozen=True, config=STRICT)
class OutputConfig:
    format: Annotated[out.output_format, _doc("png, webp or jpeg (jpg).")] = "png"
    # (r, g, b) to composite onto; None keeps the transparency.
    background: Annotated[
        out.background, _doc('Colour to put behind the subject, e.g. "#ffffff"; null: transparent.')
    ] = None
    jpeg_quality: Annotated[kinds.integer(1, 100), _doc("JPEG quality.")] = 90
    crop: Annotated[kinds.boolean, _doc("Crop to the subject.")] = False
    crop_padding: Annotated[
        out.crop_padding,
        _doc('Room around the subject when cropping: pixels (16) or a percentage ("5%").'),
        Field(json_schema_extra={"default": 0}),
    ] = field(default_factory=Padding)
    mask: Annotated[
        out.mask, _doc("true: also write the mask; only: just the mask."), Field(json_schema_extra={"default": False})
    ] = MASK_NONE
    # Longest side of the written result; None keeps the input's size.
    max_size: Annotated[
        kinds.integer(1, 1_000_000, nullable=True), _doc("Longest side of the result; null: as the input.")
    ] = None
    refine_foreground: Annotated[kinds.boolean, _doc("Remove the old background's colour from the edges.")] = False
    keep_exif: Annotated[kinds.boolean, _doc("Copy the input's EXIF data.")] = False
    png_compress_level: Annotated[kinds.integer(0, 9), _doc("zlib level for PNG.")] = 1
    clean_transparent: Annotated[kinds.boolean, _doc("Zero the colour of fully transparent pixels.")] = True

    @property
    def suffix(self) -> str:
        return MASK_SUFFIX if self.mask == MASK_ONLY else FORMAT_SUFFIXES[self.format]

    @model_validator(mode="wrap")
    @classmethod
    def _inherit_and_judge(cls, data: Any, handler: Any, info: ValidationInfo) -> "OutputConfig":
        """A profile's keys override `output`'s (the context's base); jpeg needs a background."""
        base = info.context.get("base") if info.context else None
        if base is not None and isinstance(data, Mapping):
            names = [f for f in cls.__dataclass_fields__ if f not in data]
            data = {**{name: Kept(getattr(base, name)) for name in names}, **data}
        result = handler(data)
        if info.context is None or not isinstance(data, Mapping):
            return result
        # A profile that changes none of the three inherits the combination, already judged.
        given = [k for k in ("format", "background", "mask") if k in data and not isinstance(data[k], Kept)]
        judged_here = base is None or base == OutputConfig() or given
        if judged_here and result.format == "jpeg" and result.background is None and result.mask != MASK_ONLY:
            raise problem(
                "jpeg has no transparency: set output.background (e.g. \"#ffffff\") or use png or webp", at="format"
            )
        return result


@dataclass(frozen=True, config=STRICT)
class PipelineConfig:
    # Upper bounds far above any real use: a typo with extra digits must not become a million threads or claims.
    workers: Annotated[kinds.integer(0, 1024), _doc("Decode/encode threads; 0: one per usable CPU.")] = 0
    max_in_flight: Annotated[kinds.integer(0, 100_000), _doc("Most files claimed at once; 0: automatic.")] = 0


@dataclass(frozen=True, config=STRICT)
class LoggingConfig:
    level: Annotated[_LEVEL, _doc("Least severe level logged.")] = "info"
    # A copy of the log as JSON lines, for hosts that do not keep the journal.
    file: Annotated[kinds.optional_path, _doc("Also append the JSON log lines to this file.")] = None
    # A `progress` event this often while there is work; 0 turns it off.
    progress_seconds: Annotated[kinds.number(at_least=0), _doc("A progress event this often; 0: none.")] = 10.0


@dataclass(frozen=True, config=STRICT)
class StateConfig:
    # None: <inbox>/.rmbgd/state, a place `rmbgd status` finds from the config alone.
    dir: Annotated[kinds.optional_path, _doc("Status and journal folder; null: <inbox>/.rmbgd/state.")] = None


@dataclass(frozen=True, config=STRICT)
class MetricsConfig:
    # None: no metrics endpoint, and prometheus-client is never imported. 0 lets the kernel
    # pick a free port (the daemon logs which); useful in tests.
    port: Annotated[kinds.integer(0, 65535, nullable=True), _doc("Prometheus endpoint port; null: none.")] = None
    # Loopback by default: an unauthenticated endpoint should not face the network unasked.
    address: Annotated[kinds.host, _doc("Address the metrics endpoint listens on.")] = "127.0.0.1"


def _glob(value: Any, context: dict[str, Any]) -> str:
    if value is None:
        raise problem("required")
    if not isinstance(value, str) or not value.strip():
        raise problem(f"expected a glob under the inbox such as 'white/**', got {describe(value)}")
    reason = glob_problem(value)
    if reason:
        raise problem(reason)
    return value


@dataclass(frozen=True, config=STRICT)
class Profile:
    match: Annotated[str, yaml_rule(_glob), _doc("Glob on the path under the inbox, e.g. 'white/**'.")]
    output: Annotated[OutputConfig, _doc("The output keys that differ from the top-level output section.")]

    def matches(self, rel: PurePath) -> bool:
        return matches(self.match, rel)


def _section(value: Any, context: dict[str, Any]) -> Any:
    # `watch:` with every line below commented out is an empty section, not an error.
    return {} if value is None else value


Section = yaml_rule(_section)


@dataclass(frozen=True, config=STRICT)
class ConfigFile:
    """What a config file may say: the sections, every one but paths optional."""

    paths: Annotated[PathsConfig, Section]
    # Defaults here mirror "a section may be omitted" and let code build a Config by hand.
    watch: Annotated[WatchConfig, Section] = field(default_factory=WatchConfig)
    batch: Annotated[BatchConfig, Section] = field(default_factory=BatchConfig)
    model: Annotated[ModelConfig, Section] = field(default_factory=ModelConfig)
    input: Annotated[InputConfig, Section] = field(default_factory=InputConfig)
    output: Annotated[OutputConfig, Section] = field(default_factory=OutputConfig)
    pipeline: Annotated[PipelineConfig, Section] = field(default_factory=PipelineConfig)
    logging: Annotated[LoggingConfig, Section] = field(default_factory=LoggingConfig)
    state: Annotated[StateConfig, Section] = field(default_factory=StateConfig)
    metrics: Annotated[MetricsConfig, Section] = field(default_factory=MetricsConfig)
    http: Annotated[HttpConfig, Section] = field(default_factory=HttpConfig)
    # First match wins; see profiles.py for the glob rules.
    profiles: Annotated[
        tuple[Profile, ...], _doc("Per-folder output settings; the first matching glob wins.")
    ] = ()


@dataclass(frozen=True, config=STRICT)
class Config(ConfigFile):
    """A parsed config: the file's settings and the file they came from."""

    source: Optional[Path] = None

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
