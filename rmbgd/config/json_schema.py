"""The config file's JSON Schema, as `rmbgd config-schema` prints it and config.schema.json holds.

Editors that read a `# yaml-language-server: $schema=...` line (VS Code's YAML extension, and
others using yaml-language-server) then complete keys and flag mistakes as the file is typed.
The schema comes from the same models that validate the file; `rmbgd check` stays the judge
(it also resolves paths, probes folders and words every problem).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from rmbgd.config.schema import ConfigFile

__all__ = ["config_schema", "config_schema_text"]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file (what a YAML config may contain)."""
    schema = TypeAdapter(ConfigFile).json_schema(mode="validation")
    return {
        "$schema": _DIALECT,
        "title": "rmbgd configuration",
        "description": "The YAML config of rmbgd, the background-removal daemon; `rmbgd check --config FILE` validates one.",
        **{key: value for key, value in schema.items() if key not in ("title", "description")},
    }


def config_schema_text() -> str:
    """config_schema() as the text `rmbgd config-schema` prints: stable, so a committed copy can be compared."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
