"""Hostile trees: random mixes of links, FIFOs, sockets, hard links, deep folders, long names
and files pulled away mid-claim, in the inbox and in the work folder of a dead instance,
against the real daemon (in-process, with a fake model: tests/support/inprocess.py).

What must hold whatever the mix: every ordinary image ends exactly once in outbox+done; every
link goes to errors/ as the link itself; FIFOs and sockets are left alone in the inbox
(`file_ignored`) and go to errors/ as themselves from a work folder; no link target is ever
opened, read, published, moved or changed (an inotify watch on the secret folder proves it);
hard-linked files outside keep their bytes and mtime; the daemon never crashes, stops with
exit 0 and leaves nothing in the work area.
"""

from __future__ import annotations

import json
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.hostile import OpenWatch, make_socket
from tests.support.photos import check_output, pattern, save

ALL_DONE = ("file_done", "file_failed")
DEAD = "deadhost-99999"
SECRET_SIZE = (37, 29)  # no ordinary image has this size
DEEP_LEVELS = 60


def secret_pixels() -> np.ndarray:
    # Magenta/green checks: nothing the tiny model or an ordinary test image produces.
    w, h = SECRET_SIZE
    checks = (np.indices((h, w)).sum(axis=0) % 2).astype(bool)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[checks] = (255, 0, 255)
    rgb[~checks] = (0, 255, 0)
    return rgb


@dataclass
class Secret:
    """Link targets outside the inbox, and how they looked before the run."""

    root: Path
    image: Path
    fifo: Path
    folder: Path
    before: Dict[Path, Tuple[bytes, int]] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path) -> "Secret":
        image = save(secret_pixels(), root / "secret.png", "PNG")
        fifo = root / "secret.fifo"
        os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK would hang the daemon
        folder = root / "dir"
        save(secret_pixels(), folder / "inner.png", "PNG")
        secret = cls(root, image, fifo, folder)
        for path in (image, folder / "inner.png"):
            secret.before[path] = (path.read_bytes(), os.stat(path).st_mtime_ns)
        return secret

    def assert_untouched(self) -> None:
        for path, (data, mtime) in self.before.items():
            assert path.read_bytes() == data and os.stat(path).st_mtime_ns == mtime, f"{path} changed"
        assert stat.S_ISFIFO(os.lstat(self.fifo).st_mode)
        assert sorted(os.listdir(self.root)) == ["dir", "secret.fifo", "secret.png"]
        assert os.listdir(self.folder) == ["inner.png"]


@dataclass
class Expected:
    ordinary: Dict[str, np.ndarray] = field(default_factory=dict)   # rel → pixels
    links: Dict[str, str] = field(default_factory=dict)             # rel → readlink
    special_errors: Dict[str, int] = field(default_factory=dict)    # rel → S_IFMT (from a work folder)
    ignored: Dict[Path, int] = field(default_factory=dict)          # inbox path → S_IFMT (left alone)
    outside_links: Dict[str, Tuple[Path, bytes, int]] = field(default_factory=dict)  # rel → hard-linked file outside
    pulled_away: Dict[Path, bytes] = field(default_factory=dict)     # where we moved it → bytes

    def finished_count(self) -> int:
        return len(self.ordinary) + len(self.links) + len(self.special_errors)


class TreeMaker:
    """Puts one hostile entry at a time somewhere below a root (the inbox or the dead
    instance's work folder) and books what must become of it."""

    KINDS = ("image", "hardlink", "link_file", "link_fifo", "link_dir_out", "link_dir_in",
             "dangling", "loop", "fifo", "socket", "long_name", "deep")

    def __init__(self, rng: random.Random, secret: Secret, outside: Path, expected: Expected) -> None:
        self.rng = rng
        self.secret = secret
        self.outside = outside
        self.expected = expected
        self.count = 0

    def folder(self, root: Path) -> Path:
        parts = [self.rng.choice(["a", "b", "sub dir", "ü"]) for _ in range(self.rng.randint(0, 2))]
        folder = root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def image(self) -> np.ndarray:
        w, h = self.rng.randint(90, 130), self.rng.randint(90, 130)
        left, top = self.rng.uniform(0.05, 0.3), self.rng.uniform(0.05, 0.3)
        return pattern(w, h, (left, top, left + 0.5, top + 0.5))

    def add(self, kind: str, root: Path, in_work_folder: bool) -> None:
        self.count += 1
        n = self.count
        folder = self.folder(root)
        rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
        if kind in ("image", "long_name", "deep"):
            if kind == "deep":
                folder = folder.joinpath(*[f"d{i}" for i in range(DEEP_LEVELS)])
            name = f"n{n}-" + "n" * (251 - len(f"n{n}-")) + ".png" if kind == "long_name" else f"img{n}.png"
            assert len(os.fsencode(name)) <= 255
            rgb = self.image()
            hidden = folder / ("." + name[1:])
            save(rgb, hidden, "PNG")
            hidden.rename(folder / name)
            self.expected.ordinary[rel(folder / name)] = rgb
        elif kind == "hardlink":
            rgb = self.image()
            original = save(rgb, self.outside / f"hard{n}.png", "PNG")
            path = folder / f"hard{n}.png"
            os.link(original, path)
            self.expected.ordinary[rel(path)] = rgb
            self.expected.outside_links[rel(path)] = (original, original.read_bytes(), os.stat(original).st_mtime_ns)
        elif kind == "loop":
            a, b = folder / f"loop{n}a.png", folder / f"loop{n}b.png"
            a.symlink_to(b.name)
            b.symlink_to(a.name)
            self.expected.links.update({rel(a): b.name, rel(b): a.name})
        elif kind.startswith("link") or kind == "dangling":
            target = {
                "link_file": self.secret.image,
                "link_fifo": self.secret.fifo,
                "link_dir_out": self.secret.folder,
                "dangling": self.outside / "nothing" / "here.png",
            }.get(kind)
            if kind == "link_dir_in":
                # A real folder inside the inbox, with an ordinary image in it.
                target = self.folder(root) / f"real{n}"
                self.add_image_in(target, root)
            path = folder / f"{kind}{n}.png"
            path.symlink_to(target)
            self.expected.links[rel(path)] = os.fspath(target)
        elif kind in ("fifo", "socket"):
            path = folder / f"{kind}{n}.png"
            if kind == "fifo":
                os.mkfifo(path)
            else:
                make_socket(path)
            fmt = stat.S_IFMT(os.lstat(path).st_mode)
            if in_work_folder:
                self.expected.special_errors[rel(path)] = fmt
            else:
                self.expected.ignored[path] = fmt
        else:
            raise AssertionError(kind)

    def add_image_in(self, folder: Path, root: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        rgb = self.image()
        path = save(rgb, folder / f"inside{self.count}.png", "PNG")
        self.expected.ordinary[path.relative_to(root).as_posix()] = rgb

    def mix(self) -> List[str]:
        """Every kind at least once, some more than once, in random order."""
        kinds = list(self.KINDS) + [self.rng.choice(self.KINDS) for _ in range(self.rng.randint(2, 6))]
        self.rng.shuffle(kinds)
        return kinds


def files_below(top: Path) -> Dict[str, os.stat_result]:
    """Every non-folder entry below `top` (links not followed), by relative path."""
    found = {}
    for folder, dirs, names in os.walk(top):
        # os.walk lists links to folders among the folders (and does not enter them).
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            found[path.relative_to(top).as_posix()] = os.lstat(path)
    return found


def make_dead_instance(inbox: Path) -> Path:
    dead = inbox / ".rmbgd" / "work" / DEAD
    dead.mkdir(parents=True)
    (dead / ".lock").touch()  # nobody holds it: the instance died
    return dead


def pull_away(daemon, inbox: Path, outside: Path, rng: random.Random, expected: Expected, count: int) -> None:
    """Files that vanish while the daemon is about to claim them: each either stays where we
    moved it (we won the rename) or is processed once (the daemon won)."""
    away = outside / "pulled-away"
    away.mkdir()
    dropped = []
    for i in range(count):
        rgb = pattern(96 + i, 90, (0.2, 0.2, 0.7, 0.7))
        source = save(rgb, outside / f"vanishing{i}.png", "PNG")
        path = inbox / f"vanishing{i}.png"
        os.link(source, path)  # no close event: it waits out the quiet period first
        dropped.append((path, rgb, source.read_bytes()))
    for path, rgb, data in dropped:
        daemon.next_record(rng.uniform(0.0, 0.4))
        try:
            os.rename(path, away / path.name)
        except FileNotFoundError:
            expected.ordinary[path.name] = rgb  # claimed first: it must be processed
        else:
            expected.pulled_away[away / path.name] = data


def assert_outcome(daemon, folders, expected: Expected, secret: Secret, watch: OpenWatch) -> None:
    # Nothing opened or listed anything in the secret folder: targets are never read.
    assert watch.events() == [], "a link target was opened or read"
    secret.assert_untouched()

    outputs = files_below(folders.outbox)
    wanted = {rel[: -len(Path(rel).suffix)] + ".png" for rel in expected.ordinary}
    assert set(outputs) == wanted, "exactly one output per ordinary image, nothing else"
    for rel, rgb in expected.ordinary.items():
        check_output(folders.outbox / (rel[: -len(Path(rel).suffix)] + ".png"), rgb)
    for rel in outputs:
        with Image.open(folders.outbox / rel) as im:
            assert im.size != SECRET_SIZE, f"{rel} carries the secret's pixels"

    done = files_below(folders.done)
    assert set(done) == set(expected.ordinary), "each original exactly once in done/"
    for rel, (original, data, mtime) in expected.outside_links.items():
        st = os.stat(original)
        assert original.read_bytes() == data and st.st_mtime_ns == mtime, "the other hard link is unchanged"
        assert (st.st_ino, st.st_dev) == (done[rel].st_ino, done[rel].st_dev), "done/ holds the same file"

    errors = files_below(folders.errors)
    entries = {rel: st for rel, st in errors.items() if not rel.endswith(".error.json")}
    assert set(entries) == set(expected.links) | set(expected.special_errors)
    for rel, target in expected.links.items():
        assert stat.S_ISLNK(entries[rel].st_mode) and os.readlink(folders.errors / rel) == target
    for rel, fmt in expected.special_errors.items():
        assert stat.S_IFMT(entries[rel].st_mode) == fmt, f"{rel} moved as itself"
    for rel in entries:
        sidecar = json.loads((folders.errors / (rel + ".error.json")).read_text())
        assert sidecar["stage"] == "detect", sidecar

    for path, fmt in expected.ignored.items():
        assert stat.S_IFMT(os.lstat(path).st_mode) == fmt, f"{path} left alone"
    ignored = {Path(r["input"]) for r in daemon.events("file_ignored")}
    assert set(expected.ignored) <= ignored
    for path, data in expected.pulled_away.items():
        assert path.read_bytes() == data

    failed = {r["input"] for r in daemon.events("file_failed")}
    assert len(failed) == len(daemon.events("file_failed")) == len(expected.links) + len(expected.special_errors)
    leftovers = [rel for rel, st in files_below(folders.inbox).items()
                 if not stat.S_ISFIFO(st.st_mode) and not stat.S_ISSOCK(st.st_mode)
                 and not rel.startswith(".rmbgd/state/")]  # the status file stays, by design
    assert leftovers == [], f"nothing left in the inbox or the work area: {leftovers}"
    assert [r for r in daemon.records if r.get("level") in ("error", "critical") and r["event"] != "file_failed"] == []
    assert daemon.crashes() == []


@pytest.mark.parametrize("seed", [11, 23, 47])
def test_hostile_tree(seed, inprocess, folders, tmp_path, capfd):
    rng = random.Random(seed)
    secret = Secret.make(tmp_path / "secret")
    outside = tmp_path / "outside"
    outside.mkdir()
    expected = Expected()
    maker = TreeMaker(rng, secret, outside, expected)
    folders.inbox.mkdir()
    dead = make_dead_instance(folders.inbox)
    for kind in maker.mix():
        maker.add(kind, dead, in_work_folder=True)
    later = []
    for kind in maker.mix():
        if rng.random() < 0.5:
            maker.add(kind, folders.inbox, in_work_folder=False)
        else:
            later.append(kind)
    watch = OpenWatch([secret.root, secret.folder])
    try:
        daemon = inprocess.start()
        for kind in later:
            maker.add(kind, folders.inbox, in_work_folder=False)
        pull_away(daemon, folders.inbox, outside, rng, expected, count=4)
        daemon.wait_count(ALL_DONE, expected.finished_count(), timeout=120)
        daemon.wait_until(lambda: set(expected.ignored) <= {Path(r["input"]) for r in daemon.events("file_ignored")},
                          timeout=30, what="every FIFO and socket in the inbox logged as ignored")
        # Still working after all that: a last image goes through like any other.
        rgb = pattern(100, 90, (0.3, 0.3, 0.9, 0.9))
        hidden = save(rgb, folders.inbox / ".last.png", "PNG")
        hidden.rename(folders.inbox / "last.png")
        expected.ordinary["last.png"] = rgb
        daemon.wait_for("file_done", lambda r: r["input"] == str(folders.inbox / "last.png"), timeout=60)
        assert daemon.alive(), "the daemon is still running"
        assert daemon.stop() == 0
        assert_outcome(daemon, folders, expected, secret, watch)
        out, err = capfd.readouterr()
        assert (out, err) == ("", ""), "nothing may bypass the log"
    finally:
        watch.close()


def test_regression_dead_peer_symlink_target_is_never_read(inprocess, folders, tmp_path):
    # Finding 3: a link left in a dead instance's work folder was adopted at start-up, its
    # target read and published as outbox/evil.png.
    secret = Secret.make(tmp_path / "secret")
    folders.inbox.mkdir()
    dead = make_dead_instance(folders.inbox)
    (dead / "evil.png").symlink_to(secret.image)
    (dead / "sub").mkdir()
    (dead / "sub" / "evil-fifo.png").symlink_to(secret.fifo)
    watch = OpenWatch([secret.root])
    try:
        daemon = inprocess.start()
        records = daemon.wait_count(("file_failed", "file_done"), 2, timeout=60)
        assert {(Path(r["input"]).name, r["event"], r.get("stage")) for r in records} == {
            ("evil.png", "file_failed", "detect"), ("evil-fifo.png", "file_failed", "detect")}
        assert daemon.stop() == 0
        assert watch.events() == [], "the link's target was opened"
    finally:
        watch.close()
    secret.assert_untouched()
    assert files_below(folders.outbox) == {}
    assert os.readlink(folders.errors / "evil.png") == os.fspath(secret.image)
    assert os.readlink(folders.errors / "sub" / "evil-fifo.png") == os.fspath(secret.fifo)


def test_walk_passes_over_folders_it_cannot_enter(tmp_path):
    # A tree deeper than PATH_MAX (4096 bytes) can be made with relative paths; a scan that
    # meets it must go on with the rest instead of ending the daemon's main loop.
    from rmbgd.output.fsops import walk_files

    (tmp_path / "ok.png").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        found = [entry.name for entry in walk_files(tmp_path)]
    finally:
        locked.chmod(0o755)
    assert "ok.png" in found
