"""The serving process's cyclic collector (l7proxy/proxy/heap.py, issue 14 fairness).

A full pass of the collector walks every object alive; with 10k connections
open it held the loop for ~100 ms, several times while they arrived. While a
proxy serves, full passes happen on its own schedule, not CPython's.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

from l7proxy.proxy.heap import steady_heap


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def grow_the_old_generation() -> list[list[int]]:
    """Containers that live on: what 10k open connections leave behind."""
    hoard = [[n] for n in range(300_000)]
    gc.collect(1)  # promoted past the young generations, as they would be
    return hoard


async def test_without_it_growth_starts_full_passes_by_itself() -> None:
    before = full_collections()
    hoard = grow_the_old_generation()
    assert full_collections() > before
    del hoard


async def test_while_serving_growth_starts_no_full_pass_and_the_schedule_runs_one() -> None:
    thresholds = gc.get_threshold()
    serving = asyncio.create_task(steady_heap(every=0.3))
    await asyncio.sleep(0)
    try:
        assert gc.get_freeze_count() > 0  # the start-up heap is out of sight
        before = full_collections()
        hoard = grow_the_old_generation()
        assert full_collections() == before

        await asyncio.sleep(0.5)
        assert full_collections() >= before + 1  # the scheduled pass
        del hoard
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0


async def test_a_cycle_that_grew_old_is_freed_by_the_scheduled_pass() -> None:
    class Node:
        pass

    serving = asyncio.create_task(steady_heap(every=0.2))
    await asyncio.sleep(0)
    try:
        a, b = Node(), Node()
        a.peer, b.peer = b, a  # type: ignore[attr-defined]
        gc.collect(1)  # old now
        alive = weakref.ref(a)
        del a, b
        gc.collect(1)
        assert alive() is not None  # young passes do not look at it
        await asyncio.sleep(0.4)
        assert alive() is None
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
