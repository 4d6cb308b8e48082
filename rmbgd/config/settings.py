"""The rmbgd configuration: YAML parsed once into frozen, typed dataclasses.

Validation collects every problem in one pass so that `rmbgd check` can tell the user
everything that is wrong at once, each problem as one line `dotted.key: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping

import yaml

from rmbgd.config.cpus import available_cpus
from rmbgd.config.profiles import GlobError, Profile, compile_glob, output_for

__all__ = [
    "BatchConfig",
    "Config",
    "ConfigError",
    "InputConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "OutputConfig",
    "PathsConfig",
    "PipelineConfig",
    "StateConfig",
    "WatchConfig",
    "check_folders",
    "effective_max_in_flight",
    "effective_workers",
    "load_config",
    "parse_config",
    "prepare_folders",
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


# --------------------------------------------------------------------------- helpers

_SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "watch": WatchConfig,
    "batch": BatchConfig,
    "model": ModelConfig,
    "input": InputConfig,
    "output": OutputConfig,
    "pipeline": PipelineConfig,
    "logging": LoggingConfig,
    "state": StateConfig,
    "metrics": MetricsConfig,
}
_FOLDER_KEYS = ("inbox", "outbox", "errors", "done")
_DONE_HINT = "set a folder, or null to delete originals after success"
_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+")
_DTYPE_RE = re.compile(r"auto|float16|bfloat16|float32")
DYNAMIC_INPUT_SIZE = "dynamic"
# model.backend values.
BACKEND_AUTO, BACKEND_TORCH, BACKEND_ONNXRUNTIME, BACKEND_OPENVINO = (
    "auto",
    "torch",
    "onnxruntime",
    "openvino",
)
_BACKEND_RE = re.compile(r"auto|torch|onnxruntime|openvino")
_LOG_LEVELS = ("debug", "info", "warning", "error")
# A config is a few hundred bytes; the cap keeps `--config /dev/zero` from eating memory.
_MAX_CONFIG_BYTES = 1024 * 1024
# Upper bounds far above any real use: a typo with extra digits must not become a million
# threads, claims or a pixel budget no image reaches.
_MAX_WORKERS = 1024
_MAX_IN_FLIGHT = 100_000
_MAX_PIXELS_LIMIT = 10**12
# Marks a value that failed validation; the problem is already recorded.
_BAD: Any = object()


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(value: object) -> str:
    """How a YAML value reads back to the user in a `got ...` clause."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    if _is_int(value) and value.bit_length() > 200:
        # YAML's base-60 ints (`1:2:3:...`) can exceed what str() of an int may print.
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _is_int(value: object) -> bool:
    # bool is an int subclass, and YAML 1.1 turns `yes`/`on` into booleans.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _finite(value: int | float) -> bool:
    """Whether `value` is a float that is not NaN or infinite (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")


# A key that can stand in a `dotted.key: problem` line as it is; others are quoted instead.
_PLAIN_KEY_RE = re.compile(r"[\w-]{1,60}")


def _check_unknown(
    data: Mapping[Any, Any], allowed: Iterable[str], prefix: str, problems: _Problems, label: str = "config"
) -> None:
    allowed = list(allowed)
    for key in data:
        if isinstance(key, str) and key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1) if isinstance(key, str) else []
        name = key if isinstance(key, str) else _describe(key) if _is_int(key) else ""
        if _PLAIN_KEY_RE.fullmatch(name):
            dotted = f"{prefix}.{name}" if prefix else name
            message = "unknown key"
        else:
            # Spaces, colons, newlines or a float, null or bool key would garble the key part.
            dotted = prefix or label
            message = f"unknown key {_describe(key)}" + ("" if prefix else " at the top level")
        # Only ten sections exist, so the full list is always worth showing at the top.
        if not prefix or not close:
            message += f" (expected one of: {', '.join(allowed)})"
        if close:
            message += f"; did you mean '{close[0]}'?"
        problems.add(dotted, message)


class _Section:
    """Typed readers over one mapping; each records its own problem and returns _BAD."""

    def __init__(self, name: str, data: Mapping[Any, Any], problems: _Problems) -> None:
        self.name = name
        self.data = data
        self.problems = problems

    def _key(self, name: str) -> str:
        return f"{self.name}.{name}"

    def integer(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        if name not in self.data:
            return default
        value = self.data[name]
        if not _is_int(value):
            self.problems.add(self._key(name), f"expected an integer, got {_describe(value)}")
            return _BAD
        return self._in_range(name, value, lo, hi)

    def number(self, name: str, default: float, above: float | None = None, at_least: float | None = None) -> float:
        """A float strictly greater than `above` (or at least `at_least`); ints are widened."""
        if name not in self.data:
            return default
        value = self.data[name]
        if not _is_number(value):
            self.problems.add(self._key(name), f"expected a number, got {_describe(value)}")
            return _BAD
        if not _finite(value):
            self.problems.add(self._key(name), f"must be a finite number, got {_describe(value)}")
            return _BAD
        if above is not None and value <= above:
            self.problems.add(
                self._key(name), f"must be greater than {above:g}, got {_describe(value)}"
            )
            return _BAD
        if at_least is not None and value < at_least:
            self.problems.add(self._key(name), f"must be at least {at_least:g}, got {_describe(value)}")
            return _BAD
        return float(value)

    def _in_range(self, name: str, value: int, lo: int, hi: int | None) -> int:
        if value < lo:
            self.problems.add(self._key(name), f"must be at least {lo}, got {_describe(value)}")
            return _BAD
        if hi is not None and value > hi:
            self.problems.add(self._key(name), f"must be at most {hi}, got {_describe(value)}")
            return _BAD
        return value

    def boolean(self, name: str, default: bool) -> bool:
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, bool):
            self.problems.add(self._key(name), f"expected true or false, got {_describe(value)}")
            return _BAD
        return value

    def string(self, name: str, default: str | None, nullable: bool = False) -> str | None:
        if name not in self.data:
            return default
        value = self.data[name]
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            what = "a string or null" if nullable else "a string"
            self.problems.add(self._key(name), f"expected {what}, got {_describe(value)}")
            return _BAD
        if not value.strip():
            self.problems.add(self._key(name), "must not be empty")
            return _BAD
        reason = _text_problem(value)
        if reason:
            self.problems.add(self._key(name), reason)
            return _BAD
        return value

    def choice(self, name: str, default: str, pattern: re.Pattern[str], expected: str) -> str:
        if name not in self.data:
            return default
        value = self.data[name]
        normalized = value.strip().lower() if isinstance(value, str) else None
        if normalized is None or not pattern.fullmatch(normalized):
            self.problems.add(self._key(name), f"expected {expected}, got {_describe(value)}")
            return _BAD
        return normalized


def _text_problem(value: str) -> str | None:
    """Why `value` cannot be a name or a path, or None."""
    if "\0" in value:
        return "must not contain a NUL character"
    try:
        # A `"\ud800"` escape in YAML gives a lone surrogate, which no file name can hold.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"must be valid Unicode text, got {_describe(value)}"
    return None


def _absolute(raw: str, base_dir: Path) -> Path:
    # abspath, not resolve: the folders the user named are kept, symlinks and all.
    return Path(os.path.abspath(os.path.join(base_dir, os.path.expanduser(raw))))


def _model_name(raw: str, base_dir: Path) -> str:
    expanded = os.path.expanduser(raw)
    looks_like_path = raw.startswith(("/", ".", "~")) or (
        os.sep in raw and os.path.exists(os.path.join(base_dir, expanded))
    )
    if not looks_like_path:
        return raw
    return os.path.abspath(os.path.join(base_dir, expanded))


# --------------------------------------------------------------------------- parsing


def _read_section(
    top: Mapping[Any, Any], name: str, problems: _Problems
) -> Mapping[Any, Any] | None:
    """The section's mapping, or None when it is not a mapping (already reported)."""
    raw = top.get(name)
    # `watch:` with every line below commented out is an empty section, not an error.
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.add(name, f"expected a mapping, got {_describe(raw)}")
        return None
    allowed = [f.name for f in dataclasses.fields(_SECTIONS[name])]
    _check_unknown(raw, allowed, name, problems)
    return raw


def _parse_paths(top: Mapping[Any, Any], base_dir: Path, problems: _Problems) -> PathsConfig:
    if "paths" not in top:
        # One line says it all; listing each of its four keys as required would be noise.
        problems.add("paths", "required")
        data: Mapping[Any, Any] | None = None
    else:
        data = _read_section(top, "paths", problems)
    values: dict[str, Path | None] = {}
    for key in _FOLDER_KEYS:
        values[key] = _BAD
        if data is None:
            continue
        dotted = f"paths.{key}"
        if key not in data:
            hint = f" ({_DONE_HINT})" if key == "done" else ""
            problems.add(dotted, "required" + hint)
            continue
        raw = data[key]
        if raw is None and key == "done":
            values[key] = None
            continue
        if not isinstance(raw, str):
            what = f"a folder path or null ({_DONE_HINT})" if key == "done" else "a folder path"
            problems.add(dotted, f"expected {what}, got {_describe(raw)}")
            continue
        if not raw.strip():
            problems.add(dotted, "must not be empty")
            continue
        reason = _text_problem(raw)
        if reason:
            problems.add(dotted, reason)
            continue
        values[key] = _absolute(raw, base_dir)
    return PathsConfig(**values)


def _parse_watch(s: _Section) -> WatchConfig:
    settle = s.number("settle_seconds", _default(WatchConfig, "settle_seconds"), above=0)
    rescan = s.number("rescan_seconds", _default(WatchConfig, "rescan_seconds"), above=0)
    writer = s.number(
        "writer_timeout_seconds", _default(WatchConfig, "writer_timeout_seconds"), above=0
    )
    if settle is not _BAD and writer is not _BAD and writer < settle:
        s.problems.add(
            "watch.writer_timeout_seconds",
            f"must be at least watch.settle_seconds ({settle:g}), got {writer:g}",
        )
        writer = _BAD
    polling = s.boolean("polling", _default(WatchConfig, "polling"))
    return WatchConfig(
        settle_seconds=settle, rescan_seconds=rescan, writer_timeout_seconds=writer, polling=polling
    )


def _parse_batch(s: _Section) -> BatchConfig:
    return BatchConfig(
        size=s.integer("size", _default(BatchConfig, "size"), 1, 1024),
        max_wait_ms=s.integer("max_wait_ms", _default(BatchConfig, "max_wait_ms"), 0, 60_000),
    )


def _parse_model(s: _Section, base_dir: Path) -> ModelConfig:
    name = s.string("name", _default(ModelConfig, "name"))
    if name is not _BAD and "name" in s.data:
        name = _model_name(name, base_dir)
    raw_size = s.data.get("input_size")
    if isinstance(raw_size, str) and raw_size.strip().lower() == DYNAMIC_INPUT_SIZE:
        input_size: int | str = DYNAMIC_INPUT_SIZE
    elif isinstance(raw_size, str):
        s.problems.add(
            "model.input_size", f"expected an integer or {DYNAMIC_INPUT_SIZE}, got {_describe(raw_size)}"
        )
        input_size = _BAD
    else:
        input_size = _multiple_of_32(s, "input_size")
    max_input_size = _multiple_of_32(s, "max_input_size")
    return ModelConfig(
        name=name,
        device=s.choice(
            "device", _default(ModelConfig, "device"), _DEVICE_RE, "auto, cpu, cuda or cuda:N"
        ),
        trust_remote_code=s.boolean(
            "trust_remote_code", _default(ModelConfig, "trust_remote_code")
        ),
        input_size=input_size,
        revision=s.string("revision", _default(ModelConfig, "revision"), nullable=True),
        dtype=s.choice(
            "dtype",
            _default(ModelConfig, "dtype"),
            _DTYPE_RE,
            "auto, float16, bfloat16 or float32",
        ),
        max_input_size=max_input_size,
        compile=s.boolean("compile", _default(ModelConfig, "compile")),
        backend=s.choice(
            "backend",
            _default(ModelConfig, "backend"),
            _BACKEND_RE,
            "auto, torch, onnxruntime or openvino",
        ),
    )


def _multiple_of_32(s: _Section, name: str) -> int:
    # BiRefNet downsamples by 32: other sides would be padded or cropped inside the model.
    value = s.integer(name, _default(ModelConfig, name), 64, 4096)
    if value is not _BAD and value % 32:
        s.problems.add(f"model.{name}", f"must be a multiple of 32, got {value}")
        return _BAD
    return value


def _optional_path(s: _Section, name: str, base_dir: Path) -> Path | None:
    raw = s.string(name, None, nullable=True)
    if raw is None or raw is _BAD:
        return raw
    return _absolute(raw, base_dir)


_FORMAT_ALIASES = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
_MASK_VALUES = {False: MASK_NONE, True: MASK_ALSO, "only": MASK_ONLY}
_COLOUR_RE = re.compile(r"#([0-9a-f]{6}|[0-9a-f]{3})")
_PADDING_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def _parse_output(s: _Section, base: OutputConfig) -> OutputConfig:
    """The `output` section, or a profile's overrides of it: keys not given keep `base`'s value."""

    def given(name: str, read: Any) -> Any:
        return read(s) if name in s.data else getattr(base, name)

    fmt = given("format", _output_format)
    background = given("background", _background)
    mask = given("mask", _mask_mode)
    max_size = getattr(base, "max_size")
    if s.data.get("max_size") is not None:
        max_size = s.integer("max_size", 0, 1, 1_000_000)
    elif "max_size" in s.data:
        max_size = None
    out = OutputConfig(
        format=fmt,
        background=background,
        jpeg_quality=s.integer("jpeg_quality", base.jpeg_quality, 1, 100),
        crop=s.boolean("crop", base.crop),
        crop_padding=given("crop_padding", _padding),
        mask=mask,
        max_size=max_size,
        refine_foreground=s.boolean("refine_foreground", base.refine_foreground),
        keep_exif=s.boolean("keep_exif", base.keep_exif),
        png_compress_level=s.integer("png_compress_level", base.png_compress_level, 0, 9),
        clean_transparent=s.boolean("clean_transparent", base.clean_transparent),
    )
    # A profile that changes none of the three inherits the combination, already judged.
    judged_here = base == OutputConfig() or any(k in s.data for k in ("format", "background", "mask"))
    if judged_here and out.format == "jpeg" and out.background is None and out.mask != MASK_ONLY:
        s.problems.add(
            f"{s.name}.format",
            "jpeg has no transparency: set output.background (e.g. \"#ffffff\") or use png or webp",
        )
    return out


def _output_format(s: _Section) -> str:
    value = s.data.get("format")
    fmt = _FORMAT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if fmt is None:
        s.problems.add(s._key("format"), f"expected png, webp or jpeg, got {_describe(value)}")
        return _BAD
    return fmt


def _background(s: _Section) -> tuple[int, int, int] | None:
    value = s.data.get("background")
    if value is None:
        return None
    match = _COLOUR_RE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        s.problems.add(
            s._key("background"),
            f'expected null or a colour like "#ffffff" (quoted: # starts a YAML comment), got {_describe(value)}',
        )
        return _BAD
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def _mask_mode(s: _Section) -> str:
    value = s.data.get("mask")
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, (bool, str)) and key in _MASK_VALUES:
        return _MASK_VALUES[key]
    s.problems.add(s._key("mask"), f"expected false, true or only, got {_describe(value)}")
    return _BAD


def _padding(s: _Section) -> Padding:
    value = s.data.get("crop_padding")
    if _is_int(value) and 0 <= value <= 100_000:
        return Padding(pixels=value)
    match = _PADDING_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None and float(match.group(1)) <= 1000:
        return Padding(fraction=float(match.group(1)) / 100.0)
    s.problems.add(
        s._key("crop_padding"),
        f'expected pixels (e.g. 16) or a percentage of the subject\'s size (e.g. "5%"), got {_describe(value)}',
    )
    return _BAD


def _parse_profiles(raw: object, base: OutputConfig, problems: _Problems) -> tuple[Profile, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add("profiles", f"expected a list of {{match, output}} mappings, got {_describe(raw)}")
        return ()
    profiles = []
    for index, item in enumerate(raw):
        key = f"profiles[{index}]"
        if not isinstance(item, Mapping):
            problems.add(key, f"expected a mapping with match and output, got {_describe(item)}")
            continue
        _check_unknown(item, ["match", "output"], key, problems)
        glob = item.get("match")
        reason = "required" if glob is None else None
        if reason is None and (not isinstance(glob, str) or not glob.strip()):
            reason = f"expected a glob under the inbox such as 'white/**', got {_describe(glob)}"
        pattern = None
        if reason is None:
            try:
                pattern = compile_glob(glob)
            except GlobError as err:
                reason = str(err)
        if reason:
            problems.add(f"{key}.match", reason)
        overrides = item.get("output")
        if not isinstance(overrides, Mapping):
            problems.add(f"{key}.output", f"expected a mapping of output settings, got {_describe(overrides)}")
            continue
        allowed = [f.name for f in dataclasses.fields(OutputConfig)]
        _check_unknown(overrides, allowed, f"{key}.output", problems)
        output = _parse_output(_Section(f"{key}.output", overrides, problems), base)
        if pattern is not None:
            profiles.append(Profile(match=glob, output=output, pattern=pattern))
    return tuple(profiles)


def _parse_metrics(s: _Section) -> MetricsConfig:
    port = None
    if s.data.get("port") is not None:
        # 0 lets the kernel pick a free port (the daemon logs which); useful in tests.
        port = s.integer("port", 0, 0, 65535)
    address = s.string("address", _default(MetricsConfig, "address"))
    if address is not _BAD:
        address = address.strip()
        # The socket layer raises a UnicodeError, not an OSError, for a label over 63 characters.
        if not _is_host(address):
            s.problems.add("metrics.address", f"expected an IP address or a host name, got {_describe(address)}")
            address = _BAD
    return MetricsConfig(port=port, address=address)


_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return len(text) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _parse_logging(s: _Section, base_dir: Path) -> LoggingConfig:
    level = s.choice(
        "level",
        _default(LoggingConfig, "level"),
        re.compile("|".join(_LOG_LEVELS)),
        "debug, info, warning or error",
    )
    progress = s.number("progress_seconds", _default(LoggingConfig, "progress_seconds"), at_least=0)
    return LoggingConfig(level=level, file=_optional_path(s, "file", base_dir), progress_seconds=progress)


def _parse(data: object, base_dir: Path, source: Path | None, label: str, with_paths: bool = True) -> Config:
    base_dir = Path(os.path.abspath(os.path.expanduser(base_dir)))
    if data is None:
        raise ConfigError(f"{label}: the config is empty; it needs at least a 'paths' section")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping at the top level, got {_describe(data)}")

    problems = _Problems()
    _check_unknown(data, [*_SECTIONS, "profiles"], "", problems, label)
    if with_paths:
        paths = _parse_paths(data, base_dir, problems)
    else:
        # For uses that never touch the daemon's folders (`rmbgd process`): any `paths`
        # section is ignored, unchecked, and the config's own folder stands in.
        paths = PathsConfig(inbox=base_dir, outbox=base_dir, errors=base_dir, done=None)

    def section(name: str) -> _Section:
        # A section that is not a mapping is reported once; its keys then read as defaults.
        return _Section(name, _read_section(data, name, problems) or {}, problems)

    watch = _parse_watch(section("watch"))
    batch = _parse_batch(section("batch"))
    model = _parse_model(section("model"), base_dir)
    s = section("input")
    input_cfg = InputConfig(
        max_pixels=s.integer("max_pixels", _default(InputConfig, "max_pixels"), 1, _MAX_PIXELS_LIMIT)
    )
    output = _parse_output(section("output"), OutputConfig())
    profiles = _parse_profiles(data.get("profiles"), output, problems)
    s = section("pipeline")
    pipeline = PipelineConfig(
        workers=s.integer("workers", _default(PipelineConfig, "workers"), 0, _MAX_WORKERS),
        max_in_flight=s.integer("max_in_flight", _default(PipelineConfig, "max_in_flight"), 0, _MAX_IN_FLIGHT),
    )
    logging_cfg = _parse_logging(section("logging"), base_dir)
    state = StateConfig(dir=_optional_path(section("state"), "dir", base_dir))
    metrics = _parse_metrics(section("metrics"))

    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        paths=paths,
        watch=watch,
        batch=batch,
        model=model,
        input=input_cfg,
        output=output,
        pipeline=pipeline,
        logging=logging_cfg,
        state=state,
        metrics=metrics,
        profiles=profiles,
        source=source,
    )


def parse_config(
    data: object, base_dir: Path, source: Path | None = None, *, with_paths: bool = True
) -> Config:
    """Validate an already-loaded YAML object; relative paths are taken from `base_dir`.

    `with_paths=False` ignores the `paths` section (see _parse)."""
    label = str(source) if source is not None else "config"
    return _parse(data, Path(base_dir), source, label, with_paths)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently lets the last win.

    It also turns the plain Python errors that SafeLoader's constructors let out for some
    malformed values (`!!int x`, `!!bool maybe`, a 5000-digit number, the date 2001-02-30)
    into YAML errors with a line and column, like every other malformed document."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
            what = _one_line(str(err))[:120] or type(err).__name__
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {_tag_name(node.tag)} value ({what})", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                # Merge keys (`<<`) legitimately supply keys that the mapping then overrides.
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable; the base class reports it with its position
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_describe(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _tag_name(tag: str) -> str:
    return tag.rsplit(":", 1)[-1] if tag.startswith("tag:yaml.org,2002:") else tag


def _yaml_problem(shown: str, text: str, err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = ", ".join(_one_line(p) for p in (err.context, err.problem) if p)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        return f"{where}: invalid YAML: {what or 'syntax error'}"
    if isinstance(err, yaml.reader.ReaderError):
        pos = max(0, min(err.position, len(text)))
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = err.character if isinstance(err.character, str) else chr(err.character)
        return f"{shown}:{line}:{column}: invalid YAML: character {char!r} is not allowed"
    return f"{shown}: invalid YAML: {_one_line(str(err))}"


def load_config(path: str | os.PathLike[str], *, with_paths: bool = True) -> Config:
    """Read, parse and validate a YAML config file; raises ConfigError listing every problem.

    `with_paths=False` ignores the `paths` section (see _parse)."""
    shown = os.fsdecode(path)
    source = Path(os.path.abspath(os.path.expanduser(shown)))
    try:
        with open(source, "rb") as fh:
            raw = fh.read(_MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{shown}: cannot read: {err.strerror or err}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{shown}: cannot read: larger than {_MAX_CONFIG_BYTES // 1024} KiB, not a config file"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = f"byte 0x{raw[err.start]:02x} at offset {err.start}"
        raise ConfigError(f"{shown}: cannot read: not UTF-8 text ({bad})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(shown, text, err)) from None
    except RecursionError:
        raise ConfigError(f"{shown}: invalid YAML: nested too deeply") from None
    return _parse(data, source.parent, source, shown, with_paths)


# `background: #ffffff` unquoted: a `#` after a space starts a YAML comment, so the key is null.
_COMMENTED_COLOUR_RE = re.compile(r"^\s*(?:-\s+)?background:\s+(#\S*)")
_TOP_LEVEL_KEY_RE = re.compile(r"^([A-Za-z_][\w-]*)\s*:")


def commented_out_colours(text: str) -> list[str]:
    """Warnings for `background:` lines whose unquoted `#colour` YAML read as a comment (null).

    Valid YAML, and null is a valid background (transparency), so only the raw line shows
    what was meant.
    """
    found = []
    section = None
    for number, line in enumerate(text.splitlines(), 1):
        top = _TOP_LEVEL_KEY_RE.match(line)
        if top:
            section = top.group(1)
        match = _COMMENTED_COLOUR_RE.match(line)
        if match:
            key = "output.background" if section == "output" else f"{section or 'output'}: background"
            found.append(
                f"{key}: line {number}: {match.group(1)} starts a YAML comment, so the background came "
                f'out null (transparent); quote the colour: background: "{match.group(1)}"'
            )
    return found


# --------------------------------------------------------------------------- folders


def _folders(cfg: Config) -> list[tuple[str, Path]]:
    return [
        (f"paths.{key}", getattr(cfg.paths, key))
        for key in _FOLDER_KEYS
        if getattr(cfg.paths, key) is not None
    ]


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        # A symlink loop; the folder probe reports it, the nesting check uses the plain path.
        return path


def _probe_folder(path: Path, inbox: bool) -> str | None:
    """Why `path` cannot serve as a working folder, or None if it can (or can be created)."""
    try:
        if path.is_dir():
            # The inbox must also be listable; the others are only written into.
            needed = (os.R_OK if inbox else 0) | os.W_OK | os.X_OK
            if os.access(path, needed):
                return None
            words = ((os.R_OK, "readable"), (os.W_OK, "writable"), (os.X_OK, "searchable"))
            missing = [w for flag, w in words if needed & flag and not os.access(path, flag)]
            return f"folder is not {' or '.join(missing) or 'accessible'} by this user ({path})"
        if path.is_symlink():
            return f"is a broken symbolic link ({path})"
        if path.exists():
            return f"exists but is not a folder ({path})"
    except OSError as err:
        return f"cannot access {path}: {err.strerror or err}"

    # Missing: it is fine if the nearest thing that does exist is a folder we may write in.
    ancestor = path.parent
    while True:
        try:
            if ancestor.exists() or ancestor.is_symlink():
                break
        except OSError as err:
            return f"cannot be created: cannot access {ancestor}: {err.strerror or err} ({path})"
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is not a folder ({path})"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable by this user ({path})"
    return None


def check_folders(cfg: Config) -> list[str]:
    """Problems with the configured folders, as `paths.KEY: ...` lines; creates nothing."""
    problems = _Problems()
    folders = _folders(cfg)
    for key, path in folders:
        reason = _probe_folder(path, inbox=key == "paths.inbox")
        if reason:
            problems.add(key, reason)

    resolved = [(key, path, _resolved(path)) for key, path in folders]

    def shown(path: Path, real: Path) -> str:
        return str(path) if path == real else f"{path}, which is {real}"

    # The watcher recurses into the inbox and outputs mirror its tree, so any overlap
    # would feed the daemon its own results or move files out from under it.
    for i, (key_a, path_a, real_a) in enumerate(resolved):
        for key_b, path_b, real_b in resolved[i + 1 :]:
            if real_a == real_b:
                problems.add(key_b, f"must differ from {key_a} (both are {shown(path_b, real_b)})")
            elif real_b.is_relative_to(real_a):
                problems.add(key_b, f"must not be inside {key_a} ({shown(path_b, real_b)})")
            elif real_a.is_relative_to(real_b):
                problems.add(key_a, f"must not be inside {key_b} ({shown(path_a, real_a)})")

    # Anything rmbgd writes into the inbox would be taken as an input; its own default state
    # folder is hidden there, but a configured one or a log file is not.
    inbox = _resolved(cfg.paths.inbox)
    for key, path in (("state.dir", cfg.state.dir), ("logging.file", cfg.logging.file)):
        if path is not None and _resolved(path).is_relative_to(inbox):
            problems.add(key, f"must not be inside paths.inbox ({path})")
    if cfg.logging.file is not None:
        reason = _probe_folder(cfg.logging.file.parent, inbox=False)
        if reason:
            problems.add("logging.file", reason)
    return problems.items


def prepare_folders(cfg: Config) -> None:
    """Create any missing configured folder (with parents); raises ConfigError on failure."""
    problems = _Problems()
    for key, path in _folders(cfg):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            # mkdir's exist_ok only tolerates an existing directory.
            problems.add(key, f"exists but is not a folder ({path})")
        except OSError as err:
            problems.add(key, f"cannot create {path}: {err.strerror or err}")
    if problems.items:
        raise ConfigError(problems.items)


# --------------------------------------------------------------------------- derived values


def effective_workers(cfg: Config) -> int:
    """Decode/encode threads: the configured count, or one per usable CPU when it is 0
    (the affinity mask and a cgroup CPU quota count, not just the host's cores)."""
    if cfg.pipeline.workers > 0:
        return cfg.pipeline.workers
    return available_cpus()


def effective_max_in_flight(cfg: Config) -> int:
    """Most files claimed but unfinished; 0 means enough for two batches plus one per worker."""
    if cfg.pipeline.max_in_flight > 0:
        return cfg.pipeline.max_in_flight
    return 2 * cfg.batch.size + effective_workers(cfg)
