"""What kind of entry a claimed path is: a regular file to decode, or a link, FIFO, socket or
device that is never opened (stage `detect`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

SYMLINK_REASON = "symbolic link: rmbgd never follows links; copy or move the file itself into the inbox"


def special_file_reason(path: Path) -> Optional[str]:
    """Why a claimed entry is no image file to open (stage `detect`); None for a regular file
    (or one that is gone: the caller finds that out when it opens it).

    Looked at with lstat only: a link's target is never read, a FIFO, socket or device never
    opened (opening one could block or have side effects).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return SYMLINK_REASON
    if stat.S_ISFIFO(mode):
        return "not a regular file (a FIFO): never opened"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket): never opened"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device node): never opened"
    return "not a regular file"


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
