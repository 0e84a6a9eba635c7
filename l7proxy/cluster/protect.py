"""What keeps many agents from taking etcd down: back-off and a request budget.

Cilium's users met this: after an etcd restart every agent re-lists at once,
the lists time out, every agent retries at once, and etcd never recovers.
Two things break the herd, both per client:

- ``Backoff``: exponential delays with *full jitter* (a uniform draw in
  ``[0, min(cap, base * 2**n)]``), so retries spread over the window instead
  of arriving in waves;
- ``TokenBucket``: at most ``rate`` requests a second on average, ``burst`` at
  once, so a client whose every call fails still cannot send more than that.

Both take their clock and random source as arguments, so tests drive them
without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for consecutive failures: ``next()`` after each, ``reset()`` on success."""

    base: float = 0.1
    cap: float = 30.0
    rand: Callable[[], float] = field(default=random.random, repr=False)
    failures: int = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        self.failures += 1
        return float(ceiling * self.rand())

    def reset(self) -> None:
        self.failures = 0


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. ``rate <= 0``: no limit."""

    rate: float
    burst: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    tokens: float = field(init=False)
    stamp: float = field(init=False)
    waited: float = field(default=0.0, init=False)  # seconds callers spent waiting

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = self.clock()

    def take(self) -> float:
        """Take a token; returns how long the caller must wait before using it.

        The token is taken at once (the balance may go negative), so callers
        that arrive together queue behind one another in order.
        """
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        wait = 0.0 if self.tokens >= 0 else -self.tokens / self.rate
        self.waited += wait
        return wait

    async def acquire(self) -> None:
        wait = self.take()
        if wait > 0:
            await asyncio.sleep(wait)
