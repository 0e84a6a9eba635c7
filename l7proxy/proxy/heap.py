"""The serving process's heap: when the cyclic collector runs, and giving memory back.

A full pass of the cyclic collector walks every object alive, about 0.4 µs each
here. With 10,000 connections open that is ~100 ms in which no connection is
served, and CPython starts one by itself each time the old generation has grown
by a quarter: four stalls of 20-100 ms while 10k idle connections arrive. So a
serving process keeps full passes on its own schedule instead:

- what is alive at start-up (modules, parser tables, the policy) is frozen out of
  the collector's sight for good;
- the young generations are still collected automatically: they are small, and
  they are where short-lived reference cycles die;
- the old generation is collected after a burst of connections has ended (the
  heap is small again then, see ``Proxy.pipe_closed``) and every
  ``FULL_COLLECTION_EVERY`` seconds, so a cycle that got old is freed late but is
  freed.

Only the CLI's serving commands do this (``steady_heap``); a process that embeds a
proxy keeps its own collector settings.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
from collections.abc import Callable

FULL_COLLECTION_EVERY = 300.0
# The old generation's threshold while serving: never reached in practice.
NEVER = 1 << 30


async def steady_heap(every: float = FULL_COLLECTION_EVERY) -> None:
    """Run for as long as the process serves (a task; cancel it to stop): settle the
    start-up heap, take full collections off CPython's schedule, and run one each
    ``every`` seconds. Cancelled, it puts the collector back as it was."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], NEVER)
    try:
        while True:
            await asyncio.sleep(every)
            gc.collect()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def give_memory_back() -> None:
    """Many connections have ended: collect what cycles a library still makes, then
    return the free memory inside the C heap to the kernel, which malloc does not
    do by itself for memory below its top."""
    gc.collect()
    malloc_trim()


def malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: release free heap pages to the kernel (a no-op
    where the C library has no such call)."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim
