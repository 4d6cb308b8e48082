"""The kinds of config values: how each reads from YAML, and the problem line when it cannot.

Each kind is an `Annotated` type for the pydantic models in schema.py: the plain type and its
bounds (which hand-built configs are checked against and the JSON Schema shows) plus a
validator that applies the YAML rules when a document is parsed (a validation context is
present: relative paths, spellings such as `jpg` or `"5%"`, our own wording of each problem).
Code that builds a config by hand passes the final Python values and gets the plain checks.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BeforeValidator, Field, ValidationInfo
from pydantic_core import PydanticCustomError

from rmbgd.config.problems import describe, finite, is_int, is_number, text_problem

__all__ = [
    "DONE_HINT",
    "DYNAMIC",
    "Kept",
    "boolean",
    "choice",
    "folder",
    "host",
    "input_size",
    "integer",
    "max_input_size",
    "model_name",
    "number",
    "optional_path",
    "problem",
    "text",
    "yaml_rule",
]

DONE_HINT = "set a folder, or null to delete originals after success"


class Kept:
    """A value that is already valid (what a profile inherits from `output`); YAML never makes one."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def problem(message: str, at: str | None = None) -> PydanticCustomError:
    """The error a rule raises: `message` is the problem line's text as it is shown.

    `at` names a field below the error's location, for checks made on a whole section."""
    # The message goes in as context, not as the template: it may contain braces.
    return PydanticCustomError("rmbgd", "{problem}", {"problem": message, "at": at})


def yaml_rule(rule: Callable[[Any, dict[str, Any]], Any]) -> BeforeValidator:
    """`rule(value, context)` for values from a document; values built in code pass as they are."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Kept):
            return value.value
        if info.context is None:
            return value
        return rule(value, info.context)

    return BeforeValidator(validate)


def _in_range(value: int, lo: int, hi: int | None) -> int:
    if value < lo:
        raise problem(f"must be at least {lo}, got {describe(value)}")
    if hi is not None and value > hi:
        raise problem(f"must be at most {hi}, got {describe(value)}")
    return value


def _integer(value: Any, lo: int, hi: int | None) -> int:
    if not is_int(value):
        raise problem(f"expected an integer, got {describe(value)}")
    return _in_range(value, lo, hi)


def integer(lo: int, hi: int | None = None, *, nullable: bool = False, multiple_of: int | None = None) -> Any:
    """An int in [lo, hi]; with `nullable`, null too (a key that may be switched off)."""

    def rule(value: Any, context: dict[str, Any]) -> Any:
        if value is None and nullable:
            return None
        value = _integer(value, lo, hi)
        if multiple_of and value % multiple_of:
            raise problem(f"must be a multiple of {multiple_of}, got {value}")
        return value

    base = Annotated[int, Field(ge=lo, le=hi, multiple_of=multiple_of)]
    return Annotated[Optional[base] if nullable else base, yaml_rule(rule)]


def number(*, above: float | None = None, at_least: float | None = None) -> Any:
    """A finite float strictly greater than `above` (or at least `at_least`); ints are widened."""

    def rule(value: Any, context: dict[str, Any]) -> float:
        if not is_number(value):
            raise problem(f"expected a number, got {describe(value)}")
        if not finite(value):
            raise problem(f"must be a finite number, got {describe(value)}")
        if above is not None and value <= above:
            raise problem(f"must be greater than {above:g}, got {describe(value)}")
        if at_least is not None and value < at_least:
            raise problem(f"must be at least {at_least:g}, got {describe(value)}")
        return float(value)

    return Annotated[float, Field(gt=above, ge=at_least, allow_inf_nan=False), yaml_rule(rule)]


def _boolean(value: Any, context: dict[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise problem(f"expected true or false, got {describe(value)}")
    return value


boolean = Annotated[bool, yaml_rule(_boolean)]


def _text(value: Any, nullable: bool) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        what = "a string or null" if nullable else "a string"
        raise problem(f"expected {what}, got {describe(value)}")
    if not value.strip():
        raise problem("must not be empty")
    reason = text_problem(value)
    if reason:
        raise problem(reason)
    return value


def text(*, nullable: bool = False, then: Callable[[str, dict[str, Any]], Any] | None = None) -> Any:
    """A non-blank string that can be a name or a path; `then` turns it into the final value."""

    def rule(value: Any, context: dict[str, Any]) -> Any:
        value = _text(value, nullable)
        return value if value is None or then is None else then(value, context)

    plain = Annotated[str, Field(min_length=1)]
    return Annotated[Optional[plain] if nullable else plain, yaml_rule(rule)]


def choice(pattern: str, expected: str, examples: list[str]) -> Any:
    """One of a few words (`pattern`), in any case; `examples` are what the JSON Schema offers."""
    compiled = re.compile(pattern)

    def rule(value: Any, context: dict[str, Any]) -> str:
        normalized = value.strip().lower() if isinstance(value, str) else None
        if normalized is None or not compiled.fullmatch(normalized):
            raise problem(f"expected {expected}, got {describe(value)}")
        return normalized

    # Any case is accepted (and lowered), so the schema's pattern must accept it too.
    either_case = re.sub(r"(?<!\\)[a-z]", lambda m: f"[{m[0]}{m[0].upper()}]", pattern)
    return Annotated[str, Field(pattern=f"^(?:{either_case})$", examples=examples), yaml_rule(rule)]


def absolute(raw: str, context: dict[str, Any]) -> Path:
    # abspath, not resolve: the folders the user named are kept, symlinks and all.
    return Path(os.path.abspath(os.path.join(context["base_dir"], os.path.expanduser(raw))))


def folder(*, nullable: bool = False) -> Any:
    """A `paths` folder, relative to the config file's folder; `done` may be null (delete)."""
    hint = f" ({DONE_HINT})" if nullable else ""

    def rule(value: Any, context: dict[str, Any]) -> Path | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            what = "a folder path or null" if nullable else "a folder path"
            raise problem(f"expected {what}{hint}, got {describe(value)}")
        return absolute(_text(value, False), context)

    return Annotated[Optional[Path] if nullable else Path, yaml_rule(rule)]


def _optional_path(value: Any, context: dict[str, Any]) -> Path | None:
    raw = _text(value, True)
    return None if raw is None else absolute(raw, context)


optional_path = Annotated[Optional[Path], yaml_rule(_optional_path)]


def model_name(raw: str, context: dict[str, Any]) -> str:
    """A Hugging Face repo id as it is; a local folder made absolute against the config's folder."""
    base_dir = context["base_dir"]
    expanded = os.path.expanduser(raw)
    looks_like_path = raw.startswith(("/", ".", "~")) or (
        os.sep in raw and os.path.exists(os.path.join(base_dir, expanded))
    )
    if not looks_like_path:
        return raw
    return os.path.abspath(os.path.join(base_dir, expanded))


DYNAMIC = "dynamic"


def _input_size(value: Any, context: dict[str, Any]) -> int | str:
    if isinstance(value, str):
        if value.strip().lower() == DYNAMIC:
            return DYNAMIC
        raise problem(f"expected an integer or {DYNAMIC}, got {describe(value)}")
    # BiRefNet downsamples by 32: other sides would be padded or cropped inside the model.
    value = _integer(value, 64, 4096)
    if value % 32:
        raise problem(f"must be a multiple of 32, got {value}")
    return value


side = Annotated[int, Field(ge=64, le=4096, multiple_of=32)]
input_size = Annotated[Union[side, Literal["dynamic"]], yaml_rule(_input_size)]
max_input_size = integer(64, 4096, multiple_of=32)


_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _host(value: str, context: dict[str, Any]) -> str:
    value = value.strip()
    # The socket layer raises a UnicodeError, not an OSError, for a label over 63 characters.
    if not _is_host(value):
        raise problem(f"expected an IP address or a host name, got {describe(value)}")
    return value


host = text(then=_host)
