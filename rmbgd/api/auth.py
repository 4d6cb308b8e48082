"""The HTTP API's bearer token: read once from `http.token_file`, compared in constant time."""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass
from typing import Optional


class TokenFileError(Exception):
    """`http.token_file` cannot be used: one line saying why."""


@dataclass(frozen=True)
class Token:
    value: bytes
    # Set when other users can read the file: worth a warning at start, not a refusal
    # (a token in a world-readable file is still better than none).
    warning: Optional[str] = None


def read_token(path: str | os.PathLike[str]) -> Token:
    """The token in `path`, surrounding whitespace (a trailing newline, say) removed."""
    try:
        with open(path, "rb") as fp:
            mode = os.fstat(fp.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise TokenFileError(f"http.token_file: {path} is not a regular file")
            raw = fp.read(64 * 1024 + 1)
    except OSError as exc:
        raise TokenFileError(f"http.token_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > 64 * 1024:
        raise TokenFileError(f"http.token_file: {path} is over 64 KiB; a token is one line")
    value = raw.strip()
    if not value:
        raise TokenFileError(f"http.token_file: {path} is empty")
    if any(byte < 0x21 or byte > 0x7E for byte in value):
        raise TokenFileError(
            f"http.token_file: the token in {path} must be one word of printable ASCII (it goes in an HTTP header)"
        )
    warning = None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warning = f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return Token(value, warning)


def authorized(header: Optional[str], token: Token) -> bool:
    """Whether an Authorization header carries the token (`Bearer <token>`)."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest takes as long whatever the first differing byte: no timing oracle.
    return hmac.compare_digest(given.strip().encode("latin-1", "replace"), token.value)
