"""How a proxy that handed its listeners over finishes its connections.

One definition for the agent's own proxy and for each of its workers
(``run --workers``): stop accepting, let open connections finish until the
deadline, then end each one the way its protocol allows without losing a
request (``Proxy.close_when_idle``: ``Connection: close``, GOAWAY, or right
behind an answer), giving them IN_FLIGHT_GRACE to get there; what is left is cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from l7proxy.proxy.driver import ENDED_AFTER_REPLY, ENDED_BY_CLIENT, ENDED_QUIET
from l7proxy.proxy.server import Proxy

log = logging.getLogger("l7proxy.agent.drain")

# After the drain deadline, a request still in flight gets this long to finish.
IN_FLIGHT_GRACE = 5.0

# The drain report's fields (summed over workers by the agent).
DRAIN_FIELDS = ("connections", "closed_by_client", "reset_after_reply", "quiet_reset", "cut")


async def drain_proxy(proxy: Proxy, deadline: float, cut_short: asyncio.Event) -> dict[str, int]:
    """Drain ``proxy`` for up to ``deadline`` seconds (less if ``cut_short`` is set)."""
    proxy.stop_accepting()  # our fds only: the successor holds the same sockets
    at_start = proxy.connections
    await until_either(proxy.wait_all_closed(), cut_short, deadline)
    endings = proxy.close_when_idle()
    if endings and not cut_short.is_set():
        await until_either(asyncio.wait(endings), cut_short, IN_FLIGHT_GRACE)
    ended = [e.result() for e in endings if e.done()]
    cut = await proxy.close()
    quiet = ended.count(ENDED_QUIET)
    after_reply = ended.count(ENDED_AFTER_REPLY)
    by_client = ended.count(ENDED_BY_CLIENT)
    log.info(
        "drained: %d connections at handover; at the deadline %d closed by their client "
        "after being told, %d reset right behind an answer, %d quiet ones reset, %d cut",
        at_start,
        by_client,
        after_reply,
        quiet,
        cut,
    )
    return {
        "connections": at_start,
        "closed_by_client": by_client,
        "reset_after_reply": after_reply,
        "quiet_reset": quiet,
        "cut": cut,
    }


async def until_either(work: Awaitable[object], cut_short: asyncio.Event, timeout: float) -> None:
    """Wait for ``work``, until ``cut_short`` is set, or ``timeout`` seconds."""
    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(cut_short.wait())]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
