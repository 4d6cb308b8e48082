"""`rmbgd process`: end to end as a real subprocess, real files, the tiny model loaded like
BiRefNet (the command line, its JSON log, the terminal, signals, the model options); what a
run does with the files, in-process with the fake model (tests/support/oneshot.py, faster)."""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
from PIL import Image

from rmbgd.output.fsops import OwnerLock, write_temp
from rmbgd.runtime.oneshot import default_owner
from tests.support.daemon import REPO, subprocess_env, write_config
from tests.support.hostile import OpenWatch
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.oneshot import process_inprocess
from tests.support.photos import check_output, interior, pattern, save
from tests.support.tinymodel import expected_alpha

TIMEOUT = 180  # seconds for one run: torch's import alone takes a while on a busy machine


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code = code
        self.stdout = stdout.decode("utf-8", "replace")
        self.stderr = stderr.decode("utf-8", "replace")
        self.records = [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def events(self, name: str) -> List[dict]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def summary(self) -> dict:
        (summary,) = self.events("summary")
        return summary

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


class Runs:
    """Starts `rmbgd process` and guarantees every child is gone when the test ends."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.procs: List[subprocess.Popen] = []

    def start(self, *args, **popen) -> subprocess.Popen:
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rmbgd", "process", *map(str, args)],
            stdin=subprocess.DEVNULL, env=self.env, cwd=str(REPO), **popen,
        )
        self.procs.append(proc)
        return proc

    def run(self, *args, timeout: float = TIMEOUT) -> Result:
        proc = self.start(*args)
        stdout, stderr = proc.communicate(timeout=timeout)
        return Result(proc.returncode, stdout, stderr)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def runs(hf_home):
    pool = Runs(subprocess_env(hf_home))
    yield pool
    pool.cleanup()


@pytest.fixture
def config(tmp_path, tiny_model) -> Path:
    """A config made for `process` alone: no paths section, small model input for speed."""
    return write_config(tmp_path / "process.yaml", settings(tiny_model))


@pytest.fixture
def fake_config(tmp_path) -> Path:
    """The same settings for an in-process run, whose model is the fake one."""
    return write_config(tmp_path / "process.yaml", settings("fake-segmenter"))


def settings(model: Path, **sections) -> dict:
    data = {
        "batch": {"size": 4, "max_wait_ms": 50},
        "model": {"name": str(model), "device": "cpu", "input_size": 64},
        "pipeline": {"workers": 2},
    }
    data.update(sections)
    return data


def tree(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- results


def test_folders_and_files_mirrored_with_known_masks(fake_config, tmp_path):
    photos = tmp_path / "photos"
    sources = {
        "a.png": save(pattern(120, 90, (0.1, 0.1, 0.5, 0.6)), photos / "a.png"),
        "sub/b.bmp": save(pattern(90, 160, (0.2, 0.5, 0.8, 0.95)), photos / "sub" / "b.bmp"),
        "sub/deeper/c.tiff": save(pattern(100, 100, (0.0, 0.0, 0.4, 0.4)), photos / "sub" / "deeper" / "c.tiff"),
    }
    # Hidden names, hidden folders and partial downloads are not inputs.
    save(pattern(40, 40, (0, 0, 1, 1)), photos / ".hidden.png")
    save(pattern(40, 40, (0, 0, 1, 1)), photos / ".cache" / "x.png")
    (photos / "sub" / "late.jpg.part").write_bytes(b"still downloading")
    single_rgb = pattern(64, 48, (0.5, 0.0, 1.0, 1.0))
    single = save(single_rgb, tmp_path / "elsewhere" / "single.png")
    before = snapshot(photos)
    out = tmp_path / "out"

    result = process_inprocess(photos, single, out=out, config=fake_config)

    assert result.code == 0, result
    assert tree(out) == {"a.png", "sub/b.png", "sub/deeper/c.png", "single.png"}
    for rel, path in sources.items():
        with Image.open(path) as im:
            check_output(out / Path(rel).with_suffix(".png"), np.asarray(im.convert("RGB")))
    check_output(out / "single.png", single_rgb)
    assert snapshot(photos) == before, "inputs must be left exactly as they were"
    assert single.exists()


def test_json_log_when_not_a_terminal(runs, config, tmp_path):
    photos = tmp_path / "photos"
    for i in range(5):
        save(pattern(50, 50, (0.1 * i, 0.1, 0.6, 0.9)), photos / f"p{i}.png")
    out = tmp_path / "out"

    result = runs.run(photos, "--out", out, "--config", config)

    assert result.code == 0, result
    assert result.stderr == "", "nothing may bypass the JSON log"
    for record in result.records:
        assert {"timestamp", "level", "event"} <= set(record)
    done = result.events("file_done")
    assert {Path(r["input"]) for r in done} == {photos / f"p{i}.png" for i in range(5)}
    for record in done:
        assert Path(record["output"]) == out / Path(record["input"]).name
        assert record["original"] == record["input"], "the original stays where it was"
        for key in ("ms", "decode_ms", "infer_ms", "encode_ms", "write_ms", "width", "height"):
            assert key in record, key
    sizes = [r["size"] for r in result.events("batch_done")]
    assert sum(sizes) == 5 and all(1 <= s <= 4 for s in sizes)
    assert result.records[-1]["event"] == "summary"
    summary = result.summary
    assert (summary["processed"], summary["failed"], summary["total"]) == (5, 0, 5)
    assert summary["seconds"] > 0 and summary["interrupted"] is False
    assert summary["out"] == str(out)
    noisy = [r for r in result.records if r["level"] not in ("info", "debug")]
    assert noisy == [], "a clean run logs no warnings or errors"


def test_broken_file_fails_alone_and_stays_in_place(fake_config, tmp_path):
    photos = tmp_path / "photos"
    good = {name: pattern(60, 40, box) for name, box in (("g1.png", (0.1, 0.1, 0.6, 0.9)), ("g2.png", (0.5, 0, 1, 1)))}
    for name, rgb in good.items():
        save(rgb, photos / name)
    broken = photos / "sub" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + os.urandom(512))
    data = broken.read_bytes()
    out = tmp_path / "out"

    result = process_inprocess(photos, out=out, config=fake_config)

    assert result.code == 1, result
    (failed,) = result.events("file_failed")
    assert Path(failed["input"]) == broken and failed["stage"] == "decode" and failed["error"]
    assert Path(failed["moved_to"]) == broken, "a failed input is not moved anywhere"
    assert broken.read_bytes() == data
    for name, rgb in good.items():
        check_output(out / name, rgb)
    assert tree(out) == set(good), "no errors folder, no sidecar, no partial output"
    summary = result.summary
    assert (summary["processed"], summary["failed"], summary["total"]) == (2, 1, 3)


def test_done_moves_originals_after_success(fake_config, tmp_path):
    photos = tmp_path / "photos"
    rgb = pattern(50, 70, (0.2, 0.2, 0.8, 0.8))
    save(rgb, photos / "a" / "one.png")
    save(rgb, photos / "two.png")
    (photos / "bad.png").write_bytes(b"not an image")
    out, done = tmp_path / "out", tmp_path / "done"

    result = process_inprocess(photos, out=out, done=done, config=fake_config)

    assert result.code == 1, result
    assert tree(done) == {"a/one.png", "two.png"}
    assert tree(photos) == {"bad.png"}, "only the failed input stays"
    check_output(out / "a" / "one.png", rgb)
    check_output(out / "two.png", rgb)
    originals = {Path(r["original"]) for r in result.events("file_done")}
    assert originals == {done / "a" / "one.png", done / "two.png"}
    assert result.summary["done"] == str(done)


def test_profiles_and_output_format_apply_per_subfolder(tmp_path):
    photos = tmp_path / "photos"
    rgb = pattern(80, 60, (0.25, 0.2, 0.75, 0.8))
    save(rgb, photos / "shop" / "x.png")
    save(rgb, photos / "plain" / "y.png")
    save(rgb, photos / "plain" / "y.bmp")  # same stem: the second pair is named y-1.*
    cfg = write_config(
        tmp_path / "formats.yaml",
        settings(
            "fake-segmenter",
            output={"format": "webp"},
            profiles=[{"match": "plain/", "output": {"format": "png", "mask": True}}],
        ),
    )
    out = tmp_path / "out"

    result = process_inprocess(photos, out=out, config=cfg)

    assert result.code == 0, result
    assert tree(out) == {"shop/x.webp", "plain/y.png", "plain/y.mask.png", "plain/y-1.png", "plain/y-1.mask.png"}
    want = expected_alpha(rgb)
    inside = interior(want, 8)
    with Image.open(out / "shop" / "x.webp") as im:
        assert im.format == "WEBP" and im.mode == "RGBA" and im.size == (80, 60)
        alpha = np.asarray(im)[..., 3].astype(np.int16)
    assert np.abs(alpha - want)[inside].max() <= 3
    for stem in ("y", "y-1"):
        check_output(out / "plain" / f"{stem}.png", rgb)
        with Image.open(out / "plain" / f"{stem}.mask.png") as im:
            assert im.mode == "L"
            assert np.abs(np.asarray(im).astype(np.int16) - want)[inside].max() <= 3
    also = {Path(r["output"]).name: [Path(p).name for p in r.get("also", [])] for r in result.events("file_done")}
    assert also["y.png"] == ["y.mask.png"] and also["y-1.png"] == ["y-1.mask.png"] and also["x.webp"] == []


def test_daemon_config_folders_are_ignored_and_write_failures_end(tmp_path):
    """A daemon's config works as is (its folders untouched); a result that cannot be written
    fails after a few tries instead of being retried forever."""
    daemon_paths = {key: str(tmp_path / key) for key in ("inbox", "outbox", "errors", "done")}
    cfg = write_config(tmp_path / "daemon.yaml", settings("fake-segmenter", paths=daemon_paths))
    photos = tmp_path / "photos"
    rgb = pattern(40, 40, (0, 0, 0.5, 1))
    save(rgb, photos / "ok.png")
    save(rgb, photos / "blocked" / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the output folder should be")

    result = process_inprocess(photos, out=out, config=cfg)

    assert result.code == 1, result
    check_output(out / "ok.png", rgb)
    (failed,) = result.events("file_failed")
    assert failed["stage"] == "write" and "tried 3 times" in failed["error"]
    assert len(result.events("file_retry")) == 2
    assert (photos / "blocked" / "x.png").exists()
    assert not any((tmp_path / key).exists() for key in daemon_paths)


def test_regression_process_never_reads_a_symlink_target(fake_config, tmp_path):
    # Finding 3: a link given on the command line or found in a folder was decoded through.
    secret_dir = tmp_path / "secret"
    secret = save(pattern(37, 29, (0.0, 0.0, 1.0, 1.0)), secret_dir / "secret.png")
    before = (secret.read_bytes(), os.stat(secret).st_mtime_ns)
    photos = tmp_path / "photos"
    rgb = pattern(80, 60, (0.2, 0.2, 0.8, 0.8))
    save(rgb, photos / "ok.png")
    (photos / "link.png").symlink_to(secret)
    given = tmp_path / "given.png"
    given.symlink_to(secret)
    out = tmp_path / "out"
    watch = OpenWatch([secret_dir])
    try:
        result = process_inprocess(photos, given, out=out, config=fake_config)
        opened = watch.events()
    finally:
        watch.close()

    assert result.code == 1, result
    assert opened == [], "a link's target was opened"
    assert tree(out) == {"ok.png"}, "nothing published from a link"
    check_output(out / "ok.png", rgb)
    failed = {Path(r["input"]).name: r for r in result.events("file_failed")}
    assert set(failed) == {"link.png", "given.png"}
    assert all(r["stage"] == "detect" and r["error"].startswith("symbolic link") for r in failed.values())
    assert (secret.read_bytes(), os.stat(secret).st_mtime_ns) == before
    assert os.readlink(given) == str(secret) and os.readlink(photos / "link.png") == str(secret)


def test_regression_daemon_start_keeps_the_temps_of_a_running_process(inprocess, folders):
    # Finding 8: `rmbgd process` temps have no work folder, so a starting daemon took them
    # for a dead owner's and deleted them mid-publish. Its OwnerLock (held here, in-test,
    # as a running `rmbgd process --out outbox/batch` holds it) now keeps them.
    batch = folders.outbox / "batch"
    (batch / "sub").mkdir(parents=True)
    owner = default_owner()
    with OwnerLock([batch], owner):
        live = write_temp(b"being published", batch / "sub", owner)
        crashed = write_temp(b"left by a crashed run", folders.outbox, "process-elsewhere-1")
        daemon = inprocess.start()
        (recovered,) = daemon.events("recovered")
        assert live.exists(), "a running process's temp survives a daemon start"
        assert not crashed.exists(), "a dead one's does not"
        assert recovered["temp_files_removed"] == 1
        assert daemon.stop() == 0


# --------------------------------------------------------------------------- terminal


def test_progress_bar_and_summary_on_a_terminal(runs, config, tmp_path):
    photos = tmp_path / "photos"
    for i in range(6):
        save(pattern(48, 48, (0.2, 0.2, 0.8, 0.8)), photos / f"p{i}.png")
    (photos / "junk.png").write_bytes(b"junk")
    out = tmp_path / "out"
    master, slave = pty.openpty()
    try:
        proc = runs.start(photos, "--out", out, "--config", config, stderr=slave)
    finally:
        os.close(slave)
    screen = read_terminal(master, proc)

    assert proc.returncode == 1, screen
    assert proc.stdout.read() == b"", "no JSON on a terminal"
    assert "\r" in screen and "7/7" in screen and "images/s" in screen, screen
    assert f"failed: {photos / 'junk.png'}" in screen and "(stage: decode)" in screen, screen
    assert "Processed 6 of 7 files" in screen, screen
    assert "1 failed" in screen and str(out) in screen, screen
    assert "{" not in screen, "no JSON on the terminal"
    assert len(tree(out)) == 6


def test_json_option_keeps_the_log_on_a_terminal_and_model_options_need_no_config(runs, tiny_model, tmp_path):
    rgb = pattern(40, 40, (0, 0, 0.5, 1))
    path = save(rgb, tmp_path / "one.png")
    master, slave = pty.openpty()
    try:
        proc = runs.start(path, "--out", tmp_path / "out", "--model", tiny_model, "--device", "cpu", "--json",
                          stderr=slave)
    finally:
        os.close(slave)
    screen = read_terminal(master, proc)
    assert proc.returncode == 0, screen
    assert screen == ""
    records = [json.loads(line) for line in proc.stdout.read().decode().splitlines()]
    assert records[-1]["event"] == "summary" and records[-1]["processed"] == 1
    (ready,) = [r for r in records if r["event"] == "ready"]
    assert ready["model"] == str(tiny_model) and ready["device"] == "cpu"
    check_output(tmp_path / "out" / "one.png", rgb)


def read_terminal(master: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """Everything written to the pseudo-terminal until the process exits."""
    chunks: List[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
        reader.join(10)
    finally:
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


# --------------------------------------------------------------------------- signals


def test_interrupt_finishes_files_in_flight_and_exits_130(runs, slow_model, tmp_path):
    photos = tmp_path / "photos"
    for i in range(30):
        save(pattern(40, 40, (0, 0, 0.5, 0.5)), photos / f"p{i:02d}.png")
    cfg = write_config(
        tmp_path / "slow.yaml",
        settings(slow_model, batch={"size": 1, "max_wait_ms": 0}, pipeline={"workers": 1}),
    )
    out = tmp_path / "out"
    proc = runs.start(photos, "--out", out, "--config", cfg)
    lines = follow(proc)
    wait_for_event(lines, "file_done")
    proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
    records = [json.loads(line) for line in drain(lines)]

    assert code == 130
    summary = records[-1]
    assert summary["event"] == "summary" and summary["interrupted"] is True
    assert summary["processed"] >= 1 and summary["unfinished"] > 0
    assert summary["processed"] + summary["failed"] + summary["unfinished"] == 30
    assert any(r["event"] == "stopping" for r in records)
    # Everything started before the signal was finished and written; nothing was moved.
    assert len(tree(out)) == summary["processed"] and summary["failed"] == 0
    assert len(tree(photos)) == 30


def follow(proc: subprocess.Popen) -> "queue.Queue[Optional[str]]":
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump() -> None:
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_event(lines: "queue.Queue[Optional[str]]", event: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"exited before {event!r}"
        record = json.loads(line)
        if record["event"] == event:
            return record


def drain(lines: "queue.Queue[Optional[str]]", timeout: float = 30) -> List[str]:
    found = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            return found
        found.append(line)


# --------------------------------------------------------------------------- memory


class _Silent:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CountingPipeline:
    """Stands in for the pipeline: finishes jobs one at a time and records the most in flight."""

    peak = 0

    def __init__(self, cfg, segmenter, publisher, counters, log, on_finished, stages) -> None:
        self._counters = counters
        self._on_finished = on_finished
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job) -> None:
        type(self).peak = max(type(self).peak, self._counters.in_flight)
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            time.sleep(0.001)
            self._counters.finished(ok=True)
            self._on_finished(job)

    def model_alive(self) -> bool:
        return True

    def stop_intake(self) -> None:
        self._jobs.put(None)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def test_never_more_files_in_flight_than_configured(monkeypatch, tmp_path):
    # In-process with a stand-in pipeline: 300 inputs must never be decoded all at once.
    from rmbgd.runtime import daemon, oneshot
    from rmbgd.config import parse_config

    monkeypatch.setattr(oneshot, "Pipeline", _CountingPipeline)
    monkeypatch.setattr(daemon, "load_model", lambda cfg, log: type("Seg", (), {"device": "cpu", "dtype": "float32"})())
    cfg = parse_config(
        {"paths": {"inbox": ".", "outbox": ".", "errors": ".", "done": None},
         "batch": {"size": 2}, "pipeline": {"workers": 1, "max_in_flight": 5}},
        tmp_path,
    )
    sources = [oneshot.Source(Path(f"{i}.png"), tmp_path / f"{i}.png", f"{i}.png") for i in range(300)]
    work = oneshot.Plan(sources=sources, out=tmp_path / "out", done=None)

    code = oneshot.Runner(cfg, work, _Silent(), oneshot.Report()).run()

    assert code == 0
    assert 1 <= _CountingPipeline.peak <= 5


# --------------------------------------------------------------------------- usage


def test_missing_input_is_a_usage_error_before_the_model_loads(tmp_path):
    # In-process run of the CLI in a fresh interpreter: torch must never have been imported.
    code = (
        "import sys\n"
        "from rmbgd.cli import main\n"
        f"rc = main(['process', {str(tmp_path / 'nope.jpg')!r}, '--out', {str(tmp_path / 'out')!r}])\n"
        "assert 'torch' not in sys.modules, 'the model was about to load'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert result.returncode == 2, result
    assert "no such file or folder" in result.stderr and "nope.jpg" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "the following arguments are required: --out"),
        (("--out", "{photos}/results"), "must not be inside the input folder"),
        (("--out", "{photos}"), "must not be inside the input folder"),
        (("--out", "{tmp}/out", "--done", "{photos}/done"), "--done"),
        (("--out", "{photos}/a.png"), "exists and is not a folder"),
        (("--out", "{tmp}/out", "--device", "gpu"), "--device: expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_usage_errors_exit_2(runs, tmp_path, args, message):
    photos = tmp_path / "photos"
    save(pattern(20, 20, (0, 0, 1, 1)), photos / "a.png")
    filled = [a.format(photos=photos, tmp=tmp_path) for a in args]
    result = runs.run(photos, *filled, timeout=60)
    assert result.code == 2, result
    assert message in result.stdout + result.stderr, result
    assert not (photos / "results").exists() and not (photos / "done").exists()


def test_config_error_exit_2(runs, tmp_path):
    photos = tmp_path / "photos"
    save(pattern(20, 20, (0, 0, 1, 1)), photos / "a.png")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch:\n  size: eight\n")
    result = runs.run(photos, "--out", tmp_path / "out", "--config", cfg, timeout=60)
    assert result.code == 2, result
    (failed,) = result.events("startup_failed")
    assert failed["error"] == "batch.size: expected an integer, got 'eight'"
    assert not (tmp_path / "out").exists(), "nothing is created for a run that cannot start"


def test_help():
    result = subprocess.run(
        [sys.executable, "-m", "rmbgd", "process", "--help"],
        capture_output=True, text=True, cwd=str(REPO), timeout=60,
    )
    assert result.returncode == 0
    for option in ("PATH", "--out", "--config", "--model", "--device", "--done", "--json"):
        assert option in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "rmbgd", "--help"], capture_output=True, text=True, cwd=str(REPO), timeout=60
    )
    assert "process" in top.stdout
