"""The config models themselves: frozen, no unknown keys, checked when built in code too."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from rmbgd.config import BatchConfig, Config, ModelConfig, OutputConfig, Padding, PathsConfig, WatchConfig, parse_config
from rmbgd.config.json_schema import config_schema


def paths(tmp_path: Path) -> PathsConfig:
    return PathsConfig(inbox=tmp_path / "in", outbox=tmp_path / "out", errors=tmp_path / "err", done=None)


def test_keyword_construction_and_replace_keep_working(tmp_path):
    cfg = Config(paths=paths(tmp_path), batch=BatchConfig(size=2))
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="x/y", device="cpu"))
    assert (changed.batch.size, changed.model.name, changed.model.device) == (2, "x/y", "cpu")
    assert changed.output == OutputConfig() and changed.output.crop_padding == Padding()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "build",
    [
        lambda: BatchConfig(size=0),
        lambda: BatchConfig(sise=4),  # type: ignore[call-arg]
        lambda: dataclasses.replace(BatchConfig(), max_wait_ms=-1),
        lambda: ModelConfig(input_size=100),
        lambda: OutputConfig(format="gif"),
        lambda: WatchConfig(settle_seconds=5, writer_timeout_seconds=2),
    ],
)
def test_a_hand_built_config_is_checked_too(build):
    with pytest.raises(ValidationError):
        build()


def test_parsed_values_survive_replace(tmp_path):
    # replace() validates again without a YAML context: the parsed (final) values must pass.
    data = {
        "paths": {"inbox": "in", "outbox": "out", "errors": "err", "done": None},
        "model": {"input_size": "Dynamic", "device": "CPU"},
        "output": {"format": "jpg", "background": "#fff", "mask": True, "crop_padding": "5%"},
    }
    cfg = parse_config(data, tmp_path)
    again = dataclasses.replace(cfg.output, crop=True)
    assert dataclasses.replace(again, crop=False) == cfg.output
    assert dataclasses.replace(cfg.model) == cfg.model


def test_schema_lists_every_key_the_models_have():
    schema = config_schema()
    sections = {name: ref for name, ref in schema["properties"].items() if name != "profiles"}
    for name, prop in sections.items():
        model = typing.get_type_hints(Config)[name]
        definition = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
        assert list(definition["properties"]) == [f.name for f in dataclasses.fields(model)], name
        assert definition["additionalProperties"] is False
