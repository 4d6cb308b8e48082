"""Per-request output options: query parameters that override `output:` keys for one request.

Each parameter is read as its `output:` key is (the same rules and wording), on top of the
daemon's output section; a bad one is an OptionError naming the parameter (the API's 400).
Query strings carry text only, so the words a YAML file would write unquoted (`true`,
`null`, `12`) are read as those values first; a colour may drop its `#`, which a URL would
otherwise take for the start of a fragment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from pydantic import TypeAdapter, ValidationError

from rmbgd.config import OutputConfig
from rmbgd.config.problems import one_line

__all__ = ["PARAMETERS", "OptionError", "request_output"]

PARAMETERS = ("format", "background", "crop", "crop_padding", "mask", "max_size", "jpeg_quality", "refine_foreground")
_OUTPUT = TypeAdapter(OutputConfig)
_NULL = {"null", "none", "transparent", ""}
_BOOLEAN = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_BARE_COLOUR = re.compile(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}")


class OptionError(ValueError):
    """A query parameter that cannot be used: `str()` is `name: problem`."""


def _value(name: str, raw: str) -> Any:
    text = raw.strip()
    lowered = text.lower()
    if name == "background":
        if lowered in _NULL:
            return None
        return "#" + text if _BARE_COLOUR.fullmatch(text) else text
    if name in ("crop", "refine_foreground"):
        return _BOOLEAN.get(lowered, text)
    if name == "mask":
        return _BOOLEAN.get(lowered, lowered)
    if name in ("max_size", "jpeg_quality", "crop_padding"):
        if name == "max_size" and lowered in _NULL:
            return None
        return int(text) if text.isdigit() else text
    return text


def request_output(base: OutputConfig, params: Mapping[str, str]) -> OutputConfig:
    """`base` with the request's parameters applied; OptionError on the first bad one."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise OptionError(f"{unknown[0]}: unknown parameter (expected one of: {', '.join(PARAMETERS)})")
    if not params:
        return base
    values = {name: _value(name, raw) for name, raw in params.items()}
    try:
        return _OUTPUT.validate_python(values, context={"base": base, "base_dir": Path.cwd()})
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = [str(part) for part in first["loc"]]
        if first["type"] == "rmbgd":
            context = first["ctx"]
            message = context["problem"]
            where += [context["at"]] if context.get("at") else []
        else:
            message = one_line(first["msg"])
        name = where[-1] if where else "options"
        if name == "background" and "quoted" in message:
            message = 'expected a colour like "#ffffff" or "ffffff", or "none"'
        message = message.replace("set output.background", "give a background")
        raise OptionError(f"{name}: {message}") from None
