"""Validation of an already-loaded YAML object into a Config, every problem collected at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Mapping

from rmbgd.config.parse_output import parse_output, parse_profiles
from rmbgd.config.problems import Problems, check_unknown, describe, text_problem
from rmbgd.config.schema import (
    DYNAMIC_INPUT_SIZE,
    BatchConfig,
    Config,
    ConfigError,
    InputConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    OutputConfig,
    PathsConfig,
    PipelineConfig,
    StateConfig,
    WatchConfig,
)
from rmbgd.config.section import BAD, Section

__all__ = ["parse", "parse_config"]


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
_BACKEND_RE = re.compile(r"auto|torch|onnxruntime|openvino")
_LOG_LEVELS = ("debug", "info", "warning", "error")
# Upper bounds far above any real use: a typo with extra digits must not become a million
# threads, claims or a pixel budget no image reaches.
_MAX_WORKERS = 1024
_MAX_IN_FLIGHT = 100_000
_MAX_PIXELS_LIMIT = 10**12


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)



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



def _read_section(
    top: Mapping[Any, Any], name: str, problems: Problems
) -> Mapping[Any, Any] | None:
    """The section's mapping, or None when it is not a mapping (already reported)."""
    raw = top.get(name)
    # `watch:` with every line below commented out is an empty section, not an error.
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.add(name, f"expected a mapping, got {describe(raw)}")
        return None
    allowed = [f.name for f in dataclasses.fields(_SECTIONS[name])]
    check_unknown(raw, allowed, name, problems)
    return raw


def _parse_paths(top: Mapping[Any, Any], base_dir: Path, problems: Problems) -> PathsConfig:
    if "paths" not in top:
        # One line says it all; listing each of its four keys as required would be noise.
        problems.add("paths", "required")
        data: Mapping[Any, Any] | None = None
    else:
        data = _read_section(top, "paths", problems)
    values: dict[str, Path | None] = {}
    for key in _FOLDER_KEYS:
        values[key] = BAD
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
            problems.add(dotted, f"expected {what}, got {describe(raw)}")
            continue
        if not raw.strip():
            problems.add(dotted, "must not be empty")
            continue
        reason = text_problem(raw)
        if reason:
            problems.add(dotted, reason)
            continue
        values[key] = _absolute(raw, base_dir)
    return PathsConfig(**values)


def _parse_watch(s: Section) -> WatchConfig:
    settle = s.number("settle_seconds", _default(WatchConfig, "settle_seconds"), above=0)
    rescan = s.number("rescan_seconds", _default(WatchConfig, "rescan_seconds"), above=0)
    writer = s.number(
        "writer_timeout_seconds", _default(WatchConfig, "writer_timeout_seconds"), above=0
    )
    if settle is not BAD and writer is not BAD and writer < settle:
        s.problems.add(
            "watch.writer_timeout_seconds",
            f"must be at least watch.settle_seconds ({settle:g}), got {writer:g}",
        )
        writer = BAD
    polling = s.boolean("polling", _default(WatchConfig, "polling"))
    return WatchConfig(
        settle_seconds=settle, rescan_seconds=rescan, writer_timeout_seconds=writer, polling=polling
    )


def _parse_batch(s: Section) -> BatchConfig:
    return BatchConfig(
        size=s.integer("size", _default(BatchConfig, "size"), 1, 1024),
        max_wait_ms=s.integer("max_wait_ms", _default(BatchConfig, "max_wait_ms"), 0, 60_000),
    )


def _parse_model(s: Section, base_dir: Path) -> ModelConfig:
    name = s.string("name", _default(ModelConfig, "name"))
    if name is not BAD and "name" in s.data:
        name = _model_name(name, base_dir)
    raw_size = s.data.get("input_size")
    if isinstance(raw_size, str) and raw_size.strip().lower() == DYNAMIC_INPUT_SIZE:
        input_size: int | str = DYNAMIC_INPUT_SIZE
    elif isinstance(raw_size, str):
        s.problems.add(
            "model.input_size", f"expected an integer or {DYNAMIC_INPUT_SIZE}, got {describe(raw_size)}"
        )
        input_size = BAD
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


def _multiple_of_32(s: Section, name: str) -> int:
    # BiRefNet downsamples by 32: other sides would be padded or cropped inside the model.
    value = s.integer(name, _default(ModelConfig, name), 64, 4096)
    if value is not BAD and value % 32:
        s.problems.add(f"model.{name}", f"must be a multiple of 32, got {value}")
        return BAD
    return value


def _optional_path(s: Section, name: str, base_dir: Path) -> Path | None:
    raw = s.string(name, None, nullable=True)
    if raw is None or raw is BAD:
        return raw
    return _absolute(raw, base_dir)



def _parse_metrics(s: Section) -> MetricsConfig:
    port = None
    if s.data.get("port") is not None:
        # 0 lets the kernel pick a free port (the daemon logs which); useful in tests.
        port = s.integer("port", 0, 0, 65535)
    address = s.string("address", _default(MetricsConfig, "address"))
    if address is not BAD:
        address = address.strip()
        # The socket layer raises a UnicodeError, not an OSError, for a label over 63 characters.
        if not _is_host(address):
            s.problems.add("metrics.address", f"expected an IP address or a host name, got {describe(address)}")
            address = BAD
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


def _parse_logging(s: Section, base_dir: Path) -> LoggingConfig:
    level = s.choice(
        "level",
        _default(LoggingConfig, "level"),
        re.compile("|".join(_LOG_LEVELS)),
        "debug, info, warning or error",
    )
    progress = s.number("progress_seconds", _default(LoggingConfig, "progress_seconds"), at_least=0)
    return LoggingConfig(level=level, file=_optional_path(s, "file", base_dir), progress_seconds=progress)


def parse(data: object, base_dir: Path, source: Path | None, label: str, with_paths: bool = True) -> Config:
    base_dir = Path(os.path.abspath(os.path.expanduser(base_dir)))
    if data is None:
        raise ConfigError(f"{label}: the config is empty; it needs at least a 'paths' section")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping at the top level, got {describe(data)}")

    problems = Problems()
    check_unknown(data, [*_SECTIONS, "profiles"], "", problems, label)
    if with_paths:
        paths = _parse_paths(data, base_dir, problems)
    else:
        # For uses that never touch the daemon's folders (`rmbgd process`): any `paths`
        # section is ignored, unchecked, and the config's own folder stands in.
        paths = PathsConfig(inbox=base_dir, outbox=base_dir, errors=base_dir, done=None)

    def section(name: str) -> Section:
        # A section that is not a mapping is reported once; its keys then read as defaults.
        return Section(name, _read_section(data, name, problems) or {}, problems)

    watch = _parse_watch(section("watch"))
    batch = _parse_batch(section("batch"))
    model = _parse_model(section("model"), base_dir)
    s = section("input")
    input_cfg = InputConfig(
        max_pixels=s.integer("max_pixels", _default(InputConfig, "max_pixels"), 1, _MAX_PIXELS_LIMIT)
    )
    output = parse_output(section("output"), OutputConfig())
    profiles = parse_profiles(data.get("profiles"), output, problems)
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
    return parse(data, Path(base_dir), source, label, with_paths)
