"""Reconnect delays: exponential backoff with full jitter (SPEC §7.3).

The ceiling doubles from `base` (1 s) up to `cap` (120 s); each delay is drawn uniformly
from [0, ceiling), so a fleet that lost its broker at the same instant does not come back
in lock-step. The ceiling falls back to `base` only after a connection stayed up for
`stable_after` seconds (30 s): a broker that accepts and then drops connections at once
keeps the delays growing.

Pure: the random source and the clock are injected, nothing sleeps here.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        base: float = 1.0,
        cap: float = 120.0,
        stable_after: float = 30.0,
        *,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._random = random
        self._clock = clock
        self._attempt = 0
        self._connected_at: float | None = None

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2**self._attempt)

    def next_delay(self) -> float:
        """The delay before the next connection attempt; each call raises the ceiling."""
        delay = self._random() * self.ceiling()
        if self.ceiling() < self.cap:
            self._attempt += 1
        return delay

    def connected(self) -> None:
        self._connected_at = self._clock()

    def disconnected(self) -> None:
        if self._connected_at is not None and self._clock() - self._connected_at >= self.stable_after:
            self._attempt = 0
        self._connected_at = None
