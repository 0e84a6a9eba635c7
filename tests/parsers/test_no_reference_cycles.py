"""An engine that is done with is freed by reference counting, not left to the cyclic collector.

The cyclic collector's full passes are rare in a long-running proxy, so a
connection whose objects form a cycle stays in memory long after it ends:
one round of 300 clients leaving unfinished 60 KiB heads once added 36 MiB
for good (issue 14, finding 13). The cycles were an error kept with its
traceback (whose frames hold the engine), an engine holding a bound method of
its holder, a parser's callbacks object holding the parser, and tables of an
engine's own bound methods kept on the engine (ours for HTTP/2, and h2's).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from parsers.base import ALLOW_ALL, Decision, allow_all
from parsers.cql.engine import CqlEngine
from parsers.http import HttpEngine
from parsers.http2.engine import H2Engine
from parsers.kafka.engine import KafkaEngine
from tests.parsers.http2.test_http2 import respond
from tests.support.cycles import only_reference_counting
from tests.support.h2_transcript import Transcript, request_headers


@pytest.fixture
def no_cyclic_collection() -> Iterator[Callable[[], list[str]]]:
    with only_reference_counting(("parsers.",)) as left_to_the_collector:
        yield left_to_the_collector


def deny_all(_request: object) -> Decision:
    return Decision(False, reason="test")


HTTP1_CONVERSATIONS = {
    "served": (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ),
    "left mid-head": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: aaa", b""),
    "malformed head": (b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n", b""),
    "malformed response": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 2000 Nope\r\n\r\n"),
    "upgrade refused": (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ),
}


@pytest.mark.parametrize("conversation", HTTP1_CONVERSATIONS)
def test_http1_engine(no_cyclic_collection, conversation: str) -> None:
    request, response = HTTP1_CONVERSATIONS[conversation]
    engine = HttpEngine(allow_all)
    engine.client_data(request)
    if response:
        engine.server_data(response)
    engine.client_data(b"")
    del engine
    assert no_cyclic_collection() == []


def test_http1_engine_finished_by_a_drain(no_cyclic_collection) -> None:
    engine = HttpEngine(allow_all)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    engine.finish()
    engine.client_data(b"GET /behind HTTP/1.1\r\nHost: a\r\n\r\n")  # never read
    engine.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    engine.client_data(b"")
    del engine
    assert no_cyclic_collection() == []


def test_http2_engine_finished_by_a_drain(no_cyclic_collection) -> None:
    t = Transcript(H2Engine(allow_all), graceful_client=True).start()
    t.client.send_headers(1, request_headers("/index.html"), end_stream=True)
    t.pump()
    t._run(t.engine.finish())
    t.pump()  # the PING comes back: the final GOAWAY
    respond(t, 1, b"body")
    t.engine.client_data(b"")
    del t
    assert no_cyclic_collection() == []


@pytest.mark.parametrize("decide", [allow_all, deny_all])
def test_http2_engine_after_a_request(no_cyclic_collection, decide) -> None:
    t = Transcript(H2Engine(decide)).start()
    t.client.send_headers(1, request_headers("/index.html"), end_stream=True)
    t.pump()
    if decide is allow_all:
        respond(t, 1, b"body")
    t.engine.client_data(b"")
    del t
    assert no_cyclic_collection() == []


def test_http2_engine_after_a_connection_error(no_cyclic_collection) -> None:
    engine = H2Engine(allow_all)
    engine.client_data(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x08\x00\x00\x00\x00\x00\x00"
    )
    del engine
    assert no_cyclic_collection() == []


def test_http2_engine_cut_by_a_flood_budget(no_cyclic_collection) -> None:
    t = Transcript(H2Engine(allow_all)).start()
    for n in range(150):  # past the PING budget (100 a round trip)
        t.client.ping(n.to_bytes(8, "big"))
    t.pump()
    assert [e.error.limit for e in t.commands if type(e).__name__ == "ParseError"] == [
        "max_ping_frames"
    ]
    del t
    assert no_cyclic_collection() == []


def test_http2_engine_left_with_a_turn_still_due(no_cyclic_collection) -> None:
    engine = H2Engine(allow_all)
    out = engine.client_data(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # SETTINGS
        + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01" * 300  # WINDOW_UPDATEs
    )
    assert type(out[-1]).__name__ == "Yield"  # the driver would resume it on a later turn
    engine.client_data(b"")  # the client leaves first
    del engine, out
    assert no_cyclic_collection() == []


def _large_produce_head(topic: bytes) -> bytes:
    """The first bytes of a 1 MiB Produce v3 naming one topic (judged on them)."""
    body = struct.pack(">hhih", 0, 3, 1, 1) + b"c" + struct.pack(">hhii", -1, 1, 1000, 1)
    body += struct.pack(">h", len(topic)) + topic + struct.pack(">iii", 1, 0, 1 << 20)
    return struct.pack(">i", len(body) + (1 << 20)) + body + b"r" * 1000


KAFKA_INPUTS = {
    "bad size": b"\x00\x00\x00\x02\xff\xff",
    "partial frame": b"\x00\x00\x00\x20" + b"\x00" * 10,
    "large produce streaming": _large_produce_head(b"ok"),
    "large produce denied, dropping": _large_produce_head(b"secret"),
    "held past its limit": struct.pack(">ihhih", 20 << 20, 3, 4, 1, 1) + b"c",  # Metadata
}


def _deny_secret(request) -> Decision:
    return deny_all(request) if "secret" in request.topics else ALLOW_ALL


@pytest.mark.parametrize("client_bytes", KAFKA_INPUTS.values(), ids=KAFKA_INPUTS.keys())
def test_kafka_engine(no_cyclic_collection, client_bytes: bytes) -> None:
    engine = KafkaEngine(_deny_secret)
    engine.client_data(client_bytes)
    engine.client_data(b"")
    del engine
    assert no_cyclic_collection() == []


def _large_query_head(text: bytes, text_length: int | None = None) -> bytes:
    """The first bytes of a v4 QUERY of 1 MiB (judged on its query string)."""
    body = struct.pack(">i", len(text) if text_length is None else text_length) + text
    return struct.pack(">BBhBI", 4, 0, 1, 0x07, 1 << 20) + body + b"\x00\x01" + b"v" * 1000


CQL_INPUTS = {
    "unsupported version": b"\x02\x00\x00\x00\x05\x00\x00\x00\x00",
    "partial frame": b"\x04\x00\x00\x01\x07\x00\x00\x10\x00abc",
    "large query streaming": _large_query_head(b"SELECT * FROM ks.t"),
    "large query denied, dropping": _large_query_head(b"SELECT * FROM ks.secret"),
    "large query not judged yet": _large_query_head(b"SELECT", text_length=500_000),
    "held past its limit": struct.pack(">BBhBI", 4, 0, 1, 0x0D, 20 << 20),  # a BATCH
}


def _deny_secret_table(request) -> Decision:
    return deny_all(request) if request.table == "ks.secret" else ALLOW_ALL


@pytest.mark.parametrize("client_bytes", CQL_INPUTS.values(), ids=CQL_INPUTS.keys())
def test_cql_engine(no_cyclic_collection, client_bytes: bytes) -> None:
    engine = CqlEngine(_deny_secret_table)
    engine.client_data(client_bytes)
    engine.client_data(b"")
    del engine
    assert no_cyclic_collection() == []
