"""Connections that have not spoken yet, held as bare sockets until their first byte.

A client-first protocol's connection gets its transport, pipe and engine only when
its first bytes come (``l7proxy/proxy/silent.py``). Until then it must still be
what it was as a pipe: under the idle timeout, with its flow record; counted in the
metrics as an open connection; gone without a trace (and without a descriptor) when
its client leaves; proxied normally when it speaks late; and ended properly by a
drain and by a shutdown. The first half runs the real ``l7proxy firewall``; the
drain, which only the agent's takeover asks for, runs a ``Firewall`` in-process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l7proxy.observe.flowlog import FlowLog
from l7proxy.proxy.driver import ENDED_BY_CLIENT, ENDED_QUIET, QUIET_SECONDS, ProxyLimits
from l7proxy.proxy.firewall import Firewall
from tests.proxy.test_hostile_clients import GET, CountingUpstream, eventually
from tests.proxy.test_metrics import metrics_url, scrape, value
from tests.support.firewall import GET_ONLY_POLICY, RunningFirewall, running_firewall
from tests.support.http_upstream import Upstream, http_upstream

LABELS = {"app": "api"}
IDLE_TIMEOUT = 1.5
RST_ON_CLOSE = struct.pack("ii", 1, 0)


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def firewall(upstream: CountingUpstream) -> Iterator[RunningFirewall]:
    with running_firewall(
        GET_ONLY_POLICY.format(port=upstream.port),
        upstream=("127.0.0.1", upstream.port),
        labels=LABELS,
        extra_args=["--idle-timeout", str(IDLE_TIMEOUT), "--metrics", "127.0.0.1:0"],
    ) as fw:
        fw.metrics = metrics_url(fw)  # type: ignore[attr-defined]
        yield fw


@pytest.fixture(scope="module")
def patient_firewall(upstream: CountingUpstream) -> Iterator[RunningFirewall]:
    """The same firewall with an idle timeout no test here reaches, for counts that must
    not move while hundreds of connections open on a busy machine."""
    with running_firewall(
        GET_ONLY_POLICY.format(port=upstream.port),
        upstream=("127.0.0.1", upstream.port),
        labels=LABELS,
        extra_args=["--idle-timeout", "120", "--metrics", "127.0.0.1:0"],
    ) as fw:
        fw.metrics = metrics_url(fw)  # type: ignore[attr-defined]
        yield fw


def open_descriptors(fw: RunningFirewall) -> int:
    return len(os.listdir(f"/proc/{fw.proc.pid}/fd"))


def settled_descriptors(fw: RunningFirewall) -> int:
    """``open_descriptors`` once it holds still for 0.3 s: a metrics scrape's
    connection is still open on the firewall's side for a moment after the scrape."""
    counts = [open_descriptors(fw)]
    while len(counts) < 4 or len(set(counts[-4:])) > 1:
        time.sleep(0.1)
        counts.append(open_descriptors(fw))
        assert len(counts) < 100, f"descriptors never settled: {counts}"
    return counts[-1]


def active_connections(fw: RunningFirewall) -> float | None:
    return value(scrape(fw.metrics), "l7proxy_proxy_connections_active")  # type: ignore[attr-defined]


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# --------------------------------------------------------------------------- the real firewall


def test_a_client_that_never_speaks_is_closed_at_the_idle_timeout_without_an_upstream(
    firewall: RunningFirewall, upstream: CountingUpstream
) -> None:
    before, since = upstream.accepted, len(firewall.flows())
    with socket.create_connection(firewall.address, timeout=IDLE_TIMEOUT + 5) as client:
        started = time.monotonic()
        assert client.recv(100) == b""  # our FIN, no reset
        assert IDLE_TIMEOUT <= time.monotonic() - started < IDLE_TIMEOUT + 1

    assert upstream.accepted == before
    [record] = firewall.wait_flows(lambda r: r["type"] == "limit", since=since)
    assert (record["limit"], record["protocol"], record["verdict"]) == (
        "idle_timeout",
        "http",
        "DROPPED",
    )
    assert record["reason"] == f"no byte either way for {IDLE_TIMEOUT:g} s"


def test_a_client_that_speaks_late_is_proxied_as_any_other(
    firewall: RunningFirewall, upstream: CountingUpstream
) -> None:
    before = upstream.accepted
    with socket.create_connection(firewall.address, timeout=5) as client:
        time.sleep(IDLE_TIMEOUT / 2)
        assert upstream.accepted == before  # nothing to connect for yet
        client.sendall(GET)
        reply = read_all(client)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok")
    assert upstream.accepted == before + 1


def test_silent_clients_count_as_open_connections_until_they_leave(
    firewall: RunningFirewall,
) -> None:
    assert eventually(lambda: active_connections(firewall) == 0)
    silent = [socket.create_connection(firewall.address, timeout=5) for _ in range(40)]
    try:
        assert eventually(lambda: active_connections(firewall) == 40)
    finally:
        for client in silent[:20]:
            client.close()
        for client in silent[20:]:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
            client.close()
    assert eventually(lambda: active_connections(firewall) == 0)


def test_clients_that_connect_and_leave_leave_no_descriptor_behind(
    patient_firewall: RunningFirewall, upstream: CountingUpstream
) -> None:
    firewall = patient_firewall
    # The first silent connection opens the watch's own epoll, which stays: count from there.
    with socket.create_connection(firewall.address, timeout=5):
        assert eventually(lambda: active_connections(firewall) == 1)
    assert eventually(lambda: active_connections(firewall) == 0)
    before, accepted = settled_descriptors(firewall), upstream.accepted

    for _ in range(200):  # a port scan: connect and close
        socket.create_connection(firewall.address, timeout=5).close()
    for _ in range(200):  # connect and reset
        client = socket.create_connection(firewall.address, timeout=5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        client.close()
    for _ in range(200):  # speak, and reset at once: gone before its transport is made
        client = socket.create_connection(firewall.address, timeout=5)
        client.sendall(GET[:10])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        client.close()
    held = [socket.create_connection(firewall.address, timeout=5) for _ in range(200)]
    assert eventually(lambda: open_descriptors(firewall) == before + 200), (  # one each
        f"{open_descriptors(firewall) - before} descriptors for 200 held connections"
    )
    for client in held:  # and all reset at once
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        client.close()

    assert eventually(lambda: open_descriptors(firewall) == before), (
        f"{open_descriptors(firewall) - before} descriptors left behind"
    )
    assert upstream.accepted == accepted
    assert "Traceback" not in firewall.stderr_text()  # as a reset before the transport once did


# --------------------------------------------------------------------------- drain and shutdown


class InProcess:
    """A ``Firewall`` in this event loop, in front of ``CountingUpstream``."""

    def __init__(self, fw: Firewall, address: tuple[str, int]) -> None:
        self.fw = fw
        self.proxy = fw.proxy
        self.address = address

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.address)

    async def until_connections(self, count: int) -> None:
        deadline = time.monotonic() + 5
        while self.proxy.connections != count:
            assert time.monotonic() < deadline, f"{self.proxy.connections} open, not {count}"
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def keep_alive_upstream() -> Iterator[Upstream]:
    """An upstream that keeps its connections open (aiohttp): only a drain says close."""
    with http_upstream() as up:
        yield up


@pytest.fixture
async def in_process(tmp_path: Path, keep_alive_upstream: Upstream):
    upstream = keep_alive_upstream
    policy = tmp_path / "policy.yaml"
    policy.write_text(GET_ONLY_POLICY.format(port=upstream.port))
    flowlog = FlowLog(tmp_path / "flows.jsonl")
    fw = Firewall(
        listen=("127.0.0.1", 0),
        upstream=("127.0.0.1", upstream.port),
        labels=LABELS,
        policy_paths=[policy],
        flowlog=flowlog,
        limits=ProxyLimits(idle_timeout=30),
    )
    address = await fw.start()
    try:
        yield InProcess(fw, address)
    finally:
        await fw.close()
        flowlog.close()


async def test_a_drain_resets_silent_connections_that_stay_quiet(
    in_process: InProcess, keep_alive_upstream: Upstream
) -> None:
    clients = [await in_process.connect() for _ in range(3)]
    await in_process.until_connections(3)
    requests = len(keep_alive_upstream.requests)

    in_process.proxy.stop_accepting()
    asked = time.monotonic()
    endings = in_process.proxy.close_when_idle()
    assert len(endings) == 3
    assert await asyncio.wait_for(asyncio.gather(*endings), 5) == [ENDED_QUIET] * 3
    assert time.monotonic() - asked >= QUIET_SECONDS

    for reader, writer in clients:  # a reset: no TIME_WAIT left on our side
        with pytest.raises(ConnectionResetError):
            await reader.read(100)
        writer.close()
    await asyncio.wait_for(in_process.proxy.wait_all_closed(), 1)
    assert in_process.proxy.connections == 0
    assert len(keep_alive_upstream.requests) == requests


async def test_a_silent_connection_that_speaks_during_a_drain_is_served_and_told_to_close(
    in_process: InProcess, keep_alive_upstream: Upstream
) -> None:
    reader, writer = await in_process.connect()
    await in_process.until_connections(1)

    in_process.proxy.stop_accepting()
    [ending] = in_process.proxy.close_when_idle()
    keep_alive = GET.replace(b"Connection: close\r\n", b"")
    writer.write(keep_alive)
    reply = await asyncio.wait_for(reader.read(65536), 5)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"ok /v1/items")
    assert b"\r\nConnection: close\r\n" in reply  # the drain's word to the client
    assert keep_alive_upstream.requests[-1] == ("GET", "/v1/items")
    writer.close()  # and it closes
    assert await asyncio.wait_for(ending, 5) == ENDED_BY_CLIENT
    await asyncio.wait_for(in_process.proxy.wait_all_closed(), 5)


async def test_wait_all_closed_waits_for_silent_connections_too(in_process: InProcess) -> None:
    reader, writer = await in_process.connect()
    await in_process.until_connections(1)
    waiting = asyncio.ensure_future(in_process.proxy.wait_all_closed())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    writer.close()
    await asyncio.wait_for(waiting, 5)


async def test_a_shutdown_cuts_silent_connections_with_a_fin(in_process: InProcess) -> None:
    clients = [await in_process.connect() for _ in range(2)]
    await in_process.until_connections(2)

    assert await in_process.proxy.close() == 2
    for reader, writer in clients:
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
    assert in_process.proxy.connections == 0
