"""A loaded YAML document into a Config: pydantic validates, and each of its errors becomes one
`dotted.key: problem` line, all of them at once, in the order the keys are documented."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import TypeAdapter, ValidationError

from rmbgd.config.kinds import DONE_HINT, problem, yaml_rule
from rmbgd.config.problems import describe, one_line, unknown_key
from rmbgd.config.schema import Config, ConfigError, ConfigFile, OutputConfig, PathsConfig, Profile

__all__ = ["parse", "parse_config"]

# Sections in the order their problems are listed; unknown top-level keys come first.
_ORDER = ["paths", "watch", "batch", "model", "input", "output", "profiles", "pipeline", "logging", "state", "metrics", "http"]
# The keys each mapping may have, for "unknown key" lines: a section's, a profile's.
_KEYS = {
    "": [f.name for f in dataclasses.fields(ConfigFile)],
    "profile": [f.name for f in dataclasses.fields(Profile)],
    **{
        name: [f.name for f in dataclasses.fields(kind)]
        for name, kind in typing.get_type_hints(ConfigFile).items()
        if dataclasses.is_dataclass(kind)
    },
}
# Within a section, the order in which a problem's keys are listed where it differs from the
# fields' (which the "expected one of" lists follow).
_READ_FIRST = {
    "model": ["name", "input_size", "max_input_size"],
    "output": ["format", "background", "mask", "max_size"],
    "logging": ["level", "progress_seconds"],
}
Loc = tuple[Any, ...]


def _profile_list(value: Any, context: dict[str, Any]) -> Any:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise problem(f"expected a list of {{match, output}} mappings, got {describe(value)}")
    return value


_FILE = TypeAdapter(ConfigFile)
_OUTPUT = TypeAdapter(OutputConfig)
_PROFILES = TypeAdapter(Annotated[tuple[Profile, ...], yaml_rule(_profile_list)])


def _dotted(loc: Loc) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _allowed(parent: Loc) -> Sequence[str]:
    if not parent:
        return _KEYS[""]
    if parent[0] == "profiles":
        return _KEYS["profile"] if len(parent) == 2 else _KEYS["output"]
    return _KEYS[parent[0]]


UNKNOWN, FIELD, WHOLE = 0, 1, 2


def _line(error: Any, prefix: Loc, label: str) -> tuple[Loc, int, str]:
    """(where, which kind of problem, the problem line) for one pydantic error.

    A check on a whole section (WHOLE) names its key with `at`; it is listed after the rest."""
    loc: Loc = prefix + tuple(error["loc"])
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "invalid_key", "extra_forbidden"):
        # An invalid (not a string) key's location is a string made of it; the input is the key.
        key = value if kind == "invalid_key" else loc[-1]
        return loc, UNKNOWN, unknown_key(key, _allowed(loc[:-1]), _dotted(loc[:-1]), label)
    in_profile = loc[:1] == ("profiles",) and len(loc) > 1
    found = FIELD
    if kind == "rmbgd":
        context = error["ctx"]
        message = context["problem"]
        if context.get("at"):
            loc, found = loc + (context["at"],), WHOLE
    elif in_profile and loc[-1] == "output" and kind in ("missing", "dataclass_type"):
        message = f"expected a mapping of output settings, got {describe(None if kind == 'missing' else value)}"
    elif kind == "missing":
        # One line says a section is missing; its keys are then not listed one by one.
        message = "required" + (f" ({DONE_HINT})" if loc == ("paths", "done") else "")
    elif kind in ("dataclass_type", "dataclass_args_type"):
        what = "a mapping with match and output" if in_profile and len(loc) == 2 else "a mapping"
        message = f"expected {what}, got {describe(value)}"
    else:  # nothing of ours words it: pydantic's own message, on one line
        message = one_line(error["msg"])
    return loc, found, f"{_dotted(loc)}: {message}"


def _position(section: str, rest: Loc, found: int) -> int:
    """Where a problem in one mapping goes: unknown keys first, then by key, whole-section checks last."""
    if found == UNKNOWN and len(rest) == 1 or not rest:
        return 0
    if found == WHOLE and len(rest) == 1:
        return 10**6
    order = _READ_FIRST.get(section, [])
    fields = order + [key for key in _KEYS.get(section, []) if key not in order]
    return 1 + fields.index(rest[0]) if rest[0] in fields else 10**5


def _rank(loc: Loc, found: int) -> tuple[int, ...]:
    """Where a problem is listed: by section, then as _position says within each mapping."""
    if not loc or (found == UNKNOWN and len(loc) == 1):
        return (0,)
    section = _ORDER.index(loc[0]) + 1 if loc[0] in _ORDER else len(_ORDER) + 1
    if loc[0] != "profiles" or len(loc) == 1:
        return (section, -1, _position(loc[0], loc[1:], found), 0)
    rest = loc[2:]
    inner = _position("output", rest[1:], found) if rest[:1] == ("output",) and len(rest) > 1 else 0
    return (section, loc[1], _position("profile", rest, found), inner)


def _problems(err: ValidationError, prefix: Loc, label: str) -> list[tuple[tuple[int, ...], str]]:
    found = [_line(error, prefix, label) for error in err.errors(include_url=False)]
    return [(_rank(loc, kind), line) for loc, kind, line in found]


def parse(data: object, base_dir: Path, source: Path | None, label: str, with_paths: bool = True) -> Config:
    base_dir = Path(os.path.abspath(os.path.expanduser(base_dir)))
    if data is None:
        raise ConfigError(f"{label}: the config is empty; it needs at least a 'paths' section")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping at the top level, got {describe(data)}")

    sections = {key: value for key, value in data.items() if key != "profiles"}
    if not with_paths:
        # For uses that never touch the daemon's folders (`rmbgd process`): any `paths`
        # section is ignored, unchecked, and the config's own folder stands in.
        sections["paths"] = PathsConfig(inbox=base_dir, outbox=base_dir, errors=base_dir, done=None)
    context = {"base_dir": base_dir}
    found: list[tuple[tuple[int, ...], str]] = []
    parsed = None
    try:
        parsed = _FILE.validate_python(sections, context=context)
        base = parsed.output
    except ValidationError as err:
        found += _problems(err, (), label)
        base = _base_output(data.get("output"), context)
    # Profiles are read on top of the output section they override.
    try:
        profiles = _PROFILES.validate_python(data.get("profiles"), context={**context, "base": base})
    except ValidationError as err:
        found += _problems(err, ("profiles",), label)
    if found or parsed is None:
        raise ConfigError([line for _, line in sorted(found, key=lambda item: item[0])])
    fields = {name: getattr(parsed, name) for name in ConfigFile.__dataclass_fields__}
    return Config(**{**fields, "profiles": profiles, "source": source})


def _base_output(raw: Any, context: dict[str, Any]) -> OutputConfig:
    """The output section that profiles inherit from when the document has problems elsewhere."""
    try:
        return _OUTPUT.validate_python({} if raw is None else raw, context=context)
    except ValidationError:
        return OutputConfig()


def parse_config(
    data: object, base_dir: Path, source: Path | None = None, *, with_paths: bool = True
) -> Config:
    """Validate an already-loaded YAML object; relative paths are taken from `base_dir`.

    `with_paths=False` ignores the `paths` section (see parse)."""
    label = str(source) if source is not None else "config"
    return parse(data, Path(base_dir), source, label, with_paths)
