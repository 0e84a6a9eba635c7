"""The driver, played like a transcript: engine commands in, transport calls out.

A ``Pipe`` is fed client and server bytes; its two transports are fakes that
record every call in one shared ``Wire``, so each test reads as the exact
sequence of writes, half-closes, closes, aborts and read pauses the driver
makes. The engines are real (``HttpEngine``) wherever the behaviour under test
is a protocol's; a tiny scripted engine stands in where the point is one
command. The last tests run the proxy with real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events as h2_events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from l7proxy.observe.flowlog import FlowLog, format_record
from l7proxy.proxy.driver import (
    ENDED_AFTER_REPLY,
    ENDED_BY_CLIENT,
    ENDED_OTHERWISE,
    ENDED_QUIET,
    LINGER_SECONDS,
    QUIET_SECONDS,
    Pipe,
    ProxyLimits,
    ProxyStats,
    ServerSide,
)
from l7proxy.proxy.firewall import Firewall
from l7proxy.proxy.passthrough import PassthroughEngine
from parsers.base import (
    Access,
    Close,
    Command,
    Decision,
    Finished,
    LimitExceeded,
    Log,
    ParseError,
    ProtocolError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    ToClient,
    ToServer,
    Yield,
    allow_all,
)
from parsers.http import HttpEngine
from parsers.http1.engine import Http1Engine, Http1Limits
from parsers.requests import HttpRequest
from tests.support.firewall import GET_ONLY_POLICY
from tests.support.h2_transcript import GracefulPeer, frames_in, request_headers

GET = b"GET /v1/items HTTP/1.1\r\nHost: api\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nAccess denied"
)
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b"Connection: close\r\n\r\nBad Request"
)
CLIENT = {"ip": "10.0.0.1", "port": 40000}
SERVICE = {"ip": "10.0.0.2", "port": 8080}


# --------------------------------------------------------------------------- fakes


class Wire:
    """Every transport call of one pipe, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def take(self) -> list[tuple[Any, ...]]:
        """The calls since the last take."""
        calls, self.calls = self.calls, []
        return calls


class FakeTransport(asyncio.Transport):
    """A stream transport that records what the driver does to it."""

    def __init__(self, name: str, wire: Wire, *, sock: socket.socket | None = None):
        super().__init__()
        self.name = name
        self.wire = wire
        self.sock = sock
        self.closing = False
        self.buffered = 0  # what get_write_buffer_size reports
        self.half_close = True  # what can_write_eof reports
        self.limits: tuple[int, int] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.wire.calls.append((self.name, "write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        # One write on the wire (a writev), as uvloop makes it.
        self.wire.calls.append((self.name, "write", b"".join(bytes(d) for d in list_of_data)))

    def write_eof(self) -> None:
        self.wire.calls.append((self.name, "write_eof"))

    def can_write_eof(self) -> bool:
        return self.half_close

    def close(self) -> None:
        self.wire.calls.append((self.name, "close"))
        self.closing = True

    def abort(self) -> None:
        self.wire.calls.append((self.name, "abort"))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.wire.calls.append((self.name, "pause_reading"))

    def resume_reading(self) -> None:
        self.wire.calls.append((self.name, "resume_reading"))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high or 0, low or 0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock}.get(name, default)


class ScriptedEngine:
    """Answers each input with the commands scripted for it (nothing otherwise)."""

    protocol = "scripted"
    reading_headers = False
    reading_body = False
    heads_read = 0
    client_speaks_first = True

    def __init__(
        self,
        client: dict[bytes, list[Command]] | None = None,
        server: dict[bytes, list[Command]] | None = None,
        finish: list[Command] | None = None,
    ):
        self.on_client = client or {}
        self.on_server = server or {}
        self.on_finish = finish or []
        self.finish_asked = 0

    def client_data(self, data: bytes) -> list[Command]:
        return self.on_client.get(data, [])

    def server_data(self, data: bytes) -> list[Command]:
        return self.on_server.get(data, [])

    def finish(self) -> list[Command]:
        self.finish_asked += 1
        return self.on_finish


@dataclass
class Played:
    pipe: Pipe
    client: FakeTransport
    server: FakeTransport
    wire: Wire
    flowlog: FlowLog
    stats: ProxyStats = field(default_factory=ProxyStats)


class Connector:
    """Stands in for the proxy's upstream connect: records each one started."""

    def __init__(self) -> None:
        self.started: list[asyncio.Future[None]] = []

    def __call__(self, pipe: Pipe) -> asyncio.Future[None]:
        connecting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started.append(connecting)
        return connecting


def play(
    engine: Any,
    *,
    limits: ProxyLimits | None = None,
    connected: bool = True,
    connect: Connector | None = None,
    client_sock: socket.socket | None = None,
    flowlog: FlowLog | None = None,
) -> Played:
    wire = Wire()
    client = FakeTransport("client", wire, sock=client_sock)
    server = FakeTransport("server", wire)
    flowlog = flowlog or FlowLog(keep=1000)
    stats = ProxyStats()
    pipe = Pipe(
        asyncio.get_running_loop(),
        engine,
        flowlog,
        engine.protocol,
        limits or ProxyLimits(),
        stats,
        client=client,
        source=CLIENT,
        destination=SERVICE,
        connect=connect,
    )
    if connected:
        pipe.server_connected(server)
    return Played(pipe, client, server, wire, flowlog, stats)


def deny(_request: object) -> Decision:
    return Decision(False, policy="api", rule="rule 0", reason="no rule matches")


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real socket for the client transport, so socket options can be read back."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


def linger(sock: socket.socket) -> tuple[int, int]:
    on, seconds = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return on, seconds


# --------------------------------------------------------------------------- forwarding


async def test_a_request_and_its_response_cross_unchanged_and_are_logged_once():
    p = play(HttpEngine(allow_all))

    p.pipe.client_data(GET)
    assert p.wire.take() == [("server", "write", GET)]

    p.pipe.server_data(OK)
    assert p.wire.take() == [("client", "write", OK)]

    [record] = p.flowlog.recent
    assert record["type"] == "l7" and record["verdict"] == "FORWARDED"
    assert record["source"] == CLIENT and record["destination"] == SERVICE
    assert record["l7"]["method"] == "GET" and record["reply"] == {"status": 200}


async def test_a_last_response_is_written_logged_and_then_the_connection_ends():
    """The server says Connection: close: the client gets the response, then our FIN
    (the server's side closed first), and the exchange is logged as answered."""
    last = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)
    p.wire.take()

    p.pipe.server_data(last)
    assert p.wire.take() == [
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert p.pipe.closing
    [record] = p.flowlog.recent
    assert record["verdict"] == "FORWARDED" and record["reply"] == {"status": 200}


async def test_without_a_reader_no_record_is_built_and_a_subscriber_gets_the_next_one():
    p = play(HttpEngine(allow_all), flowlog=FlowLog(None, keep=0))
    assert not p.flowlog.wanted  # no file, no subscriber, nothing kept

    p.pipe.client_data(GET)
    p.pipe.server_data(OK)
    assert p.wire.take() == [("server", "write", GET), ("client", "write", OK)]

    seen: list[dict] = []
    p.flowlog.subscribe(seen.append)
    p.pipe.client_data(GET)
    p.pipe.server_data(OK)

    assert p.wire.take() == [("server", "write", GET), ("client", "write", OK)]
    [record] = seen
    assert record["verdict"] == "FORWARDED" and record["reply"] == {"status": 200}


async def test_a_denied_request_is_answered_by_the_engine_and_never_reaches_the_server():
    p = play(HttpEngine(deny))

    p.pipe.client_data(GET)

    assert p.wire.take() == [("client", "write", FORBIDDEN)]
    [record] = p.flowlog.recent
    assert record["verdict"] == "DENIED" and record["reply"] == {"status": 403}


async def test_bytes_for_the_server_wait_until_it_is_connected_then_go_in_one_write():
    p = play(HttpEngine(allow_all), connected=False)

    p.pipe.client_data(GET)
    p.pipe.client_data(GET)
    p.pipe.client_data(b"")  # the client is done before the upstream answered the SYN
    assert p.wire.take() == []

    p.pipe.server_connected(p.server)

    assert p.wire.take() == [("server", "write", GET + GET), ("server", "write_eof")]
    assert p.server.limits == (256 * 1024, 64 * 1024)


# --------------------------------------------------------------------------- the upstream connect


async def test_no_upstream_connect_until_the_engine_has_bytes_for_the_server():
    connector = Connector()
    p = play(HttpEngine(allow_all), connected=False, connect=connector)
    assert connector.started == []  # an accepted client alone costs no upstream

    p.pipe.client_data(GET[:10])
    assert connector.started == []  # nor does half a request head

    p.pipe.client_data(GET[10:])
    p.pipe.client_data(GET)
    assert len(connector.started) == 1  # one connect, however many requests wait for it

    p.pipe.server_connected(p.server)
    assert p.wire.take() == [("server", "write", GET + GET)]


async def test_a_denied_request_costs_no_upstream_connection():
    connector = Connector()
    p = play(HttpEngine(deny), connected=False, connect=connector)

    p.pipe.client_data(GET)

    assert p.wire.take() == [("client", "write", FORBIDDEN)]
    assert connector.started == []


async def test_a_port_without_l7_rules_connects_upstream_at_once_for_server_first_protocols():
    connector = Connector()
    p = play(PassthroughEngine(), connected=False, connect=connector)
    assert len(connector.started) == 1

    p.pipe.server_connected(p.server)
    p.pipe.server_data(b"220 mail.example ESMTP\r\n")  # SMTP: the server speaks first

    assert p.wire.take() == [("client", "write", b"220 mail.example ESMTP\r\n")]


async def test_an_upstream_that_connects_after_the_client_left_is_closed_at_once():
    connector = Connector()
    p = play(HttpEngine(allow_all), connected=False, connect=connector)
    p.pipe.client_data(GET)

    p.pipe.close("client closed")
    [connecting] = connector.started
    assert connecting.cancelled()  # a connect still in flight is abandoned...
    p.wire.take()

    p.pipe.server_connected(p.server)  # ...and one that completed anyway is not kept

    assert p.wire.take() == [("server", "abort")]


async def test_a_client_done_before_any_byte_for_the_server_ends_without_an_upstream():
    # Kafka and CQL answer the client's EOF by shutting the server down and
    # the server's EOF by shutting the client down: a server never connected
    # has nothing to say, so its end of input follows at once.
    engine = ScriptedEngine(client={b"": [ShutdownServer()]}, server={b"": [ShutdownClient()]})
    connector = Connector()
    p = play(engine, connected=False, connect=connector)

    p.pipe.client_data(b"")

    assert p.wire.take() == [("client", "write_eof")]
    assert connector.started == []


async def test_the_engine_writing_to_a_server_it_shut_down_is_dropped():
    engine = ScriptedEngine(client={b"": [ShutdownServer(), ToServer(b"late")]})
    p = play(engine)

    p.pipe.client_data(b"")

    assert p.wire.take() == [("server", "write_eof")]


# --------------------------------------------------------------------------- backpressure


async def test_a_full_server_buffer_pauses_reading_the_client_until_it_drains():
    p = play(HttpEngine(allow_all))
    upstream = ServerSide(p.pipe)

    upstream.pause_writing()
    assert p.wire.take() == [("client", "pause_reading")]

    upstream.resume_writing()
    assert p.wire.take() == [("client", "resume_reading")]

    upstream.resume_writing()  # not paused by us: nothing to undo
    assert p.wire.take() == []


async def test_a_client_that_does_not_read_its_answers_is_not_read_until_it_does():
    p = play(HttpEngine(allow_all))

    p.pipe.client_write_paused()
    assert p.wire.take() == [("server", "pause_reading"), ("client", "pause_reading")]

    p.pipe.client_write_resumed()
    assert p.wire.take() == [("server", "resume_reading"), ("client", "resume_reading")]

    p.pipe.client_write_resumed()
    assert p.wire.take() == []


async def test_the_client_is_read_again_only_when_every_hold_is_released():
    p = play(HttpEngine(allow_all))

    p.pipe.server_write_paused()
    p.pipe.client_write_paused()
    assert p.wire.take() == [("client", "pause_reading"), ("server", "pause_reading")]

    p.pipe.server_write_resumed()  # the server drained, but the client still does not read
    assert p.wire.take() == []

    p.pipe.client_write_resumed()
    assert p.wire.take() == [("server", "resume_reading"), ("client", "resume_reading")]


async def test_a_client_with_max_pending_requests_unanswered_is_not_read_until_half_are():
    limits = ProxyLimits(max_pending_requests=4)
    p = play(HttpEngine(allow_all, max_pending=4), limits=limits)  # as the proxy makes them
    gets = [b"GET /%d HTTP/1.1\r\nHost: api\r\n\r\n" % n for n in range(6)]

    p.pipe.client_data(b"".join(gets))
    assert (
        p.wire.take()
        == [
            ("client", "pause_reading"),  # the fourth request is judged: the limit
            ("server", "write", b"".join(gets[:4])),  # the four judged ones, in one write
        ]
    )

    p.pipe.server_data(OK)
    assert p.wire.take() == [("client", "write", OK)]  # 3 unanswered: more than half

    p.pipe.server_data(OK)  # 2 unanswered: the engine reads on, and so does the pipe
    assert (
        p.wire.take()
        == [
            ("client", "resume_reading"),
            ("client", "pause_reading"),  # 4 unanswered again
            ("server", "write", b"".join(gets[4:])),
            ("client", "write", OK),
        ]
    )
    reason = "4 requests await an answer: not read until half are"
    assert limit_records(p) == [("max_pending_requests", reason)] * 2


# --------------------------------------------------------------------------- fairness


def later(*commands: Command) -> Yield:
    """A Yield whose resume returns ``commands``."""
    return Yield(lambda: list(commands))


async def test_a_yield_pauses_reading_the_client_until_a_later_turn_of_the_loop():
    rest = later(ToServer(b"second half"))
    p = play(ScriptedEngine(client={b"a large read": [ToServer(b"first half"), later(rest)]}))

    p.pipe.client_data(b"a large read")
    assert p.wire.take() == [("server", "write", b"first half"), ("client", "pause_reading")]

    await asyncio.sleep(0)  # the other connections' turn; then the first resume
    assert p.wire.take() == []  # it yielded again: still paused, nothing more to write
    await asyncio.sleep(0)
    assert p.wire.take() == [("server", "write", b"second half"), ("client", "resume_reading")]


async def test_a_read_of_many_responses_is_relayed_over_turns_with_the_server_unread_between():
    p = play(Http1Engine(allow_all, limits=Http1Limits(responses_per_turn=32)))
    p.pipe.client_data(GET * 40)  # pipelined
    p.wire.take()

    p.pipe.server_data(OK * 40)  # one read
    assert p.wire.take() == [
        ("client", "write", OK * 32),
        ("client", "pause_reading"),
        ("server", "pause_reading"),
    ]
    await asyncio.sleep(0)  # the other connections' turn; then the rest
    assert p.wire.take() == [
        ("client", "write", OK * 8),
        ("client", "resume_reading"),
        ("server", "resume_reading"),
    ]
    assert len(p.flowlog.recent) == 40


async def test_backpressure_and_a_yield_both_hold_reading_until_both_let_go():
    p = play(ScriptedEngine(client={b"read": [later()]}))
    p.pipe.client_data(b"read")
    p.pipe.server_write_paused()
    assert p.wire.take() == [("client", "pause_reading")]

    p.pipe.server_write_resumed()  # the engine still owes its turn
    assert p.wire.take() == []
    await asyncio.sleep(0)
    assert p.wire.take() == [("client", "resume_reading")]

    p.pipe.client_data(b"read")
    p.pipe.server_write_paused()
    p.wire.take()
    await asyncio.sleep(0)  # the turn is done, but the server's buffer is still full
    assert p.wire.take() == []
    p.pipe.server_write_resumed()
    assert p.wire.take() == [("client", "resume_reading")]


async def test_a_pipe_that_closes_before_its_turn_comes_back_resumes_nothing():
    resumed = []
    p = play(ScriptedEngine(client={b"read": [Yield(lambda: resumed.append(1) or [])]}))
    p.pipe.client_data(b"read")
    p.wire.take()

    p.pipe.close("proxy shutting down")
    # The lingering close reads (and discards) what the client still sends.
    assert p.wire.take() == [
        ("server", "close"),
        ("client", "write_eof"),
        ("client", "resume_reading"),
    ]
    await asyncio.sleep(0)
    assert resumed == []


async def test_what_a_client_sends_during_the_lingering_close_reaches_no_engine():
    p = play(ScriptedEngine(client={b"late": [ToServer(b"late"), ToClient(b"answer")]}))
    p.pipe.close("proxy shutting down")
    p.wire.take()

    p.pipe.client_data(b"late")  # what the transport hands over while the close lingers

    assert p.wire.take() == []


# --------------------------------------------------------------------------- limits


async def test_an_exceeded_limit_writes_a_limit_record_naming_it():
    flood = LimitExceeded(
        "101 PING frames in one round trip (limit 100)",
        limit="max_ping_frames",
        code="h2_enhance_your_calm",
    )
    p = play(ScriptedEngine(client={b"pings": [ToClient(b"goaway"), ParseError("client", flood)]}))

    p.pipe.client_data(b"pings")

    assert p.wire.take() == [
        ("client", "write", b"goaway"),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert p.stats.parse_errors == {"scripted:client": 1}
    [record] = p.flowlog.recent
    assert record["type"] == "limit" and record["verdict"] == "DROPPED"
    assert record["limit"] == "max_ping_frames"
    assert record["reason"] == "101 PING frames in one round trip (limit 100)"
    assert (record["source"], record["destination"]) == (CLIENT, SERVICE)
    assert format_record(record).endswith(
        " DROPPED   10.0.0.1:40000 -> 10.0.0.2:8080 scripted limit=max_ping_frames "
        "(101 PING frames in one round trip (limit 100))"
    )


async def test_an_http2_ping_flood_gets_goaway_enhance_your_calm_and_a_limit_record():
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    for n in range(150):
        client.ping(n.to_bytes(8, "big"))
    p = play(HttpEngine(allow_all))

    p.pipe.client_data(client.data_to_send())
    for _ in range(3):  # the flood is read in turns; the GOAWAY comes in the second
        await asyncio.sleep(0)

    to_client = b"".join(c[2] for c in p.wire.take() if c[:2] == ("client", "write"))
    goaway = frames_in(to_client)[-1]
    assert (goaway.type, goaway.error_code, goaway.last_stream_id) == (7, 11, 0)
    assert p.pipe.closing
    [record] = p.flowlog.recent
    assert (record["type"], record["limit"]) == ("limit", "max_ping_frames")


# --------------------------------------------------------------------------- half-close and close


async def test_client_eof_reaches_the_server_after_the_request_and_the_response_still_returns():
    p = play(HttpEngine(allow_all))

    p.pipe.client_data(GET)
    p.pipe.client_data(b"")
    assert p.wire.take() == [("server", "write", GET), ("server", "write_eof")]

    p.pipe.server_data(OK)
    assert p.wire.take() == [("client", "write", OK)]

    p.pipe.server_data(b"")  # the server closes too: the engine ends the connection
    assert p.wire.take() == [("server", "close"), ("client", "write_eof")]
    assert p.pipe.closing


async def test_close_flushes_then_closes_the_client_after_a_lingering_while():
    engine = ScriptedEngine(client={b"quit": [ToClient(b"bye"), Close("done")]})
    p = play(engine)
    p.pipe.server_write_paused()
    p.wire.take()

    p.pipe.client_data(b"quit")

    # The reply is written before the FIN; reading resumes so the client's
    # late bytes are read and discarded rather than answered with an RST.
    assert p.wire.take() == [
        ("client", "write", b"bye"),
        ("server", "close"),
        ("client", "write_eof"),
        ("client", "resume_reading"),
    ]
    await asyncio.sleep(LINGER_SECONDS + 0.1)
    assert p.wire.take() == [("client", "close")]


async def test_a_client_gone_during_the_lingering_close_is_not_closed_again_later():
    engine = ScriptedEngine(client={b"quit": [ToClient(b"bye"), Close("done")]})
    p = play(engine)
    p.pipe.client_data(b"quit")
    assert ("client", "write_eof") in p.wire.take()

    # Its FIN came: the transport closed and told its protocol (connection_lost).
    p.pipe.client_lost()
    await asyncio.sleep(LINGER_SECONDS + 0.1)
    assert p.wire.take() == []  # the lingering close's deadline went with the client


async def test_close_without_half_close_closes_the_client_at_once():
    engine = ScriptedEngine(client={b"quit": [ToClient(b"bye"), Close("done")]})
    p = play(engine)
    p.client.half_close = False

    p.pipe.client_data(b"quit")

    assert p.wire.take() == [("client", "write", b"bye"), ("server", "close"), ("client", "close")]


async def test_a_request_still_in_flight_is_logged_with_the_close_reason():
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)

    p.pipe.close("server closed")

    [record] = p.flowlog.recent
    assert record["reply"] == {"closed": "server closed"}


# --------------------------------------------------------------------------- errors and timers


async def test_a_parse_error_is_answered_then_the_connection_closes():
    p = play(HttpEngine(allow_all))

    p.pipe.client_data(b"BAD\r\n\r\n")

    assert p.wire.take() == [
        ("client", "write", BAD_REQUEST),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert p.stats.parse_errors == {"http:client": 1}


async def test_a_parse_error_the_engine_survives_is_counted_and_the_connection_stays():
    error = ParseError("server", ProtocolError("odd frame"), close=False)
    p = play(ScriptedEngine(server={b"odd": [error, Log("skipped an odd frame")]}))

    p.pipe.server_data(b"odd")

    assert p.wire.take() == []
    assert p.stats.parse_errors == {"scripted:server": 1}
    assert not p.pipe.closing


REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n"
    b"Connection: close\r\n\r\nRequest Timeout"
)
PUT = b"PUT /v1/items HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\n"
TIMED = ProxyLimits(header_timeout=0.2, body_timeout=0.2, idle_timeout=10)


async def trickle(p: Played, data: bytes, every: float) -> None:
    """One byte every ``every`` seconds, until all are sent or the pipe ends."""
    for i in range(len(data)):
        if p.pipe.closing:
            return
        p.pipe.client_data(data[i : i + 1])
        await asyncio.sleep(every)


async def ends_within(p: Played, seconds: float) -> bool:
    """Whether the pipe ends within ``seconds`` (a bound, generous on a loaded
    machine: timers fire late there, never early)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not p.pipe.closing and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return p.pipe.closing


def limit_records(p: Played) -> list[dict[str, Any]]:
    return [(r["limit"], r["reason"]) for r in p.flowlog.recent if r["type"] == "limit"]


async def test_a_request_head_that_does_not_complete_in_time_closes_the_connection():
    p = play(HttpEngine(allow_all), limits=TIMED)

    p.pipe.client_data(GET[:10])

    assert await ends_within(p, 2.0)
    assert p.wire.take() == [
        ("client", "write", REQUEST_TIMEOUT),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert limit_records(p) == [
        ("header_timeout", "request head not complete 0.2 s after its first byte")
    ]


async def test_bytes_trickling_in_do_not_extend_a_heads_deadline():
    p = play(HttpEngine(allow_all), limits=TIMED)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await trickle(p, GET, every=0.02)  # 37 bytes would take 0.74 s; the deadline is 0.2 s

    assert 0.2 <= loop.time() - started  # and the head never completed:
    assert p.wire.take() == [
        ("client", "write", REQUEST_TIMEOUT),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert [r["limit"] for r in p.flowlog.recent] == ["header_timeout"]


async def test_each_head_has_its_own_deadline_from_its_first_byte():
    # Wide margins: each sleep may run 0.4 s late on a loaded machine.
    p = play(HttpEngine(allow_all), limits=ProxyLimits(header_timeout=1.0, idle_timeout=10))

    p.pipe.client_data(GET[:10])
    await asyncio.sleep(0.6)
    p.pipe.client_data(GET[10:] + GET[:10])  # the first head ends, the next one begins
    await asyncio.sleep(0.6)  # past the first head's deadline, not the second's
    p.pipe.client_data(GET[10:])
    p.pipe.server_data(OK + OK)

    assert p.wire.take() == [
        ("server", "write", GET),
        ("server", "write", GET),
        ("client", "write", OK + OK),
    ]
    assert not p.pipe.closing


async def test_keep_alive_time_between_requests_does_not_count_toward_a_heads_deadline():
    p = play(HttpEngine(allow_all), limits=TIMED)
    p.pipe.client_data(GET)
    p.pipe.server_data(OK)
    p.wire.take()

    await asyncio.sleep(0.3)  # keep-alive: the idle timeout's business
    p.pipe.client_data(GET[:10])
    await asyncio.sleep(0.1)
    assert p.wire.take() == []

    assert await ends_within(p, 2.0)
    assert p.wire.take()[0] == ("client", "write", REQUEST_TIMEOUT)


async def test_a_pipelined_head_past_its_deadline_gets_408_after_the_responses_owed():
    p = play(HttpEngine(allow_all), limits=TIMED)
    p.pipe.client_data(GET + GET[:10])
    await asyncio.sleep(0.3)
    assert p.wire.take() == [("server", "write", GET)]  # the 408 waits its turn

    p.pipe.client_data(GET[10:])  # too late: not read
    p.pipe.server_data(OK)

    assert p.wire.take() == [
        ("client", "write", OK + REQUEST_TIMEOUT),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert [r["type"] for r in p.flowlog.recent] == ["limit", "l7"]


async def test_bytes_after_a_timed_out_head_keep_nothing_alive():
    p = play(HttpEngine(allow_all), limits=ProxyLimits(header_timeout=0.1, idle_timeout=0.3))
    p.pipe.client_data(GET + GET[:10])  # the 408 will wait for the first response
    await asyncio.sleep(0.15)
    assert not p.pipe.closing

    await trickle(p, GET[10:], every=0.02)  # 0.54 s of bytes nobody reads any more

    assert await ends_within(p, 2.0)  # the idle timeout, the server being silent
    assert p.wire.take() == [("server", "write", GET), ("server", "close"), ("client", "write_eof")]


async def test_a_stalled_request_body_closes_both_sides():
    p = play(HttpEngine(allow_all), limits=TIMED)

    p.pipe.client_data(PUT + b"abc")

    assert await ends_within(p, 2.0)
    assert p.wire.take() == [
        ("server", "write", PUT + b"abc"),
        ("server", "close"),
        ("client", "write_eof"),  # no 408: the server has the request's head
    ]
    limit, request = p.flowlog.recent
    assert (limit["limit"], limit["reason"]) == (
        "body_timeout",
        "no byte of the request body for 0.2 s",
    )
    assert request["reply"] == {"closed": "body_timeout"}


async def test_a_slow_body_whose_bytes_keep_coming_is_served():
    p = play(HttpEngine(allow_all), limits=TIMED)

    p.pipe.client_data(PUT)
    await trickle(p, b"0123456789", every=0.05)  # 0.5 s in all, never 0.2 s silent
    p.pipe.server_data(OK)

    assert p.wire.take()[-1] == ("client", "write", OK)
    assert not p.pipe.closing


async def test_a_body_is_not_late_while_we_do_not_read_it():
    p = play(HttpEngine(allow_all), limits=TIMED)
    p.pipe.client_data(PUT + b"abc")
    p.pipe.server_write_paused()  # the server reads slowly: we stop reading the client

    await asyncio.sleep(0.3)
    assert not p.pipe.closing
    p.pipe.server_write_resumed()
    await asyncio.sleep(0.1)
    assert not p.pipe.closing  # its clock went on where it stopped

    assert await ends_within(p, 2.0)


async def test_a_body_behind_expect_100_continue_is_awaited_only_once_the_server_says_so():
    p = play(HttpEngine(allow_all), limits=TIMED)
    head = PUT.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")

    p.pipe.client_data(head)
    await asyncio.sleep(0.3)  # the client waits for the server's word
    assert not p.pipe.closing
    p.pipe.server_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(0.1)
    assert not p.pipe.closing

    assert await ends_within(p, 2.0)
    assert limit_records(p)[0][0] == "body_timeout"


async def test_a_connection_silent_for_the_idle_timeout_closes():
    p = play(HttpEngine(allow_all), limits=ProxyLimits(header_timeout=10, idle_timeout=0.05))

    p.pipe.client_data(GET)
    p.pipe.server_data(OK)
    p.wire.take()

    assert await ends_within(p, 2.0)
    assert p.wire.take() == [("server", "close"), ("client", "write_eof")]
    assert limit_records(p) == [("idle_timeout", "no byte either way for 0.05 s")]


async def test_traffic_keeps_a_connection_past_its_idle_timeout():
    p = play(HttpEngine(allow_all), limits=ProxyLimits(header_timeout=10, idle_timeout=0.5))

    for _ in range(8):  # 0.8 s in all, never 0.5 s without a byte
        await asyncio.sleep(0.1)
        p.pipe.client_data(GET)
        p.pipe.server_data(OK)

    assert ("client", "write_eof") not in p.wire.take()


# --------------------------------------------------------------------------- close_when_idle

OK_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
GET2 = b"GET /v1/other HTTP/1.1\r\nHost: api\r\n\r\n"


async def test_close_when_idle_resets_a_quiet_keep_alive_connection(socket_pair):
    ours, _theirs = socket_pair
    p = play(HttpEngine(allow_all), client_sock=ours)
    p.pipe.client_data(GET)
    p.pipe.server_data(OK)
    p.wire.take()

    ended = p.pipe.close_when_idle()
    assert p.wire.take() == []  # traffic a moment ago: not quiet yet

    assert await asyncio.wait_for(ended, QUIET_SECONDS + 1) == ENDED_QUIET
    assert p.wire.take() == [("server", "close"), ("client", "abort")]
    assert linger(ours) == (1, 0)  # the close is an RST: no TIME_WAIT on the client's tuple
    assert p.pipe.closing


async def test_a_quiet_connection_is_given_a_quiet_while_from_the_ask_too():
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)
    p.pipe.server_data(OK)
    p.wire.take()
    await asyncio.sleep(QUIET_SECONDS + 0.05)  # quiet already

    ended = p.pipe.close_when_idle()
    await asyncio.sleep(QUIET_SECONDS / 2)
    assert not ended.done()  # a client reading a GOAWAY has time to answer it
    assert await asyncio.wait_for(ended, QUIET_SECONDS + 1) == ENDED_QUIET


async def test_a_busy_keep_alive_connection_is_told_to_close_and_the_client_closes_it():
    """issue 14, finding 12: a reset right behind a response met the client's next
    request on the wire. The response says Connection: close instead; the client
    closes, then we do: nothing is reset, and no request is lost."""
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)
    p.wire.take()

    ended = p.pipe.close_when_idle()
    await asyncio.sleep(QUIET_SECONDS + 0.1)  # silent, but a request is in flight
    assert p.wire.take() == [] and not ended.done()

    p.pipe.server_data(OK)
    assert p.wire.take() == [("client", "write", OK_CLOSE)]
    await asyncio.sleep(QUIET_SECONDS / 2)
    assert p.wire.take() == [] and not ended.done()  # the client's turn to close

    p.pipe.client_data(b"")  # it read the response and closed
    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [("server", "close"), ("client", "write_eof")]  # our FIN second
    [record] = p.flowlog.recent
    assert record["reply"] == {"status": 200}  # logged as answered, not as cut


async def test_a_request_already_on_the_wire_behind_the_last_one_is_never_forwarded():
    """The client sent its next request before it read the response that says
    Connection: close: that request is not read (so not forwarded), and the
    client, told the connection ends, sends it again on a new one."""
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)
    ended = p.pipe.close_when_idle()
    p.pipe.client_data(GET2)  # on the wire already

    p.pipe.server_data(OK)
    p.pipe.client_data(b"")

    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [
        ("server", "write", GET),
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "write_eof"),
    ]
    assert [r["l7"]["path"] for r in p.flowlog.recent] == ["/v1/items"]


async def test_pipelined_requests_read_before_the_ask_are_all_answered_the_last_says_close():
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET + GET2)  # both read, both forwarded
    ended = p.pipe.close_when_idle()

    p.pipe.server_data(OK)
    p.pipe.server_data(OK)
    p.pipe.client_data(b"")

    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [
        ("server", "write", GET + GET2),
        ("client", "write", OK),
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "write_eof"),
    ]


async def test_the_request_after_the_ask_carries_the_close_when_none_was_in_flight():
    p = play(HttpEngine(allow_all))
    ended = p.pipe.close_when_idle()
    await asyncio.sleep(0.01)
    p.pipe.client_data(GET + GET2)  # the first is the last read: GET2 never is

    p.pipe.server_data(OK)
    p.pipe.client_data(b"")

    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [
        ("server", "write", GET),
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "write_eof"),
    ]


async def test_close_when_idle_never_cuts_a_request_head_half_read():
    p = play(HttpEngine(allow_all))

    p.pipe.client_data(GET[:10])
    ended = p.pipe.close_when_idle()
    await asyncio.sleep(QUIET_SECONDS + 0.1)
    assert p.wire.take() == [] and not ended.done()

    p.pipe.client_data(GET[10:])
    p.pipe.server_data(OK)
    p.pipe.client_data(b"")

    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [
        ("server", "write", GET),
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "write_eof"),
    ]


async def test_a_denied_last_request_gets_its_403_with_connection_close():
    p = play(HttpEngine(deny), connected=False)
    ended = p.pipe.close_when_idle()
    p.pipe.client_data(GET + GET2)
    p.pipe.client_data(b"")

    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    assert p.wire.take() == [
        ("client", "write", FORBIDDEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")),
        ("client", "write_eof"),
    ]


async def test_a_told_client_that_does_not_close_is_reset_once_quiet(socket_pair):
    ours, _theirs = socket_pair
    p = play(HttpEngine(allow_all), client_sock=ours)
    p.pipe.client_data(GET)
    ended = p.pipe.close_when_idle()
    p.pipe.server_data(OK)
    p.pipe.client_data(GET2)  # it ignores Connection: close: never read

    assert await asyncio.wait_for(ended, QUIET_SECONDS + 1) == ENDED_QUIET
    assert p.wire.take() == [
        ("server", "write", GET),
        ("client", "write", OK_CLOSE),
        ("server", "close"),
        ("client", "abort"),
    ]
    assert linger(ours) == (1, 0)


async def test_an_engine_without_a_word_for_it_is_reset_right_behind_its_last_answer(socket_pair):
    """Kafka and CQL: the engine says when nothing is owed; the reset follows the
    answer at once, before the client can send another request."""
    ours, _theirs = socket_pair
    request = HttpRequest(method="GET", path="/", host="api", headers=(), version="1.1")
    engine = ScriptedEngine(
        client={b"ask": [Access(request, Decision(True), key=7), ToServer(b"ask")]},
        server={b"answer": [ToClient(b"answer"), Reply(7, {"status": 200}), Finished(told=False)]},
    )
    p = play(engine, client_sock=ours)
    p.pipe.client_data(b"ask")
    ended = p.pipe.close_when_idle()
    assert engine.finish_asked == 1

    p.pipe.server_data(b"answer")

    assert await asyncio.wait_for(ended, 0.1) == ENDED_AFTER_REPLY
    assert p.wire.take() == [
        ("server", "write", b"ask"),
        ("client", "write", b"answer"),
        ("server", "close"),
        ("client", "abort"),
    ]
    assert linger(ours) == (1, 0)
    assert p.pipe.close_when_idle() is ended  # asking again changes nothing
    assert engine.finish_asked == 1


class H2Peers:
    """A real h2 client (keeping its connection open after a graceful GOAWAY, as
    real clients do until their streams end) and a real h2 server on either side
    of a pipe: ``pump`` moves bytes through it until nothing moves."""

    def __init__(self, p: Played) -> None:
        self.p = p
        self.client = GracefulPeer(config=H2Configuration(client_side=True, header_encoding=None))
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.calls: list[tuple[Any, ...]] = []  # every transport call but the writes
        self.client.initiate_connection()
        self.server.initiate_connection()

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for call in self.p.wire.take():
                who, what = call[:2]
                if what != "write":
                    self.calls.append(call)
                    continue
                data = call[2]
                if who == "client":
                    self.client_events += self.client.receive_data(data)
                else:
                    self.server_events += self.server.receive_data(data)
                moved = True
            if data := self.client.data_to_send():
                self.p.pipe.client_data(data)
                moved = True
            if data := self.server.data_to_send():
                self.p.pipe.server_data(data)
                moved = True
            if not moved:
                return
        raise AssertionError("the pipe did not settle")


async def test_a_busy_http2_connection_gets_the_two_step_goaway_and_the_client_closes_it():
    p = play(HttpEngine(allow_all))
    peers = H2Peers(p)
    peers.client.send_headers(1, request_headers("/slow"), end_stream=True)
    peers.pump()
    [request] = [e for e in peers.server_events if isinstance(e, h2_events.RequestReceived)]

    ended = p.pipe.close_when_idle()
    peers.pump()  # GOAWAY(2^31-1) and a PING out; the PING back; GOAWAY(1) out
    assert [
        (e.error_code, e.last_stream_id)
        for e in peers.client_events
        if isinstance(e, h2_events.ConnectionTerminated)
    ] == [(0, 2**31 - 1), (0, 1)]
    await asyncio.sleep(QUIET_SECONDS + 0.1)
    assert not ended.done()  # stream 1 is in flight: never cut

    peers.server.send_headers(request.stream_id, [(b":status", b"200")], end_stream=True)
    peers.pump()
    assert [e.stream_id for e in peers.client_events if isinstance(e, h2_events.StreamEnded)] == [1]
    assert not ended.done()  # the client's turn to close

    p.pipe.client_data(b"")
    assert await asyncio.wait_for(ended, 1) == ENDED_BY_CLIENT
    peers.pump()
    assert ("client", "abort") not in peers.calls
    assert ("client", "write_eof") in peers.calls  # our FIN behind the client's


async def test_close_when_idle_waits_until_the_last_answer_has_left_our_buffer():
    engine = ScriptedEngine(server={b"answer": [ToClient(b"answer"), Finished(told=False)]})
    p = play(engine)
    ended = p.pipe.close_when_idle()

    p.client.buffered = 6  # the client reads slowly: the answer is still ours
    p.pipe.server_data(b"answer")
    await asyncio.sleep(0.05)
    assert p.wire.take() == [("client", "write", b"answer")] and not ended.done()

    p.client.buffered = 0
    assert await asyncio.wait_for(ended, 1) == ENDED_AFTER_REPLY
    assert p.wire.take() == [("server", "close"), ("client", "abort")]


async def test_what_the_engine_sends_when_asked_goes_out_at_once():
    engine = ScriptedEngine(finish=[ToClient(b"goaway")])
    p = play(engine)
    p.pipe.close_when_idle()
    assert p.wire.take() == [("client", "write", b"goaway")]


async def test_close_when_idle_reports_a_pipe_that_ended_another_way():
    p = play(HttpEngine(allow_all))
    p.pipe.client_data(GET)
    ended = p.pipe.close_when_idle()

    p.pipe.close("server closed")

    assert await ended == ENDED_OTHERWISE
    assert await p.pipe.close_when_idle() == ENDED_OTHERWISE  # asking again changes nothing


async def test_a_transparent_pipe_is_reset_if_the_process_dies_but_our_closes_deliver(
    socket_pair,
):
    """SIGKILL: the kernel closes our sockets. With SO_LINGER {1, 0} that is a reset,
    which leaves no FIN_WAIT2/TIME_WAIT on the client's tuple for its next SYN to
    run into; a close we choose turns it off first and still sends a FIN."""
    ours, _theirs = socket_pair
    wire = Wire()
    client = FakeTransport("client", wire, sock=ours)
    pipe = Pipe(
        asyncio.get_running_loop(),
        HttpEngine(allow_all),
        FlowLog(),
        "http",
        ProxyLimits(),
        ProxyStats(),
        client=client,
        reset_if_killed=True,
    )
    assert linger(ours) == (1, 0)

    assert pipe.close("server closed") is True
    assert linger(ours) == (0, 0)
    assert wire.take() == [("client", "write_eof")]


async def test_close_says_whether_it_ended_an_open_client_connection():
    p = play(HttpEngine(allow_all))
    assert p.pipe.close("proxy shutting down") is True
    assert p.pipe.close("proxy shutting down") is False  # ending already

    gone = play(HttpEngine(allow_all))
    gone.client.closing = True  # reset by its client; connection_lost still to run
    assert gone.pipe.close("proxy shutting down") is False


# ---------------------------------------------------------------- the proxy, real sockets


async def _http_upstream() -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy hung up
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def running_firewall(tmp_path: Path) -> Any:
    upstream = await _http_upstream()
    port = upstream.sockets[0].getsockname()[1]
    (tmp_path / "policy.yaml").write_text(GET_ONLY_POLICY.format(port=port))
    fw = Firewall(
        listen=("127.0.0.1", 0),
        upstream=("127.0.0.1", port),
        labels={"app": "api"},
        policy_paths=[tmp_path / "policy.yaml"],
        flowlog=FlowLog(),
    )
    try:
        yield fw, await fw.start()
        # Every test hangs up its clients: let their lingering closes finish
        # on this loop rather than leave them to the garbage collector.
        await asyncio.wait_for(fw.proxy.wait_all_closed(), LINGER_SECONDS + 1)
    finally:
        await fw.close()
        upstream.close()
        await upstream.wait_closed()


async def _get(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(GET)
    assert await reader.readexactly(len(OK)) == OK
    return reader, writer


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_the_proxy_says_when_its_last_connection_has_ended(tmp_path):
    async with running_firewall(tmp_path) as (fw, address):
        await asyncio.wait_for(fw.proxy.wait_all_closed(), 1)  # none open: at once

        first = await _get(address)
        second = await _get(address)
        all_closed = asyncio.ensure_future(fw.proxy.wait_all_closed())
        assert fw.proxy.connections == 2

        await _hang_up(first[1])
        await asyncio.sleep(0.2)
        assert not all_closed.done()

        await _hang_up(second[1])
        await asyncio.wait_for(all_closed, LINGER_SECONDS + 2)
        assert fw.proxy.connections == 0


async def test_a_drain_counts_reset_connections_apart_from_cut_ones(tmp_path):
    async with running_firewall(tmp_path) as (fw, address):
        idle_reader, idle_writer = await _get(address)
        busy_reader, busy_writer = await _get(address)
        busy_writer.write(GET[:10])  # a request head half sent: never ended between requests
        await asyncio.sleep(0.05)

        endings = fw.proxy.close_when_idle()
        done, _ = await asyncio.wait(endings, timeout=QUIET_SECONDS + 1)
        # The proxy closes the rest before the reset one's connection_lost has run.
        cut = await fw.proxy.close()

        assert [e.result() for e in done] == [ENDED_QUIET]
        assert cut == 1
        with pytest.raises(ConnectionResetError):
            await idle_reader.read()
        assert await busy_reader.read() == b""  # the cut one got a FIN
        await _hang_up(idle_writer)
        await _hang_up(busy_writer)
