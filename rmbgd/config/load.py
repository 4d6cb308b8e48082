"""Reading the YAML file strictly: size and encoding limits, duplicate keys, positioned errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from rmbgd.config.parse import parse
from rmbgd.config.problems import describe, one_line
from rmbgd.config.schema import Config, ConfigError

__all__ = ["commented_out_colours", "load_config"]

# A config is a few hundred bytes; the cap keeps `--config /dev/zero` from eating memory.
_MAX_CONFIG_BYTES = 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently lets the last win.

    It also turns the plain Python errors that SafeLoader's constructors let out for some
    malformed values (`!!int x`, `!!bool maybe`, a 5000-digit number, the date 2001-02-30)
    into YAML errors with a line and column, like every other malformed document."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
            what = one_line(str(err))[:120] or type(err).__name__
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
                        None, None, f"duplicate key {describe(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _tag_name(tag: str) -> str:
    return tag.rsplit(":", 1)[-1] if tag.startswith("tag:yaml.org,2002:") else tag


def _yaml_problem(shown: str, text: str, err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = ", ".join(one_line(p) for p in (err.context, err.problem) if p)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        return f"{where}: invalid YAML: {what or 'syntax error'}"
    if isinstance(err, yaml.reader.ReaderError):
        pos = max(0, min(err.position, len(text)))
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = err.character if isinstance(err.character, str) else chr(err.character)
        return f"{shown}:{line}:{column}: invalid YAML: character {char!r} is not allowed"
    return f"{shown}: invalid YAML: {one_line(str(err))}"


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
    return parse(data, source.parent, source, shown, with_paths)


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
