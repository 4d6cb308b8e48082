"""Filesystem calls that fail on demand: the N-th call of one kind under one folder raises
an OSError with a chosen errno, once (a transient fault) or from then on (a permanent one).

It patches the `os` functions rmbgd's file handling goes through (and `io.open`, which
pathlib's read_bytes/open use), for every thread of the test process, but acts only on paths
below the folders a test names (inside its tmp_path), so pytest and everything else are left
alone. The `faultfs` fixture installs it and undoes it (monkeypatch), whatever the test does.

Kinds of call:
    open_read   os.open/io.open of a file for reading      open_write  … for writing/creating
    open_dir    os.open(O_DIRECTORY) (fsync of a folder)   write       os.write to such a file
    fsync       os.fsync of such a file or folder          link        os.link (either path)
    rename      os.rename (either path)                    replace     os.replace (either path)
    mkdir       os.mkdir                                   unlink      os.unlink

    def test_full_outbox(faultfs, inprocess):
        daemon = inprocess.start()
        fault = faultfs.fail("write", daemon.cfg.paths.outbox / "sub", errno.ENOSPC, nth=1, times=None)
        ...
        assert fault.fired >= 1
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import pytest

KINDS = ("open_read", "open_write", "open_dir", "write", "fsync", "link", "rename", "replace", "mkdir", "unlink")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass
class Fault:
    kind: str
    under: str
    errno: int
    nth: int = 1                 # the first matching call that fails
    times: Optional[int] = 1     # how many calls fail from there; None: every one (permanent)
    calls: int = 0               # matching calls seen
    fired: int = 0               # calls made to fail
    paths: List[str] = field(default_factory=list)  # what the failed calls were about

    def matches(self, path: str) -> bool:
        return path == self.under or path.startswith(self.under + os.sep)


class FaultFS:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: List[Fault] = []
        self._real = {name: getattr(os, name) for name in ("open", "link", "rename", "replace", "mkdir", "unlink",
                                                            "write", "fsync")}
        self._real_io_open = io.open

    # -- arming -----------------------------------------------------------------------------
    def fail(self, kind: str, under: Path, err: int, nth: int = 1, times: Optional[int] = 1) -> Fault:
        """Make the `nth` call of `kind` on a path below `under` (and, for `times` calls
        after it, or all when None) raise OSError(err)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
        fault = Fault(kind, os.path.abspath(os.fspath(under)), err, nth, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- the check every patched call makes -------------------------------------------------
    def _armed(self, kind: str) -> bool:
        # Unlocked read of a list that is only ever replaced or appended to: cheap for the
        # thousands of calls no fault is about.
        return any(f.kind == kind for f in self._faults)

    def _check(self, kind: str, *paths: Any) -> None:
        names = [_name(p) for p in paths if p is not None]
        with self._lock:
            for fault in self._faults:
                if fault.kind != kind or not any(fault.matches(n) for n in names if n):
                    continue
                fault.calls += 1
                if fault.calls < fault.nth or (fault.times is not None and fault.fired >= fault.times):
                    continue
                fault.fired += 1
                fault.paths.append(names[-1])
                raise OSError(fault.errno, f"{os.strerror(fault.errno)} (injected)", names[-1])

    # -- the patched functions --------------------------------------------------------------
    def open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & getattr(os, "O_DIRECTORY", 0):
            kind = "open_dir"
        elif flags & _WRITE_FLAGS:
            kind = "open_write"
        else:
            kind = "open_read"
        if self._armed(kind):
            self._check(kind, path)
        return self._real["open"](path, flags, *args, **kwargs)

    def io_open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int):
            kind = "open_write" if any(c in mode for c in "wax+") else "open_read"
            if self._armed(kind):
                self._check(kind, file)
        return self._real_io_open(file, mode, *args, **kwargs)

    def _two(self, name: str):
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if self._armed(name):
                self._check(name, src, dst)
            return self._real[name](src, dst, *args, **kwargs)

        return call

    def _one(self, name: str):
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if self._armed(name):
                self._check(name, path)
            return self._real[name](path, *args, **kwargs)

        return call

    def _by_fd(self, name: str):
        def call(fd: int, *args: Any, **kwargs: Any) -> Any:
            if self._armed(name):
                self._check(name, _fd_path(fd))
            return self._real[name](fd, *args, **kwargs)

        return call

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(io, "open", self.io_open)
        for name in ("link", "rename", "replace"):
            monkeypatch.setattr(os, name, self._two(name))
        for name in ("mkdir", "unlink"):
            monkeypatch.setattr(os, name, self._one(name))
        for name in ("write", "fsync"):
            monkeypatch.setattr(os, name, self._by_fd(name))


def _name(path: Any) -> str:
    if isinstance(path, int):
        return _fd_path(path) or ""
    return os.path.abspath(os.fsdecode(path))


def _fd_path(fd: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@pytest.fixture
def faultfs(monkeypatch):
    """A FaultFS installed for this test only; import it into a test module."""
    fs = FaultFS()
    fs.install(monkeypatch)
    yield fs
    fs.clear()


__all__ = ["Fault", "FaultFS", "KINDS", "faultfs"]
