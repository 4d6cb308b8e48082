"""Run part of a test as an ordinary user, also when the suite runs as root (as CI does).

Permission checks mean nothing to root, so a test of "permission denied" would otherwise
skip on every CI run. As root, `as_unprivileged(fn, *args)` forks, drops to uid/gid 65534
(nobody) with no supplementary groups, runs `fn(*args)` in the child and fails the test with
the child's traceback if it raised; as anyone else it just calls `fn(*args)`.

Forked rather than started anew: the interpreter may live where nobody cannot read it
(/root/.pyenv), and a fork needs nothing from disk. For the same reason `fn` must use
modules the test process has already imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

NOBODY = 65534
_CANNOT_DROP = 77


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def folder_for_unprivileged(tmp_path: Path) -> Iterator[Path]:
    """A folder the unprivileged child may use (pytest's own tmp_path is root's, mode 0700)."""
    if not is_root():
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="rmbgd-unprivileged-"))
    try:
        os.chown(folder, NOBODY, NOBODY)
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_unprivileged(fn: Callable[..., Any], *args: Any) -> None:
    if not is_root():
        fn(*args)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
                code = _CANNOT_DROP
            else:
                try:
                    fn(*args)
                    code = 0
                except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
                    os.write(write_end, traceback.format_exc().encode("utf-8", "replace"))
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == _CANNOT_DROP:
        pytest.skip(f"running as root and cannot switch to uid {NOBODY} here: {report}")
    if code != 0:
        pytest.fail(f"as uid {NOBODY} (exit {code}):\n{report}", pytrace=False)
