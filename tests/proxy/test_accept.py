"""How the proxy takes connections off its listening socket (issue 14, fairness).

A burst of connects waits in the kernel's accept queue and is taken a batch per
turn of the event loop, so the connections already open are served in between;
and a proxy out of descriptors leaves the queue alone for a while instead of
spinning on a listener that stays readable. The queue is read with ``ss``: for a
listening socket, its Recv-Q is the number of connections waiting to be accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import resource
import socket
import subprocess
from collections.abc import Iterator

import pytest

from l7proxy.observe.flowlog import FlowLog
from l7proxy.policy.engine import compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.state import PolicyState
from l7proxy.proxy.server import (
    ACCEPT_BATCH,
    ACCEPT_RETRY_DELAY,
    Acceptor,
    Proxy,
    _run_bare,
    make_listener,
)


class Opened(asyncio.Protocol):
    """Counts the connections handed to a protocol, and closes each."""

    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Opened.count += 1
        transport.close()


def waiting_in_accept_queue(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Hltn", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    [line] = out.splitlines()
    return int(line.split()[1])


@contextlib.contextmanager
def listener_with_clients(count: int) -> Iterator[tuple[socket.socket, int]]:
    """A listening socket with ``count`` connections completed by the kernel and
    not yet accepted."""
    listener = make_listener("127.0.0.1", 0, backlog=count + 8)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        yield listener, port
    finally:
        for client in clients:
            client.close()
        listener.close()


@contextlib.contextmanager
def descriptors_limited_to(soft: int) -> Iterator[None]:
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_burst_of_connects_is_accepted_one_batch_per_turn_of_the_loop() -> None:
    Opened.count = 0
    burst = 3 * ACCEPT_BATCH + 5
    with listener_with_clients(burst) as (listener, port):
        assert waiting_in_accept_queue(port) == burst

        acceptor = Acceptor(listener, Opened)
        try:
            waiting = [burst]
            while waiting[-1]:
                await asyncio.sleep(0)  # one turn of the loop: one look at the listener
                waiting.append(waiting_in_accept_queue(port))
            taken = [before - after for before, after in itertools.pairwise(waiting)]
            assert max(taken) == ACCEPT_BATCH  # never more in one turn
            assert sum(t > 0 for t in taken) == 4  # 16, 16, 16, 5

            await until(lambda: Opened.count == burst)
        finally:
            acceptor.close()


async def test_out_of_descriptors_the_queue_waits_then_is_accepted(caplog) -> None:
    Opened.count = 0
    with listener_with_clients(4) as (listener, port):
        lowest_free = os.dup(0)  # the descriptor the next accept() would get
        os.close(lowest_free)
        with caplog.at_level(logging.WARNING, "l7proxy.proxy"):
            with descriptors_limited_to(lowest_free):  # the next accept() gets EMFILE
                acceptor = Acceptor(listener, Opened)
                await asyncio.sleep(ACCEPT_RETRY_DELAY / 2)
                assert Opened.count == 0
        # Not a warning per turn of a spinning loop: one, then a pause.
        assert [r.getMessage() for r in caplog.records] == [
            f"accept: [Errno 24] Too many open files; retrying in {ACCEPT_RETRY_DELAY:g} s"
        ]

        try:
            await until(lambda: Opened.count == 4)  # descriptors are free again
            assert waiting_in_accept_queue(port) == 0
        finally:
            acceptor.close()


async def test_closing_stops_accepting_and_closes_our_descriptor() -> None:
    Opened.count = 0
    with listener_with_clients(2) as (listener, port):
        acceptor = Acceptor(listener, Opened)
        acceptor.close()
        assert listener.fileno() == -1
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        await asyncio.sleep(0.05)
        assert Opened.count == 0


async def test_a_coroutine_run_bare_goes_on_as_each_future_it_awaits_is_done() -> None:
    # How a connection is opened without a Task: the event loop's coroutine that makes
    # its transport (and does its TLS handshake) is stepped by the futures it awaits.
    loop = asyncio.get_running_loop()
    transport_made, handshake_done = loop.create_future(), loop.create_future()
    steps: list[str] = []
    failures: list[BaseException] = []

    async def opening(then: asyncio.Future[str]) -> str:
        steps.append("started")
        steps.append(await transport_made)
        steps.append(await then)
        return "opened"

    _run_bare(opening(handshake_done), failures.append)
    assert steps == ["started"]  # at once, up to its first wait: no turn of the loop first
    transport_made.set_result("transport made")
    await asyncio.sleep(0)
    assert steps == ["started", "transport made"]
    handshake_done.set_result("handshake done")
    await asyncio.sleep(0)
    assert steps == ["started", "transport made", "handshake done"]
    assert failures == []  # its result is nobody's: the protocol was told

    # A handshake that fails: what the coroutine raises goes to ``failed``.
    steps.clear()
    transport_made, failed_handshake = loop.create_future(), loop.create_future()
    _run_bare(opening(failed_handshake), failures.append)
    transport_made.set_result("transport made")
    await asyncio.sleep(0)
    failed_handshake.set_exception(ConnectionResetError("reset in the handshake"))
    await asyncio.sleep(0)
    assert steps == ["started", "transport made"]
    assert [repr(f) for f in failures] == ["ConnectionResetError('reset in the handshake')"]

    # One that fails before it waits for anything.
    async def refused() -> None:
        raise ConnectionAbortedError("gone at once")

    _run_bare(refused(), failures.append)
    assert repr(failures[-1]) == "ConnectionAbortedError('gone at once')"


async def test_a_connection_whose_protocol_cannot_be_made_is_reported_and_the_next_opens() -> None:
    # A bug in opening one connection (here its protocol's constructor) goes to the
    # event loop's exception handler, its socket is closed, and the connections
    # accepted with it in the same batch still open.
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    faults = iter([RuntimeError("a bug in the protocol"), None, None])

    def protocol() -> asyncio.Protocol:
        fault = next(faults)
        if fault is not None:
            raise fault
        return Opened()

    Opened.count = 0
    try:
        with listener_with_clients(3) as (listener, port):
            acceptor = Acceptor(listener, protocol)
            try:
                await until(lambda: Opened.count == 2)
            finally:
                acceptor.close()
    finally:
        loop.set_exception_handler(None)
    assert [(c["message"], repr(c["exception"])) for c in reported] == [
        ("opening an accepted connection failed", "RuntimeError('a bug in the protocol')")
    ]


async def test_waiting_for_every_connection_to_close_ends_with_the_last_one() -> None:
    # The event a drain waits on is made by the first waiter (not set and cleared by
    # every connection): it must wake every waiter at the last close, and a later
    # wait must wait again for connections opened since.
    proxy = Proxy(PolicyState(compile_policy([], [], IdentityAllocator())), FlowLog(keep=10))
    await asyncio.wait_for(proxy.wait_all_closed(), 1)  # none open: at once

    first, second = object(), object()  # (pipes, as far as the proxy's set goes)
    proxy._pipes.update((first, second))
    proxy.stats.connections_active = 2
    drains = [asyncio.ensure_future(proxy.wait_all_closed()) for _ in range(2)]
    await asyncio.sleep(0.01)
    proxy.pipe_closed(first)
    await asyncio.sleep(0.01)
    assert not any(d.done() for d in drains)  # one is still open
    proxy.pipe_closed(second)
    await asyncio.wait_for(asyncio.gather(*drains), 1)
    assert proxy.stats.connections_active == 0

    third = object()
    proxy._pipes.add(third)
    proxy.stats.connections_active = 1
    later = asyncio.ensure_future(proxy.wait_all_closed())
    await asyncio.sleep(0.01)
    assert not later.done()
    proxy.pipe_closed(third)
    await asyncio.wait_for(later, 1)
