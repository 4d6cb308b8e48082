"""Files per second over a sliding window, and the backlog's ETA from it (injected clock)."""

from __future__ import annotations

import collections
import time
from typing import Deque, Optional, Tuple

RATE_WINDOW_SECONDS = 60.0


class RateMeter:
    """Images per second over a sliding window, from a running total of finished files."""

    def __init__(self, window_seconds: float = RATE_WINDOW_SECONDS, clock=time.monotonic) -> None:
        self.window = window_seconds
        self._clock = clock
        self._samples: Deque[Tuple[float, int]] = collections.deque()

    def add(self, total: int, now: Optional[float] = None) -> None:
        now = self._clock() if now is None else now
        self._samples.append((now, total))
        # Keep one sample older than the window, so the window is always fully covered.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> Optional[float]:
        """None until there is a second of history to judge from."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return max(0, n1 - n0) / (t1 - t0)

    def eta_seconds(self, backlog: int) -> Optional[float]:
        rate = self.rate()
        if backlog <= 0:
            return 0.0
        if not rate:
            return None
        return backlog / rate
