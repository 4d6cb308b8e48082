"""Retry delays for conditions outside rmbgd's control (a full or unmounted outbox)."""

from __future__ import annotations

FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 60.0


def retry_delay(attempt: int, first: float = FIRST_DELAY_SECONDS, cap: float = MAX_DELAY_SECONDS) -> float:
    """1 s, 2 s, 4 s, … capped at a minute: quick to notice a fixed disk, quiet while it is not."""
    if attempt < 1:
        raise ValueError("attempts count from 1")
    return min(cap, first * (2 ** (attempt - 1)))
