"""The daemon on real folders: end-to-end with a real daemon process and the tiny model loaded
like BiRefNet (`daemons`), and the behaviour that needs no process of its own with the real
daemon in-process and the tiny model's mask from a fake segmenter (`inprocess`, faster)."""

import json
import os
import shutil
import signal
import time
import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support.daemon import wait_until
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.photos import RED, check_output, pattern, save

ALL_DONE = ("file_done", "file_failed")


def decoded(path: Path) -> np.ndarray:
    """What the daemon should see: the file decoded, EXIF-oriented, as 8-bit RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


def outputs_by_input(daemon) -> dict:
    return {Path(r["input"]): Path(r["output"]) for r in daemon.events("file_done")}


def test_mix_of_images_batched_with_known_masks(daemons, folders, tmp_path):
    log_path = tmp_path / "log" / "rmbgd.jsonl"
    daemon = daemons.start(logging={"file": str(log_path)})
    inbox = folders.inbox
    sources = {}
    # Different sizes, boxes and formats in one burst: a batch mix-up or a wrong resize shows
    # up as a wrong alpha in some output.
    specs = [
        ("a.png", 120, 90, (0.1, 0.1, 0.5, 0.6), "PNG", {}),
        ("b.jpg", 200, 100, (0.5, 0.2, 0.9, 0.9), "JPEG", {"quality": 95}),
        ("sub/c.webp", 90, 160, (0.2, 0.5, 0.8, 0.95), "WEBP", {"lossless": True}),
        ("sub/deeper/d.bmp", 150, 150, (0.0, 0.0, 0.4, 0.4), "BMP", {}),
        ("e.tiff", 100, 130, (0.3, 0.3, 1.0, 0.7), "TIFF", {}),
        ("f.png", 64, 64, (0.25, 0.25, 0.75, 0.75), "PNG", {}),
    ]
    staging = inbox.parent / "staging"
    for name, w, h, box, fmt, kw in specs:
        # Decoded from a copy outside the inbox: the daemon may take the file at once.
        path = save(pattern(w, h, box), staging / name, fmt, **kw)
        sources[inbox / name] = decoded(path)
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, inbox / name)
    records = daemon.wait_count(ALL_DONE, len(specs))
    assert [r for r in records if r["event"] == "file_failed"] == []
    mapping = outputs_by_input(daemon)
    for src, rgb in sources.items():
        out = mapping[src]
        rel = src.relative_to(inbox)
        assert out == folders.outbox / rel.with_suffix(".png")
        check_output(out, rgb)
        assert (folders.done / rel).exists(), "original should be moved to done/"
        assert not src.exists()
    for record in daemon.events("file_done"):
        for key in ("ms", "decode_ms", "infer_ms", "encode_ms", "write_ms", "timestamp", "level"):
            assert key in record, key
    sizes = [r["size"] for r in daemon.events("batch_done")]
    assert sum(sizes) == len(specs) and all(isinstance(s, int) and 1 <= s <= 4 for s in sizes)

    assert daemon.stop() == 0
    assert daemon.events("stopping") and daemon.events("stopped")
    assert daemon.non_json == [], "every stdout line must be JSON"
    assert daemon.stderr_lines == [], "nothing may bypass the JSON log"
    noisy = [r for r in daemon.records if r["level"] not in ("info", "debug")]
    assert noisy == [], "a clean run logs no warnings or errors"
    for record in daemon.records:
        assert {"timestamp", "level", "event"} <= set(record)
        assert record["timestamp"].endswith(("Z", "+00:00"))
    # logging.file holds what stdout got, line for line.
    in_file = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert "ready" in in_file and in_file[-1] == "stopped"
    assert in_file == [r["event"] for r in daemon.records]
    # Nothing of ours is left behind in the inbox or the outbox.
    assert not [p for p in folders.outbox.rglob("*") if p.name.startswith(".")]
    assert [p for p in inbox.rglob("*") if p.is_file() and ".rmbgd" not in p.parts] == []


def test_exif_orientation_and_input_modes(inprocess, folders, tmp_path):
    daemon = inprocess.start()
    inbox = folders.inbox
    base = pattern(80, 50, (0.0, 0.0, 0.3, 0.5))  # asymmetric, so a missed rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    made = {}
    made["rot.png"] = save(base, inbox / "rot.png", "PNG", exif=exif.tobytes())
    gray = np.where(base[..., 0:1] == RED[0], 230, 10).astype(np.uint8)[..., 0]
    Image.fromarray(gray).save(inbox / "gray.png")
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(inbox / "pal.png")
    Image.fromarray(base).convert("CMYK").save(inbox / "cmyk.tiff")
    deep = (gray.astype(np.uint16) * 257)
    Image.fromarray(deep).save(inbox / "deep16.png")
    names = ["rot.png", "gray.png", "pal.png", "cmyk.tiff", "deep16.png"]
    records = daemon.wait_count(ALL_DONE, len(names))
    assert [r for r in records if r["event"] == "file_failed"] == []
    mapping = outputs_by_input(daemon)

    rot = Image.open(mapping[inbox / "rot.png"])
    assert rot.size == (50, 80), "EXIF orientation must be applied"
    check_output(mapping[inbox / "rot.png"], np.rot90(base, k=-1))
    check_output(mapping[inbox / "gray.png"], np.repeat(gray[..., None], 3, axis=2))
    check_output(mapping[inbox / "deep16.png"], np.repeat(gray[..., None], 3, axis=2))
    with Image.open(folders.done / "pal.png") as im:
        check_output(mapping[inbox / "pal.png"], np.asarray(im.convert("RGB")))
    with Image.open(folders.done / "cmyk.tiff") as im:
        check_output(mapping[inbox / "cmyk.tiff"], np.asarray(im.convert("RGB")))
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions but is tiny on disk (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_inputs_go_to_errors_while_good_ones_succeed(inprocess, folders):
    daemon = inprocess.start()
    inbox = folders.inbox
    good_rgb = pattern(60, 40, (0.1, 0.1, 0.6, 0.9))
    save(good_rgb, inbox / "good.png", "PNG")
    jpeg = inbox.parent / "full.jpg"
    save(pattern(120, 90, (0.2, 0.2, 0.8, 0.8)), jpeg, "JPEG")
    blob = jpeg.read_bytes()
    bad = {
        "empty.jpg": b"",
        "notes.txt": b"just some text\n",
        "trunc.jpg": blob[: len(blob) // 2],
        "bomb.png": _png_header_only(30000, 30000),
        "sub/garbage.png": os.urandom(2048),
    }
    for name, data in bad.items():
        path = inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name)
        tmp.write_bytes(data)
        tmp.rename(path)
    records = daemon.wait_count(ALL_DONE, len(bad) + 1)
    failed = {Path(r["input"]).relative_to(inbox).as_posix(): r for r in records if r["event"] == "file_failed"}
    assert set(failed) == set(bad)
    for name, data in bad.items():
        record = failed[name]
        assert record["stage"] == "decode"
        moved = folders.errors / name
        assert Path(record["moved_to"]) == moved
        assert moved.read_bytes() == data, "failed input must be moved byte-for-byte unchanged"
        sidecar = json.loads((folders.errors / (name + ".error.json")).read_text())
        assert sidecar["input"] == str(inbox / name)
        assert sidecar["stage"] == "decode"
        assert sidecar["error"] and sidecar["error"] == record["error"]
        assert "T" in sidecar["time"]
        assert not (inbox / name).exists()
    assert "max_pixels" in failed["bomb.png"]["error"]
    assert "empty" in failed["empty.jpg"]["error"]
    check_output(folders.outbox / "good.png", good_rgb)
    assert daemon.alive(), "the daemon keeps running"
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_startup_scan_and_delete_originals(inprocess, folders):
    inbox = folders.inbox
    rgb = pattern(70, 70, (0.3, 0.3, 0.9, 0.9))
    for i in range(3):
        save(rgb, inbox / f"old{i}.png", "PNG")
    daemon = inprocess.start(paths={"done": None})
    records = daemon.wait_count(ALL_DONE, 3)
    assert all(r["event"] == "file_done" for r in records)
    for i in range(3):
        check_output(folders.outbox / f"old{i}.png", rgb)
        assert not (inbox / f"old{i}.png").exists()
    assert all(r["original"] == "deleted" for r in records)
    assert not folders.done.exists() or not any(folders.done.iterdir())
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_name_collisions_never_overwrite(inprocess, folders):
    daemon = inprocess.start()
    inbox = folders.inbox
    one = pattern(60, 60, (0.0, 0.0, 0.5, 0.5))
    two = pattern(60, 60, (0.5, 0.5, 1.0, 1.0))
    save(one, inbox / "x.png", "PNG")
    save(two, inbox / "x.bmp", "BMP")
    daemon.wait_count(ALL_DONE, 2)
    mapping = outputs_by_input(daemon)
    assert {mapping[inbox / "x.png"].name, mapping[inbox / "x.bmp"].name} == {"x.png", "x-1.png"}
    check_output(mapping[inbox / "x.png"], one)
    check_output(mapping[inbox / "x.bmp"], two)
    # The same name dropped again later gets a new output too, never replacing the first.
    three = pattern(60, 60, (0.0, 0.5, 1.0, 1.0))
    save(three, inbox / "x.png", "PNG")
    daemon.wait_count(ALL_DONE, 3)
    third = outputs_by_input(daemon)[inbox / "x.png"]
    assert third.name == "x-2.png"
    check_output(third, three)
    check_output(mapping[inbox / "x.png"], one)
    assert (folders.done / "x.png").exists() and (folders.done / "x-1.png").exists()
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_real_writers_rename_copy_and_slow_writer(inprocess, folders, tmp_path):
    daemon = inprocess.start(watch={"settle_seconds": 0.3, "writer_timeout_seconds": 60})
    inbox = folders.inbox
    rgb = pattern(100, 80, (0.2, 0.1, 0.7, 0.9))
    staged = save(rgb, tmp_path / "staged.png", "PNG")
    data = staged.read_bytes()

    # A partial-download name is left alone until renamed.
    part = inbox / "dl.png.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    # cp: created, written, closed.
    shutil.copyfile(staged, inbox / "copied.png")
    daemon.wait_for("file_done", lambda r: r["input"].endswith("copied.png"))
    assert part.exists(), "a *.part file must not be touched"
    part.rename(inbox / "dl.png")
    daemon.wait_for("file_done", lambda r: r["input"].endswith("dl.png"))

    # A writer that pauses far longer than settle_seconds while holding the file open.
    slow = inbox / "slow.png"
    with open(slow, "wb") as fh:
        fh.write(data[:100])
        fh.flush()
        os.fsync(fh.fileno())
        time.sleep(2.0)  # the writer's pause, the scenario itself: 6x settle_seconds
        # A barrier, not a longer sleep: once a file dropped after the pause is done, the
        # daemon has judged slow.png with the whole pause behind it (a claim would have
        # moved it out of the inbox by then).
        shutil.copyfile(staged, inbox / "after-the-pause.png")
        daemon.wait_for("file_done", lambda r: r["input"].endswith("after-the-pause.png"))
        assert slow.exists(), "a paused writer's file must not be claimed"
        assert daemon.events("file_failed") == [], "a paused writer's file must not be rejected"
        assert not (folders.outbox / "slow.png").exists()
        fh.write(data[100:])
    record = daemon.wait_for("file_done", lambda r: r["input"].endswith("slow.png"))
    check_output(Path(record["output"]), rgb)
    for name in ("copied.png", "dl.png", "after-the-pause.png"):
        check_output(folders.outbox / name, rgb)
    assert daemon.events("file_failed") == []
    assert len(daemon.events("file_done")) == 4
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_symlinks_are_never_followed(inprocess, folders, tmp_path):
    outside_file = save(pattern(40, 40, (0, 0, 1, 1)), tmp_path / "outside" / "precious.png", "PNG")
    outside_dir = tmp_path / "outside_dir"
    save(pattern(40, 40, (0, 0, 1, 1)), outside_dir / "inner.png", "PNG")
    before = outside_file.read_bytes()
    daemon = inprocess.start()
    inbox = folders.inbox
    (inbox / "link.png").symlink_to(outside_file)
    (inbox / "linkdir").symlink_to(outside_dir, target_is_directory=True)
    save(pattern(40, 40, (0, 0, 0.5, 0.5)), inbox / "real.png", "PNG")
    records = daemon.wait_count(ALL_DONE, 3)
    failed = {Path(r["input"]).name: r for r in records if r["event"] == "file_failed"}
    assert set(failed) == {"link.png", "linkdir"}
    assert all("symbolic link" in r["error"] for r in failed.values())
    assert (folders.errors / "link.png").is_symlink()
    assert outside_file.read_bytes() == before
    assert (outside_dir / "inner.png").exists()
    assert not (folders.outbox / "linkdir").exists()
    assert (folders.outbox / "real.png").exists()
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_sigterm_drains_and_next_start_finishes_the_rest(daemons, inprocess, folders, slow_model):
    config = daemons.config(batch={"size": 2, "max_wait_ms": 50}, model={"name": str(slow_model)})
    daemon = daemons.start(config)
    inbox = folders.inbox
    rgb = pattern(300, 300, (0.1, 0.1, 0.9, 0.5))
    total = 12
    for i in range(total):
        save(rgb, inbox / f".tmp{i}.png", "PNG")
    for i in range(total):
        (inbox / f".tmp{i}.png").rename(inbox / f"p{i:02d}.png")
    daemon.wait_for("file_done")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    assert daemon.events("stopping") and daemon.events("stopped")
    first_done = len(daemon.events("file_done"))
    assert 0 < first_done < total, "the slow model should leave work for the next start"
    # The batch in flight when the signal came was finished, not abandoned.
    batches = daemon.events("batch_done")
    assert first_done == sum(b["size"] for b in batches)

    # Every file is either finished or still safe (inbox or work area), none half-done.
    outputs = sorted(p.name for p in folders.outbox.glob("*.png"))
    assert len(outputs) == first_done
    for name in outputs:
        check_output(folders.outbox / name, rgb)

    # The next start adopts what the drained daemon left claimed; in-process, since what it
    # finds is on disk, not in the process that left it.
    second = inprocess.start(batch={"size": 2, "max_wait_ms": 50})
    second.wait_count(ALL_DONE, total - first_done, timeout=120)
    assert second.stop() == 0
    assert second.crashes() == []
    assert second.events("file_failed") == [] and second.events("file_stuck") == []
    assert first_done + len(second.events("file_done")) == total, "each file processed exactly once"
    assert sorted(p.name for p in folders.outbox.glob("*.png")) == [f"p{i:02d}.png" for i in range(total)]


def test_two_daemons_on_one_inbox_process_each_file_once(daemons, folders):
    config = daemons.config(batch={"size": 2, "max_wait_ms": 20})
    first = daemons.start(config)
    second = daemons.start(config)
    inbox = folders.inbox
    total = 16
    rgb = pattern(120, 120, (0.2, 0.2, 0.6, 0.6))
    for i in range(total):
        save(rgb, inbox / f".s{i}.png", "PNG")
    for i in range(total):
        (inbox / f".s{i}.png").rename(inbox / f"s{i:02d}.png")

    wait_until(
        lambda: len(first.events("file_done")) + len(second.events("file_done")) >= total,
        [first, second],
        timeout=120,
        what="all files processed by the two daemons",
    )
    inputs = [r["input"] for d in (first, second) for r in d.events("file_done")]
    assert sorted(inputs) == sorted(str(inbox / f"s{i:02d}.png") for i in range(total))
    assert sorted(p.name for p in folders.outbox.iterdir()) == [f"s{i:02d}.png" for i in range(total)]
    assert first.events("file_failed") == [] and second.events("file_failed") == []
    assert first.stop() == 0 and second.stop() == 0
