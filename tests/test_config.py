from __future__ import annotations

import dataclasses
import os
import pickle
import textwrap
from pathlib import Path

import pytest

import rmbgd.config as config_mod
from rmbgd.config import folders as folders_mod
from rmbgd.config import limits as limits_mod
from rmbgd.config import load as load_mod
from rmbgd.config import (
    BatchConfig,
    Config,
    ConfigError,
    InputConfig,
    LoggingConfig,
    ModelConfig,
    OutputConfig,
    PathsConfig,
    PipelineConfig,
    WatchConfig,
    check_folders,
    effective_max_in_flight,
    effective_workers,
    load_config,
    parse_config,
    prepare_folders,
)
from tests.support.unprivileged import as_unprivileged, folder_for_unprivileged

EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"


@pytest.fixture
def user_tmp(tmp_path: Path):
    """tmp_path, or as root a folder that the unprivileged child of as_unprivileged can use."""
    yield from folder_for_unprivileged(tmp_path)


MINIMAL_PATHS = """\
paths:
  inbox: in
  outbox: out
  errors: err
  done: done
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def paths_data(base: Path, **overrides: object) -> dict[str, object]:
    paths: dict[str, object] = {
        "inbox": str(base / "in"),
        "outbox": str(base / "out"),
        "errors": str(base / "err"),
        "done": str(base / "done"),
    }
    paths.update(overrides)
    return {"paths": paths}


def make_cfg(base: Path, **overrides: object) -> Config:
    return parse_config(paths_data(base, **overrides), base)


# --------------------------------------------------------------------------- valid configs


def test_full_config_parses_to_typed_values(tmp_path: Path) -> None:
    cfg_path = write(
        tmp_path,
        """\
        paths:
          inbox: /srv/rmbgd/inbox
          outbox: /srv/rmbgd/outbox
          errors: /srv/rmbgd/errors
          done: /srv/rmbgd/done
        watch:
          settle_seconds: 2
          rescan_seconds: 10.5
          writer_timeout_seconds: 60
        batch:
          size: 16
          max_wait_ms: 0
        model:
          name: briaai/RMBG-2.0
          device: cuda:1
          trust_remote_code: false
          input_size: 512
          revision: abc123
        input:
          max_pixels: 50000000
        output:
          png_compress_level: 9
          clean_transparent: false
        pipeline:
          workers: 3
          max_in_flight: 40
        logging:
          level: DEBUG
        """,
    )
    cfg = load_config(cfg_path)
    assert cfg.paths == PathsConfig(
        inbox=Path("/srv/rmbgd/inbox"),
        outbox=Path("/srv/rmbgd/outbox"),
        errors=Path("/srv/rmbgd/errors"),
        done=Path("/srv/rmbgd/done"),
    )
    assert cfg.watch == WatchConfig(2.0, 10.5, 60.0)
    assert isinstance(cfg.watch.settle_seconds, float)
    assert cfg.batch == BatchConfig(size=16, max_wait_ms=0)
    assert cfg.model == ModelConfig(
        name="briaai/RMBG-2.0",
        device="cuda:1",
        trust_remote_code=False,
        input_size=512,
        revision="abc123",
    )
    assert cfg.input == InputConfig(max_pixels=50_000_000)
    assert cfg.output == OutputConfig(png_compress_level=9, clean_transparent=False)
    assert cfg.pipeline == PipelineConfig(workers=3, max_in_flight=40)
    assert cfg.logging == LoggingConfig(level="debug")
    assert cfg.source == cfg_path
    assert effective_workers(cfg) == 3
    assert effective_max_in_flight(cfg) == 40


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_PATHS))
    assert cfg.watch == WatchConfig()
    assert cfg.watch.settle_seconds == 1.0
    assert cfg.watch.rescan_seconds == 30.0
    assert cfg.watch.writer_timeout_seconds == 300.0
    assert cfg.batch == BatchConfig(size=8, max_wait_ms=200)
    assert cfg.model == ModelConfig()
    assert cfg.model.name == "ZhengPeng7/BiRefNet"
    assert cfg.model.device == "auto"
    assert cfg.model.trust_remote_code is True
    assert cfg.model.input_size == 1024
    assert cfg.model.revision is None
    assert cfg.input.max_pixels == 100_000_000
    assert cfg.output == OutputConfig(png_compress_level=1, clean_transparent=True)
    assert cfg.pipeline == PipelineConfig(workers=0, max_in_flight=0)
    assert cfg.logging.level == "info"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_PATHS))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.size = 3  # type: ignore[misc]


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_PATHS + "watch:\nbatch: {}\n"))
    assert cfg.watch == WatchConfig()
    assert cfg.batch == BatchConfig()


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg_path = write(
        conf_dir,
        """\
        paths:
          inbox: in
          outbox: ./sub/../out
          errors: ~/errors
          done: ../done
        """,
    )
    cfg = load_config(os.path.relpath(cfg_path, elsewhere))
    assert cfg.paths.inbox == conf_dir / "in"
    assert cfg.paths.outbox == conf_dir / "out"
    assert cfg.paths.errors == tmp_path / "home" / "errors"
    assert cfg.paths.done == tmp_path / "done"
    assert cfg.source == cfg_path
    assert all(p.is_absolute() for p in (cfg.paths.inbox, cfg.paths.outbox))


def test_paths_keep_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cfg = make_cfg(tmp_path, inbox=str(tmp_path / "link" / "in"))
    assert cfg.paths.inbox == tmp_path / "link" / "in"


def test_done_null_means_delete(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_PATHS.replace("done: done", "done: null")))
    assert cfg.paths.done is None
    cfg = load_config(write(tmp_path, MINIMAL_PATHS.replace("done: done", "done:")))
    assert cfg.paths.done is None


def test_missing_done_is_an_error_with_a_hint(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MINIMAL_PATHS.replace("  done: done\n", ""))
    assert problems == [
        "paths.done: required (set a folder, or null to delete originals after success)"
    ]


def test_missing_paths_section(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "batch:\n  size: 4\n") == ["paths: required"]


def test_missing_and_bad_path_values(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        paths:
          inbox: 12
          outbox: ""
          done: [a]
        """,
    )
    assert problems[0] == "paths.inbox: expected a folder path, got 12"
    assert problems[1] == "paths.outbox: must not be empty"
    assert problems[2] == "paths.errors: required"
    assert problems[3].startswith("paths.done: expected a folder path or null")
    assert len(problems) == 4


def test_model_name_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "org" / "model").mkdir(parents=True)

    def name_for(value: str) -> str:
        data = paths_data(tmp_path)
        data["model"] = {"name": value}
        return parse_config(data, tmp_path).model.name

    assert name_for("ZhengPeng7/BiRefNet") == "ZhengPeng7/BiRefNet"
    assert name_for("./models/birefnet") == str(tmp_path / "models" / "birefnet")
    assert name_for("~/m") == str(tmp_path / "home" / "m")
    assert name_for("/opt/m/../model") == "/opt/model"
    # An id-shaped name becomes a path only when that folder exists next to the config.
    assert name_for("org/model") == str(tmp_path / "org" / "model")
    assert isinstance(name_for("./x"), str)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"])
def test_good_devices(tmp_path: Path, device: str) -> None:
    data = paths_data(tmp_path)
    data["model"] = {"device": device}
    assert parse_config(data, tmp_path).model.device == device


@pytest.mark.parametrize(
    ("device", "shown"),
    [("gpu", "'gpu'"), ("cuda:", "'cuda:'"), ("cuda:x", "'cuda:x'"), ("mps0", "'mps0'"), (0, "0")],
)
def test_bad_devices(tmp_path: Path, device: object, shown: str) -> None:
    data = paths_data(tmp_path)
    data["model"] = {"device": device}
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    assert info.value.problems == [f"model.device: expected auto, cpu, cuda or cuda:N, got {shown}"]


# --------------------------------------------------------------------------- invalid configs


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MINIMAL_PATHS + "pathz: {}\nfrobnicate: 1\n")
    assert problems[0].startswith(
        "pathz: unknown key (expected one of: paths, watch, batch, model, input, output, "
        "pipeline, logging, state, metrics, http, profiles)"
    )
    assert problems[0].endswith("did you mean 'paths'?")
    assert problems[1] == (
        "frobnicate: unknown key (expected one of: paths, watch, batch, model, input, output, "
        "pipeline, logging, state, metrics, http, profiles)"
    )


def test_unknown_nested_keys(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        MINIMAL_PATHS.replace("inbox:", "inbx:") + "batch:\n  sise: 4\n  colour: red\n",
    )
    assert problems == [
        "paths.inbx: unknown key; did you mean 'inbox'?",
        "paths.inbox: required",
        "batch.sise: unknown key; did you mean 'size'?",
        "batch.colour: unknown key (expected one of: size, max_wait_ms)",
    ]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("batch:\n  size: eight\n", "batch.size: expected an integer, got 'eight'"),
        ("batch:\n  size: '8'\n", "batch.size: expected an integer, got '8'"),
        ("batch:\n  size: yes\n", "batch.size: expected an integer, got true"),
        ("batch:\n  size: 2.5\n", "batch.size: expected an integer, got 2.5"),
        ("batch:\n  size:\n", "batch.size: expected an integer, got null"),
        ("watch: [1, 2]\n", "watch: expected a mapping, got a list"),
        ("model: fast\n", "model: expected a mapping, got 'fast'"),
        ("watch:\n  settle_seconds: '1'\n", "watch.settle_seconds: expected a number, got '1'"),
        ("watch:\n  settle_seconds: true\n", "watch.settle_seconds: expected a number, got true"),
        ("watch:\n  rescan_seconds: .inf\n", "watch.rescan_seconds: must be a finite number, got inf"),
        ("model:\n  trust_remote_code: 1\n", "model.trust_remote_code: expected true or false, got 1"),
        (
            "output:\n  clean_transparent: 'true'\n",
            "output.clean_transparent: expected true or false, got 'true'",
        ),
        ("model:\n  name: 5\n", "model.name: expected a string, got 5"),
        ("model:\n  revision: 1234\n", "model.revision: expected a string or null, got 1234"),
        ("model:\n  name: {a: 1}\n", "model.name: expected a string, got a mapping"),
        (
            "logging:\n  level: verbose\n",
            "logging.level: expected debug, info, warning or error, got 'verbose'",
        ),
    ],
)
def test_type_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    assert problems_of(tmp_path, MINIMAL_PATHS + snippet) == [expected]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("batch:\n  size: 0\n", "batch.size: must be at least 1, got 0"),
        ("batch:\n  size: 1025\n", "batch.size: must be at most 1024, got 1025"),
        ("batch:\n  max_wait_ms: -1\n", "batch.max_wait_ms: must be at least 0, got -1"),
        ("batch:\n  max_wait_ms: 60001\n", "batch.max_wait_ms: must be at most 60000, got 60001"),
        ("watch:\n  settle_seconds: 0\n", "watch.settle_seconds: must be greater than 0, got 0"),
        ("watch:\n  rescan_seconds: -2.5\n", "watch.rescan_seconds: must be greater than 0, got -2.5"),
        (
            "watch:\n  settle_seconds: 5\n  writer_timeout_seconds: 2\n",
            "watch.writer_timeout_seconds: must be at least watch.settle_seconds (5), got 2",
        ),
        ("model:\n  input_size: 32\n", "model.input_size: must be at least 64, got 32"),
        ("model:\n  input_size: 8192\n", "model.input_size: must be at most 4096, got 8192"),
        ("model:\n  input_size: 1000\n", "model.input_size: must be a multiple of 32, got 1000"),
        ("input:\n  max_pixels: 0\n", "input.max_pixels: must be at least 1, got 0"),
        ("output:\n  png_compress_level: 10\n", "output.png_compress_level: must be at most 9, got 10"),
        ("pipeline:\n  workers: -1\n", "pipeline.workers: must be at least 0, got -1"),
        ("pipeline:\n  max_in_flight: -3\n", "pipeline.max_in_flight: must be at least 0, got -3"),
        ("model:\n  name: '  '\n", "model.name: must not be empty"),
    ],
)
def test_range_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    assert problems_of(tmp_path, MINIMAL_PATHS + snippet) == [expected]


def test_boundaries_accepted(tmp_path: Path) -> None:
    data = paths_data(tmp_path)
    data.update(
        watch={"settle_seconds": 0.01, "writer_timeout_seconds": 0.01},
        batch={"size": 1024, "max_wait_ms": 60_000},
        model={"input_size": 4096},
        output={"png_compress_level": 0},
    )
    cfg = parse_config(data, tmp_path)
    assert cfg.batch == BatchConfig(1024, 60_000)
    assert cfg.model.input_size == 4096
    assert cfg.watch.writer_timeout_seconds == 0.01


def test_every_problem_is_reported(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        paths:
          inbox: in
          outbox: out
          errors: err
        pathz: 1
        watch: []
        batch:
          size: eight
          max_wait_ms: -5
        model:
          device: gpu
          input_size: 100
        logging:
          level: loud
        """,
    )
    keys = [p.split(":", 1)[0] for p in problems]
    assert keys == [
        "pathz",
        "paths.done",
        "watch",
        "batch.size",
        "batch.max_wait_ms",
        "model.input_size",
        "model.device",
        "logging.level",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "paths: {}\nbatch:\n  size: 0\n"))
    assert str(info.value) == info.value.problems[0] == "paths.inbox: required"


def test_non_string_keys_are_unknown(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MINIMAL_PATHS + "batch:\n  1: 2\n")
    assert problems == ["batch.1: unknown key (expected one of: size, max_wait_ms)"]


# --------------------------------------------------------------------------- file-level errors


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "paths:\n  inbox: in\n  outbox: [out\nbatch:\n  size: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:4:")
    assert ": invalid YAML: " in problem
    assert "\n" not in problem


def test_yaml_error_names_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a: 1\n b: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config("config.yaml")
    assert str(info.value) == "config.yaml:2:3: invalid YAML: mapping values are not allowed here"


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_PATHS + "batch:\n  size: 4\nbatch:\n  size: 16\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:8:1: invalid YAML: duplicate key 'batch'"


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = MINIMAL_PATHS + "batch: &b\n  size: 4\nmodel: {device: cpu}\n"
    text += "output:\n  <<: {png_compress_level: 3}\n  png_compress_level: 5\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.output.png_compress_level == 5


def test_control_character_is_reported_with_position(tmp_path: Path) -> None:
    path = write(tmp_path, "paths:\n  inbox: a\x07b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2:11: invalid YAML: character '\\x07' is not allowed"


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "paths: !!python/object:os.system {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert ": invalid YAML: " in str(info.value)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the config is empty; it needs at least a 'paths' section"


@pytest.mark.parametrize(("text", "shown"), [("- a\n- b\n", "a list"), ("hello\n", "'hello'")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, shown: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: expected a mapping at the top level, got {shown}"


def test_parse_config_labels_file_level_problems() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([1], Path("/"))
    assert str(info.value) == "config: expected a mapping at the top level, got a list"
    with pytest.raises(ConfigError) as info:
        parse_config(None, Path("/"), source=Path("/etc/x.yaml"))
    assert str(info.value).startswith("/etc/x.yaml: the config is empty")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_unreadable_file(user_tmp: Path) -> None:
    # As root too: the check runs as an ordinary user (tests/support/unprivileged.py).
    path = write(user_tmp, MINIMAL_PATHS)
    path.chmod(0)
    as_unprivileged(_expect_unreadable, path)


def _expect_unreadable(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: Permission denied"


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"paths:\n  inbox: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: not UTF-8 text (byte 0xff at offset 16)"


def test_huge_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_MAX_CONFIG_BYTES", 16)
    path = write(tmp_path, MINIMAL_PATHS)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cannot read: larger than" in str(info.value)


def test_config_error_survives_pickling() -> None:
    err = ConfigError(["a: one", "b: two"])
    clone = pickle.loads(pickle.dumps(err))
    assert clone.problems == ["a: one", "b: two"]
    assert str(clone) == "a: one"
    assert str(ConfigError("single")) == "single"


def test_example_config_is_valid() -> None:
    if not EXAMPLE.exists():
        pytest.skip("config.example.yaml not written yet")
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE.resolve()


# --------------------------------------------------------------------------- folders


def test_check_folders_accepts_existing_and_creatable(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    cfg = make_cfg(tmp_path, errors=str(tmp_path / "deep" / "er" / "rors"))
    assert check_folders(cfg) == []
    # Checking must not create anything.
    assert not (tmp_path / "deep").exists()
    assert not (tmp_path / "done").exists()


def test_check_folders_skips_null_done(tmp_path: Path) -> None:
    assert check_folders(make_cfg(tmp_path, done=None)) == []


def test_check_folders_same_folder_twice(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, errors=str(tmp_path / "out"))
    assert check_folders(cfg) == [
        f"paths.errors: must differ from paths.outbox (both are {tmp_path / 'out'})"
    ]


def test_check_folders_same_folder_via_symlink(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "out")
    cfg = make_cfg(tmp_path, done=str(tmp_path / "alias"))
    [problem] = check_folders(cfg)
    assert problem.startswith("paths.done: must differ from paths.outbox")


def test_check_folders_outbox_inside_inbox(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, outbox=str(tmp_path / "in" / "out"))
    assert check_folders(cfg) == [
        f"paths.outbox: must not be inside paths.inbox ({tmp_path / 'in' / 'out'})"
    ]


def test_check_folders_inbox_inside_done(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, inbox=str(tmp_path / "done" / "in"))
    assert check_folders(cfg) == [
        f"paths.inbox: must not be inside paths.done ({tmp_path / 'done' / 'in'})"
    ]


def test_check_folders_prefix_is_not_nesting(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, inbox=str(tmp_path / "box"), outbox=str(tmp_path / "boxes"))
    assert check_folders(cfg) == []


def test_check_folders_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    (tmp_path / "blocker").write_text("x")
    cfg = make_cfg(tmp_path, errors=str(tmp_path / "blocker" / "errors"))
    assert check_folders(cfg) == [
        f"paths.outbox: exists but is not a folder ({tmp_path / 'out'})",
        f"paths.errors: cannot be created: {tmp_path / 'blocker'} is not a folder "
        f"({tmp_path / 'blocker' / 'errors'})",
    ]


def test_check_folders_broken_symlink(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    assert check_folders(make_cfg(tmp_path)) == [
        f"paths.outbox: is a broken symbolic link ({tmp_path / 'out'})"
    ]


def test_check_folders_unwritable_parent(user_tmp: Path) -> None:
    locked = user_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    as_unprivileged(_expect_unwritable_parent, user_tmp, locked)


def _expect_unwritable_parent(tmp_path: Path, locked: Path) -> None:
    cfg = make_cfg(tmp_path, outbox=str(locked / "out"))
    assert check_folders(cfg) == [
        f"paths.outbox: cannot be created: {locked} is not writable by this user "
        f"({locked / 'out'})"
    ]


def test_check_folders_access_denied_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root passes real permission checks, so simulate a read-only parent and inbox.
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "in").mkdir()
    real_access = os.access
    denied = {str(locked), str(tmp_path / "in")}

    def fake_access(path: object, mode: int, **kwargs: object) -> bool:
        if os.fspath(path) in denied and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(folders_mod.os, "access", fake_access)
    cfg = make_cfg(tmp_path, outbox=str(locked / "out"))
    assert check_folders(cfg) == [
        f"paths.inbox: folder is not writable by this user ({tmp_path / 'in'})",
        f"paths.outbox: cannot be created: {locked} is not writable by this user "
        f"({locked / 'out'})",
    ]


def test_prepare_folders_creates_missing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    cfg = make_cfg(tmp_path, outbox=str(tmp_path / "a" / "b" / "out"), done=None)
    prepare_folders(cfg)
    assert (tmp_path / "a" / "b" / "out").is_dir()
    assert (tmp_path / "err").is_dir()
    assert not (tmp_path / "done").exists()
    prepare_folders(cfg)  # idempotent
    assert check_folders(cfg) == []


def test_prepare_folders_reports_failures(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    (tmp_path / "blocker").write_text("x")
    cfg = make_cfg(tmp_path, errors=str(tmp_path / "blocker" / "errors"))
    with pytest.raises(ConfigError) as info:
        prepare_folders(cfg)
    assert info.value.problems == [
        f"paths.outbox: exists but is not a folder ({tmp_path / 'out'})",
        f"paths.errors: cannot create {tmp_path / 'blocker' / 'errors'}: Not a directory",
    ]
    assert (tmp_path / "in").is_dir()


def test_prepare_folders_permission_denied(user_tmp: Path) -> None:
    locked = user_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    (user_tmp / "in").mkdir()
    as_unprivileged(_expect_prepare_denied, user_tmp, locked)
    assert not (locked / "done").exists()


def _expect_prepare_denied(tmp_path: Path, locked: Path) -> None:
    cfg = make_cfg(tmp_path, done=str(locked / "done"))
    with pytest.raises(ConfigError) as info:
        prepare_folders(cfg)
    assert info.value.problems == [
        f"paths.done: cannot create {locked / 'done'}: Permission denied"
    ]


# --------------------------------------------------------------------------- derived values


def test_effective_workers_and_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    # The usable CPUs (affinity, cgroup quota: tests/test_cpus.py), not the host's count.
    monkeypatch.setattr(limits_mod, "available_cpus", lambda: 6)
    assert effective_workers(cfg) == 6
    assert effective_max_in_flight(cfg) == 2 * 8 + 6

    tuned = dataclasses.replace(
        cfg, pipeline=PipelineConfig(workers=2), batch=BatchConfig(size=4)
    )
    assert effective_workers(tuned) == 2
    assert effective_max_in_flight(tuned) == 2 * 4 + 2


# --------------------------------------------------------------------------- state, metrics, log file


def test_state_metrics_and_log_file_default_to_off(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_PATHS))
    assert cfg.state == config_mod.StateConfig(dir=None)
    assert cfg.metrics == config_mod.MetricsConfig(port=None, address="127.0.0.1")
    assert cfg.logging.file is None


def test_state_metrics_and_log_file_parse(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            MINIMAL_PATHS
            + "state:\n  dir: var/state\n"
            + "metrics:\n  port: 9464\n  address: 0.0.0.0\n"
            + "logging:\n  file: log/rmbgd.jsonl\n",
        )
    )
    assert cfg.state.dir == tmp_path / "var" / "state"
    assert cfg.metrics == config_mod.MetricsConfig(port=9464, address="0.0.0.0")
    assert cfg.logging.file == tmp_path / "log" / "rmbgd.jsonl"
    assert check_folders(cfg) == []


def test_metrics_port_null_and_zero(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL_PATHS + "metrics:\n  port: null\n")).metrics.port is None
    assert load_config(write(tmp_path, MINIMAL_PATHS + "metrics:\n  port: 0\n")).metrics.port == 0


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("metrics:\n  port: 70000\n", "metrics.port: must be at most 65535, got 70000"),
        ("metrics:\n  port: http\n", "metrics.port: expected an integer, got 'http'"),
        ("metrics:\n  address: 5\n", "metrics.address: expected a string, got 5"),
        ("metrics:\n  address: " + "a" * 64 + "\n", "metrics.address: expected an IP address or a host name, got '" + "a" * 57 + "...'"),
        ("metrics:\n  address: 'a b'\n", "metrics.address: expected an IP address or a host name, got 'a b'"),
        ("metrics:\n  address: '[::1]'\n", "metrics.address: expected an IP address or a host name, got '[::1]'"),
        ("state:\n  dir: 3\n", "state.dir: expected a string or null, got 3"),
        ("state:\n  folder: x\n", "state.folder: unknown key (expected one of: dir)"),
        ("logging:\n  file: ''\n", "logging.file: must not be empty"),
    ],
)
def test_state_metrics_and_log_file_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    assert problems_of(tmp_path, MINIMAL_PATHS + snippet) == [expected]


def test_check_folders_rejects_state_and_log_inside_inbox(tmp_path: Path) -> None:
    data = paths_data(tmp_path)
    data["state"] = {"dir": str(tmp_path / "in" / "state")}
    data["logging"] = {"file": str(tmp_path / "in" / "rmbgd.log")}
    problems = check_folders(parse_config(data, tmp_path))
    assert problems == [
        f"state.dir: must not be inside paths.inbox ({tmp_path / 'in' / 'state'})",
        f"logging.file: must not be inside paths.inbox ({tmp_path / 'in' / 'rmbgd.log'})",
    ]


def test_check_folders_log_file_in_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    data = paths_data(tmp_path)
    data["logging"] = {"file": str(tmp_path / "plain" / "rmbgd.log")}
    (problem,) = check_folders(parse_config(data, tmp_path))
    assert problem.startswith("logging.file: exists but is not a folder")


# --------------------------------------------------------------------------- model precision and sizes


def test_model_precision_and_size_keys(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            MINIMAL_PATHS
            + "model:\n  dtype: BFloat16\n  input_size: Dynamic\n  max_input_size: 1536\n  compile: true\n",
        )
    )
    assert (cfg.model.dtype, cfg.model.input_size) == ("bfloat16", "dynamic")
    assert (cfg.model.max_input_size, cfg.model.compile) == (1536, True)
    defaults = load_config(write(tmp_path, MINIMAL_PATHS)).model
    assert (defaults.dtype, defaults.input_size, defaults.max_input_size, defaults.compile) == (
        "auto",
        1024,
        2048,
        False,
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("model:\n  dtype: fp16\n", "model.dtype: expected auto, float16, bfloat16 or float32, got 'fp16'"),
        ("model:\n  dtype: 16\n", "model.dtype: expected auto, float16, bfloat16 or float32, got 16"),
        ("model:\n  input_size: large\n", "model.input_size: expected an integer or dynamic, got 'large'"),
        ("model:\n  input_size: 1024.0\n", "model.input_size: expected an integer, got 1024.0"),
        ("model:\n  max_input_size: 2000\n", "model.max_input_size: must be a multiple of 32, got 2000"),
        ("model:\n  max_input_size: 32\n", "model.max_input_size: must be at least 64, got 32"),
        ("model:\n  compile: yes please\n", "model.compile: expected true or false, got 'yes please'"),
    ],
)
def test_model_precision_and_size_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    assert problems_of(tmp_path, MINIMAL_PATHS + snippet) == [expected]


# --------------------------------------------------------------------------- hostile values
# Each of these escaped as a Python exception (a traceback from `check`, a dead daemon on
# SIGHUP) before; tests/test_config_fuzz.py looks for more of the kind.


@pytest.mark.parametrize(
    "value, what",
    [
        ("!!int eight", "cannot read this int value"),
        ("!!bool maybe", "cannot read this bool value"),
        ("!!float x", "cannot read this float value"),
        ("2001-02-30", "cannot read this timestamp value (day is out of range for month)"),
        ("0000-01-01", "cannot read this timestamp value (year 0 is out of range)"),
        ("9" * 5000, "cannot read this int value (Exceeds the limit"),
    ],
)
def test_yaml_values_python_cannot_build_are_invalid_yaml(tmp_path: Path, value: str, what: str) -> None:
    path = write(tmp_path, MINIMAL_PATHS + f"watch: {{settle_seconds: {value}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:6:25: invalid YAML: {what}"), problem
    assert len(problem) < 300


def test_numbers_too_large_for_a_float_are_not_finite(tmp_path: Path) -> None:
    # YAML 1.1 base-60 ints (`1:0:0`) grow past what str() may print for an int.
    giant = "1" + ":0" * 3000
    problems = problems_of(tmp_path, MINIMAL_PATHS + f"watch: {{settle_seconds: {giant}}}\nbatch: {{size: {giant}}}\n")
    assert problems == [
        "watch.settle_seconds: must be a finite number, got an integer of about 5335 digits",
        "batch.size: must be at most 1024, got an integer of about 5335 digits",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config({**paths_data(tmp_path), "watch": {"rescan_seconds": 10**400}}, tmp_path)
    assert info.value.problems == ["watch.rescan_seconds: must be a finite number, got an integer of about 401 digits"]


def test_odd_unknown_keys_are_quoted_on_their_parent(tmp_path: Path) -> None:
    text = MINIMAL_PATHS + '"key: with\\nbreak": 1\n' + "batch: {'a b': 1, 1.5: 2, null: 3, max-wait: 4}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    sections = "paths, watch, batch, model, input, output, pipeline, logging, state, metrics, http, profiles"
    assert info.value.problems == [
        f"{path}: unknown key 'key: with\\nbreak' at the top level (expected one of: {sections})",
        "batch: unknown key 'a b' (expected one of: size, max_wait_ms)",
        "batch: unknown key 1.5 (expected one of: size, max_wait_ms)",
        "batch: unknown key null (expected one of: size, max_wait_ms)",
        "batch.max-wait: unknown key; did you mean 'max_wait_ms'?",
    ]


def test_lone_surrogates_are_not_text(tmp_path: Path) -> None:
    text = 'paths: {inbox: "\\ud800", outbox: o, errors: e, done: null}\nmodel: {name: "a\\udcff"}\n'
    problems = problems_of(tmp_path, text)
    assert problems == [
        "paths.inbox: must be valid Unicode text, got '\\ud800'",
        "model.name: must be valid Unicode text, got 'a\\udcff'",
    ]


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("pipeline: {workers: 5000}", "pipeline.workers: must be at most 1024, got 5000"),
        ("pipeline: {max_in_flight: 1000000}", "pipeline.max_in_flight: must be at most 100000, got 1000000"),
        ("input: {max_pixels: 10000000000000}", "input.max_pixels: must be at most 1000000000000, got 10000000000000"),
    ],
)
def test_counts_have_an_upper_bound(tmp_path: Path, snippet: str, expected: str) -> None:
    assert problems_of(tmp_path, MINIMAL_PATHS + snippet + "\n") == [expected]
