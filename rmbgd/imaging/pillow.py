"""Calling Pillow safely: what its parsers raise on hostile input, and its warnings kept out
of the daemon's output while any thread decodes.
"""

from __future__ import annotations

import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

_silence_lock = threading.Lock()
_silence_users = 0
_silence_context: warnings.catch_warnings | None = None


@contextmanager
def pillow_warnings_silenced() -> Iterator[None]:
    """Ignore warnings raised inside Pillow while any thread is decoding.

    Pillow warns about near-bomb sizes (we enforce our own limit), odd TIFF tags and the
    like; none of it may reach the daemon's output. ``warnings.catch_warnings`` swaps a
    process-wide filter list, so overlapping per-call uses from decoding threads would
    restore each other's state out of order and could leave a filter installed for good.
    One shared, reference-counted context avoids that, and the filter only matches
    warnings attributed to Pillow's own modules, so other threads' warnings still show.
    """
    global _silence_users, _silence_context
    with _silence_lock:
        if _silence_users == 0:
            context = warnings.catch_warnings()
            context.__enter__()
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            _silence_context = context
        _silence_users += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence_users -= 1
            if _silence_users == 0 and _silence_context is not None:
                _silence_context.__exit__(None, None, None)
                _silence_context = None


class ImageError(Exception):
    """A readable, one-line reason why this file is not a usable image (goes into the error sidecar)."""


# What Pillow's parsers and decoders raise on hostile or damaged input. TypeError is left
# out on purpose: here it would more likely be a bug of ours than a bad file.
PILLOW_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
