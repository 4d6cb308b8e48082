"""The published JSON Schema: `rmbgd config-schema`, the committed config.schema.json, editors' view."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from rmbgd.config.json_schema import config_schema, config_schema_text
from tests.support.daemon import REPO

COMMITTED = REPO / "config.schema.json"


def test_config_schema_prints_the_schema_without_importing_torch():
    code = (
        "import sys\n"
        "from rmbgd import cli\n"
        "code = cli.main(['config-schema'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "[]"
    assert json.loads(result.stdout) == config_schema()


def test_committed_schema_is_up_to_date():
    # Regenerate with: rmbgd config-schema > config.schema.json
    assert COMMITTED.read_text(encoding="utf-8") == config_schema_text()


def test_example_config_names_the_schema_and_is_valid_under_it():
    text = (REPO / "config.example.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./config.schema.json"
    jsonschema.Draft202012Validator(config_schema()).validate(yaml.safe_load(text))


@pytest.mark.parametrize(
    "document",
    [
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None}, "batch": {"sise": 4}},
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None}, "model": {"device": "gpu"}},
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None}, "model": {"input_size": 100}},
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None}, "output": {"background": "white"}},
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e"}},
        {"paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None}, "profiles": [{"match": "a/", "output": {"fromat": "png"}}]},
    ],
)
def test_schema_flags_what_check_refuses(document):
    errors = list(jsonschema.Draft202012Validator(config_schema()).iter_errors(document))
    assert errors, document


def test_schema_accepts_the_spellings_check_accepts():
    document = {
        "paths": {"inbox": "i", "outbox": "o", "errors": "e", "done": None},
        "model": {"device": "CUDA:1", "input_size": "dynamic", "dtype": "Float16"},
        "output": {"format": "jpg", "background": "#FFF", "mask": "only", "crop_padding": "5%", "max_size": None},
        "logging": {"level": "WARNING"},
        "profiles": [{"match": "white/", "output": {"mask": True, "crop_padding": 16}}],
    }
    jsonschema.Draft202012Validator(config_schema()).validate(document)
