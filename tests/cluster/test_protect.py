"""Back-off with jitter and the request budget, on a fake clock."""

from __future__ import annotations

import asyncio

from l7proxy.cluster.protect import Backoff, TokenBucket


def test_backoff_doubles_up_to_the_cap_and_draws_below_it() -> None:
    top = Backoff(base=0.1, cap=1.0, rand=lambda: 1.0)
    assert [round(top.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    bottom = Backoff(base=0.1, cap=1.0, rand=lambda: 0.0)
    assert bottom.next() == 0.0


def test_backoff_jitter_spreads_a_herd() -> None:
    import random

    rng = random.Random(7)
    delays = [Backoff(base=1.0, cap=8.0, rand=rng.random, failures=3).next() for _ in range(1000)]
    assert 0 <= min(delays) < 0.1 and 7.9 < max(delays) <= 8.0
    # full jitter: a quarter of the herd in each quarter of the window
    quarters = [sum(q * 2 <= d < (q + 1) * 2 for d in delays) for q in range(4)]
    assert all(200 < n < 300 for n in quarters), quarters


def test_backoff_reset_starts_over() -> None:
    b = Backoff(base=0.5, cap=10.0, rand=lambda: 1.0)
    b.next(), b.next(), b.next()
    b.reset()
    assert b.next() == 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    # callers that arrive together queue one behind the other, 0.1 s apart
    assert [round(bucket.take(), 3) for _ in range(3)] == [0.1, 0.2, 0.3]
    clock.now += 1.0  # pays back the 0.3 s owed, then saves up to the burst
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    assert round(bucket.take(), 3) == 0.1


def test_bucket_bounds_the_rate_of_a_client_that_only_fails() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=20, burst=5, clock=clock)
    waits = [bucket.take() for _ in range(105)]
    assert round(waits[-1], 6) == 5.0  # 105 requests take 5 s: 5 at once, then 20 a second


def test_no_rate_means_no_limit() -> None:
    bucket = TokenBucket(rate=0, burst=0)
    assert all(bucket.take() == 0 for _ in range(1000))


async def test_acquire_waits_for_its_token() -> None:
    bucket = TokenBucket(rate=50, burst=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(bucket.acquire() for _ in range(6)))
    took = loop.time() - started
    assert 0.09 <= took < 1.0  # five waits of 0.02 s; a loaded machine may add, never take
