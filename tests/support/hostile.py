"""Making hostile entries (sockets, FIFOs) and proving that nothing opened a folder's files."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
from pathlib import Path
from typing import Iterator, List, Tuple

IN_ACCESS = 0x00000001
IN_OPEN = 0x00000020
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


def make_socket(path: Path) -> Path:
    """A UNIX socket at `path` (its full path may exceed the 108-byte limit of bind)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(here)
    return path


class OpenWatch:
    """inotify on folders: records every open (and read) of the folders or of the files in
    them, by anyone. Events are read only when asked, so the watch itself opens nothing."""

    def __init__(self, folders: List[Path]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._folders = {}
        for folder in folders:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", str(folder))
            self._folders[wd] = folder

    def events(self) -> List[Tuple[Path, str]]:
        """(path opened or read, 'open'/'access') since the watch began."""
        found = []
        for wd, mask, name in self._read():
            where = self._folders.get(wd, Path("?"))
            found.append((where / name if name else where, "open" if mask & IN_OPEN else "access"))
        return found

    def _read(self) -> Iterator[Tuple[int, int, str]]:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                yield wd, mask, os.fsdecode(raw.rstrip(b"\0"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
