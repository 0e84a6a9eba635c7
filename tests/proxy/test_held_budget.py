"""One budget for the bytes all connections hold in frames (issue 14, finding 8).

Each Kafka or CQL connection may hold a frame it cannot judge before its last byte,
up to ``max_held_frame``; a hundred connections doing so at once would still exhaust
the node. The pipes of one proxy share a ``HeldBudget``: a client whose read takes
the total past ``max_held_bytes`` (while others hold frames too) is not read until
the total falls, with a flow record saying so; its head deadline keeps running, so
clients that hold frames and never finish them are cut, and the total falls.

Transcripts with the real CQL engine, two pipes sharing one budget, and fake
transports that record every call (``tests/proxy/test_driver.py``).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.protocol import BatchMessage, ProtocolHandler, QueryMessage
from cassandra.query import BatchType

from l7proxy.observe.flowlog import FlowLog
from l7proxy.proxy.driver import HeldBudget, Pipe, ProxyLimits, ProxyStats
from parsers.base import allow_all
from parsers.cql.engine import CqlEngine
from tests.proxy.test_driver import CLIENT, SERVICE, FakeTransport, Wire

KiB = 1 << 10
INSERT = "INSERT INTO ks.t (a, b) VALUES (1, ?)"


def batch(stream: int, size: int) -> bytes:
    """A BATCH of about ``size`` bytes: judged only once whole, so held until then."""
    message = BatchMessage(BatchType.LOGGED, [(False, INSERT, [b"v" * size])], ConsistencyLevel.ONE)
    return ProtocolHandler.encode_message(message, stream, 4, None, False)


@dataclass
class Client:
    pipe: Pipe
    wire: Wire
    flowlog: FlowLog

    def send(self, data: bytes) -> None:
        self.pipe.client_data(data)

    def calls(self) -> list[tuple[Any, ...]]:
        """The reads paused and resumed, and the bytes for the server, since the last look."""
        return [
            c[:2] if c[1] != "write" else ("server", "write", len(c[2]))
            for c in self.wire.take()
            if c[1] in ("pause_reading", "resume_reading", "write", "close", "write_eof")
        ]

    def limits(self) -> list[tuple[str, str]]:
        return [(r["limit"], r["verdict"]) for r in self.flowlog.recent if r["type"] == "limit"]


def client(budget: HeldBudget, limits: ProxyLimits | None = None) -> Client:
    wire, flowlog = Wire(), FlowLog(keep=1000)
    pipe = Pipe(
        asyncio.get_running_loop(),
        CqlEngine(allow_all),
        flowlog,
        "cassandra",
        limits or ProxyLimits(),
        ProxyStats(),
        client=FakeTransport("client", wire),
        source=CLIENT,
        destination=SERVICE,
        budget=budget,
    )
    pipe.server_connected(FakeTransport("server", wire))
    return Client(pipe, wire, flowlog)


async def test_a_client_whose_read_takes_the_total_past_the_budget_is_not_read_until_it_falls():
    budget = HeldBudget(limit=100 * KiB)
    a, b = client(budget), client(budget)
    frame_a, frame_b = batch(1, 80 * KiB), batch(2, 80 * KiB)

    a.send(frame_a[: 60 * KiB])
    assert (budget.total, a.calls()) == (60 * KiB, [])

    b.send(frame_b[: 60 * KiB])  # 120 KiB held: over, and A holds a frame too
    assert b.calls() == [("client", "pause_reading")]
    assert (budget.total, budget.paused) == (120 * KiB, 1)
    assert b.limits() == [("max_held_bytes", "PAUSED")]
    assert f"{120 * KiB} bytes held in frames by all connections" in b.flowlog.recent[-1]["reason"]

    a.send(frame_a[60 * KiB :])  # A's frame is whole: judged, forwarded, let go
    assert a.calls() == [("server", "write", len(frame_a))]
    assert b.calls() == [("client", "resume_reading")]
    assert (budget.total, budget.paused) == (60 * KiB, 0)

    b.send(frame_b[60 * KiB :])
    assert b.calls() == [("server", "write", len(frame_b))]
    assert budget.total == 0


async def test_a_client_alone_over_the_budget_is_not_paused_to_wait_for_itself():
    budget = HeldBudget(limit=10 * KiB)
    a = client(budget)
    frame = batch(1, 80 * KiB)

    a.send(frame[: 60 * KiB])
    assert a.calls() == [] and budget.total == 60 * KiB  # max_held_frame bounds it alone

    a.send(frame[60 * KiB :])
    assert a.calls() == [("server", "write", len(frame))]
    assert budget.total == 0


async def test_a_streamed_request_holds_nothing_and_is_never_paused():
    budget = HeldBudget(limit=10 * KiB)
    a, b = client(budget), client(budget)
    a.send(batch(1, 80 * KiB)[: 8 * KiB])  # someone holds a frame
    message = QueryMessage(INSERT, ConsistencyLevel.ONE)
    message.query_params = [b"v" * 200 * KiB]
    query = ProtocolHandler.encode_message(message, 3, 4, None, False)

    b.send(query[: 100 * KiB])  # judged on its query string: the rest streams
    b.send(query[100 * KiB :])

    rest = len(query) - 100 * KiB
    assert b.calls() == [("server", "write", 100 * KiB), ("server", "write", rest)]
    assert budget.total == 8 * KiB and b.limits() == []


async def test_a_paused_client_still_runs_out_of_time_and_what_it_held_is_let_go():
    timed = ProxyLimits(header_timeout=0.2, body_timeout=0.2, idle_timeout=10)
    budget = HeldBudget(limit=100 * KiB)
    a, b = client(budget, timed), client(budget, timed)
    a.send(batch(1, 80 * KiB)[: 60 * KiB])
    await asyncio.sleep(0.1)
    b.send(batch(2, 80 * KiB)[: 60 * KiB])  # paused
    assert b.calls() == [("client", "pause_reading")]

    await asyncio.sleep(0.25)  # A's deadline passes; B's does too, paused as it is
    assert a.pipe.closing and b.pipe.closing
    assert a.limits() == [("header_timeout", "DROPPED")]
    assert b.limits() == [("max_held_bytes", "PAUSED"), ("header_timeout", "DROPPED")]
    assert (budget.total, budget.paused) == (0, 0)


async def test_a_frame_refused_for_its_size_writes_a_limit_record():
    budget = HeldBudget()
    a = client(budget)
    header = struct.pack(">BBhBI", 4, 0, 5, 0x0D, 17 * 1024 * 1024)  # a BATCH over 16 MiB

    a.send(header)

    assert a.limits() == [("max_held_frame", "DROPPED")]
    assert a.pipe.closing and budget.total == 0
