"""Memory comes back when connections end (issue 14, finding 13).

An attack's RSS once stayed at its high-water mark: 738 MiB after the
pipelining attack, and every round of 300 clients that each left a 60 KiB
head unfinished added 36 MiB more. The cause was reference cycles, not
fragmentation: a connection's engine, parser and pipe held one another (an
error kept with its traceback, an HTTP/1.1 engine holding a bound method of
its holder, llhttp's callbacks object holding its own parser), so they were
freed only when the cyclic collector ran a full pass, rarely. Now a
connection is freed by reference counting the moment it ends, and after many
have ended the proxy gives the free C heap back to the kernel.
"""

from __future__ import annotations

import asyncio
import re
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from l7proxy.observe.flowlog import FlowLog
from l7proxy.proxy.firewall import Firewall
from tests.support.cycles import only_reference_counting
from tests.support.firewall import GET_ONLY_POLICY, running_firewall

LABELS = {"app": "api"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# ----------------------------------------------------------------- reference cycles


class InProcess:
    def __init__(self, firewall: Firewall, address: tuple[str, int]) -> None:
        self.firewall = firewall
        self.address = address

    async def say(self, said: bytes, *, read: bool = False) -> bytes:
        reader, writer = await asyncio.open_connection(*self.address)
        writer.write(said)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5) if read else b""
        writer.close()
        await writer.wait_closed()
        return answer

    async def all_closed(self) -> None:
        await asyncio.wait_for(self.firewall.proxy.wait_all_closed(), 10)


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    upstream = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        policy = Path(workdir) / "policy.yaml"
        policy.write_text(GET_ONLY_POLICY.format(port=port))
        firewall = Firewall(
            listen=("127.0.0.1", 0),
            upstream=("127.0.0.1", port),
            labels=LABELS,
            policy_paths=[policy],
            flowlog=FlowLog(),
        )
        address = await firewall.start()
        try:
            yield InProcess(firewall, address)
        finally:
            await firewall.close()
            upstream.close()
            await upstream.wait_closed()


PER_CONNECTION = ("parsers.", "l7proxy.proxy.driver")


CLIENTS_THAT_END = [
    ("leaves mid-head", b"GET / HTTP/1.1\r\nHost: api\r\nX-Pad: aaaa", b""),
    ("is served and leaves", b"GET / HTTP/1.1\r\nHost: api\r\n\r\n", OK),
    ("is denied and leaves", b"POST / HTTP/1.1\r\nHost: api\r\n\r\n", b"HTTP/1.1 403"),
    ("sends garbage", b"GET / HTTP/1.1\r\nHost: api\r\nbad header\r\n\r\n", b"HTTP/1.1 400"),
    ("leaves mid-preface", H2_PREFACE[:10], b""),
    ("leaves after the HTTP/2 preface", H2_PREFACE, b""),
]


async def test_a_connection_that_ends_is_freed_at_once_not_by_the_cyclic_collector(
    in_process: InProcess,
) -> None:
    with only_reference_counting(PER_CONNECTION) as left_to_the_collector:
        for client, said, answered in CLIENTS_THAT_END:
            for _ in range(5):
                answer = await in_process.say(said, read=bool(answered))
                assert answer.startswith(answered), client
            await in_process.all_closed()
            await asyncio.sleep(0.05)  # the transports' connection_lost callbacks
            assert left_to_the_collector() == [], f"a client that {client}"


# ----------------------------------------------------------------- RSS after an attack


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


ROUNDS = 3
CLIENTS = 300  # past GIVE_BACK_AFTER_CLOSED
PARKED_HEAD = b"GET / HTTP/1.1\r\nHost: api\r\nX-Pad: " + b"a" * 60_000 + b"\r\n"


def test_rss_comes_back_after_clients_that_park_large_heads_leave() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))  # never reached: no head completes
    port = upstream.getsockname()[1]
    policy = GET_ONLY_POLICY.format(port=port)
    args = ["--header-timeout", "60"]
    with upstream, running_firewall(policy, ("127.0.0.1", port), LABELS, extra_args=args) as fw:
        pid = fw.proc.pid
        at_rest = rss_mib(pid)
        for round_ in range(ROUNDS):
            clients = []
            for _ in range(CLIENTS):
                s = socket.create_connection(fw.address)
                s.sendall(PARKED_HEAD)
                clients.append(s)
            time.sleep(1.0)
            attacked = rss_mib(pid)
            assert attacked > at_rest + 10, "the attack did not take memory: nothing measured"
            for s in clients:
                s.close()
            deadline = time.monotonic() + 5
            while rss_mib(pid) > at_rest + 15 and time.monotonic() < deadline:
                time.sleep(0.1)
            after = rss_mib(pid)
            assert after <= at_rest + 15, (
                f"round {round_}: {at_rest:.0f} MiB at rest, {attacked:.0f} attacked, "
                f"{after:.0f} 5 s after the clients left"
            )
