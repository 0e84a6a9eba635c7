"""Large CQL requests: judged on their first bytes and streamed, or held whole within a limit.

Issue 14, findings 8 and 9: every request frame was held whole, up to the spec's
256 MiB, in about three copies at once; three clients each sending 200 MiB of a
255 MiB QUERY took the proxy to 834 MiB. Now a QUERY is judged once its query
string is in, an EXECUTE once its prepared id is; the rest of the frame passes to
the server as it arrives, or, denied, is dropped as it arrives and answered after
its last byte. What must be judged whole (a BATCH, a compressed v4 body) is held
in one buffer, up to ``max_held_frame``; past it the answer is a ProtocolError on
the frame's stream, and a close.

Frames here are built with the driver's own message classes and answers read with
its decoders (``tests/support/cql_wire.py``). A small ``max_held_frame`` keeps the
frames small: each large frame is fed whole, split at random, and in 64 KiB reads,
with the same outcome; the smallest also byte by byte.
"""

from __future__ import annotations

import gc
import io
import random
import struct
import tracemalloc

import pytest
from cassandra.connection import lz4_compress, lz4_decompress
from cassandra.protocol import BatchMessage, ExecuteMessage, PrepareMessage, QueryMessage
from cassandra.query import BatchType
from cassandra.segment import SegmentCodec

from parsers.base import (
    BODY_TIMEOUT,
    MAX_HELD_FRAME,
    Access,
    Close,
    Finished,
    Log,
    ParseError,
    Reply,
    ShutdownServer,
    ToClient,
    ToServer,
)
from parsers.cql.engine import CqlEngine
from parsers.requests import CqlRequest
from tests.parsers.cql.test_cassandra_engine import (
    ALLOW,
    ONE,
    deny_table,
    prepared,
    request,
    rows_void,
    started,
)
from tests.support.cql_wire import assert_unauthorized, client_envelopes
from tests.support.feeding import feed, split

KiB, MiB = 1 << 10, 1 << 20
HELD = 256 * KiB  # max_held_frame of most engines here
INSERT = "INSERT INTO ks.t (a, b) VALUES (1, ?)"
SECRET = "INSERT INTO ks.secret (a, b) VALUES (1, ?)"
PROTOCOL_ERROR = 0x000A
UNPREPARED = 0x2500


def query(text: str, stream: int, *values: bytes, version: int = 4, keyspace=None) -> bytes:
    message = QueryMessage(text, ONE, keyspace=keyspace)
    message.query_params = list(values)
    return request(message, stream, version)


def segments(frame: bytes, compression: bool = False) -> bytes:
    """``frame`` in v5 segments, as the driver cuts it (several for a large one)."""
    codec = SegmentCodec(lz4_compress, lz4_decompress) if compression else SegmentCodec()
    buf = io.BytesIO()
    codec.encode(buf, frame)
    return buf.getvalue()


def reads(data: bytes, size: int = 64 * KiB) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def ways(data: bytes, bytewise: bool = False):
    yield "whole", [data]
    yield "random", split(data, "random")
    yield "reads", reads(data)
    if bytewise:
        yield "bytewise", split(data, "bytewise")


def sent(out: list) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, ToServer))


def answered(out: list) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, ToClient))


def error_code(envelope) -> int:
    return struct.unpack(">i", envelope.body[:4])[0]


# --------------------------------------------------------------------------- v3/v4 QUERY


def test_a_large_query_is_judged_on_its_query_string_and_its_values_stream_to_the_server():
    engine = started(max_held_frame=HELD)
    frame = query(INSERT, 1, b"v" * MiB)  # four times what the engine may hold
    head, rest = frame[:100], frame[100:]

    assert engine.client_data(head) == [
        Access(CqlRequest("query", "insert", "ks.t", INSERT, 1, 4), ALLOW, 1),
        ToServer(head),
    ]
    assert engine.reading_body and not engine.reading_headers
    assert engine.held_bytes == 0

    assert engine.client_data(rest[:HELD]) == [ToServer(rest[:HELD])]
    after = query("SELECT * FROM ks.t", 2)
    out = engine.client_data(rest[HELD:] + after)  # its last bytes, and the next request

    assert out == [
        ToServer(rest[HELD:]),
        Access(CqlRequest("query", "select", "ks.t", "SELECT * FROM ks.t", 2, 4), ALLOW, 2),
        ToServer(after),
    ]
    assert not engine.reading_body and engine.held_bytes == 0
    assert engine.server_data(rows_void(1)) == [
        Reply(1, {"opcode": "RESULT", "result": "Void"}),
        ToClient(rows_void(1)),
    ]


@pytest.mark.parametrize("version", [3, 4])
def test_a_large_query_reaches_the_server_byte_for_byte_however_it_is_cut(version):
    frame = query(INSERT, 1, b"v" * (80 * KiB), version=version)
    for way, chunks in ways(frame, bytewise=True):
        engine = started(version=version, max_held_frame=64 * KiB)
        out = feed(engine.client_data, chunks)
        assert sent(out) == frame, way
        [access] = [c for c in out if isinstance(c, Access)]
        assert access.request.table == "ks.t", way
        assert engine.held_bytes == 0, way


def test_a_large_denied_query_is_dropped_as_it_arrives_and_answered_after_its_last_byte():
    engine = started(deny_table("ks.secret"), max_held_frame=HELD)
    frame = query(SECRET, 3, b"v" * MiB)

    out = engine.client_data(frame[:100])
    assert [type(c) for c in out] == [Access, Reply]
    assert not out[0].decision.allowed and out[1] == Reply(
        3, {"opcode": "ERROR", "error_code": 0x2100}
    )
    assert engine.reading_body and engine.held_bytes == 0

    assert engine.client_data(frame[100:-1]) == []  # dropped as it arrives, never held
    assert engine.held_bytes == 0
    [answer] = engine.client_data(frame[-1:])

    assert_unauthorized(answer.data, 4, stream=3, message_contains="ks.secret")
    assert not engine.reading_body


def test_a_large_denied_query_gets_the_same_answer_however_it_is_cut():
    frame = query(SECRET, 3, b"v" * MiB)
    for way, chunks in ways(frame):
        engine = started(deny_table("ks.secret"), max_held_frame=HELD)
        out = feed(engine.client_data, chunks)
        assert sent(out) == b"", way
        assert_unauthorized(answered(out), 4, stream=3, message_contains="ks.secret")


def test_a_query_string_longer_than_the_limit_is_refused_on_its_stream_and_the_connection_closed():
    text = "SELECT * FROM ks.t WHERE a IN (" + ",".join("1" for _ in range(HELD)) + ")"
    frame = query(text, 6)
    for way, chunks in ways(frame):
        engine = started(max_held_frame=HELD)
        out = feed(engine.client_data, chunks)
        assert sent(out) == b"", way
        [error] = [c for c in out if isinstance(c, ParseError)]
        assert (error.close, error.error.code, error.error.limit) == (
            True,
            "frame_too_large",
            MAX_HELD_FRAME,
        ), way
        [envelope] = client_envelopes(answered(out), 4)
        assert (envelope.stream, error_code(envelope)) == (6, PROTOCOL_ERROR), way
        assert engine.held_bytes == 0 and engine.client_data(b"more") == []


# --------------------------------------------------------------------------- EXECUTE


def test_a_large_execute_is_judged_on_its_prepared_id_and_its_values_stream():
    denied: set[str] = set()  # the policy changes after both statements are prepared
    engine = started(lambda r: deny_table(*denied)(r), max_held_frame=HELD)
    for stream, text, pid in [(1, INSERT, b"id-t"), (2, SECRET, b"id-secret")]:
        engine.client_data(request(PrepareMessage(text), stream))
        engine.server_data(prepared(pid, stream))
    denied.add("ks.secret")

    allowed = request(ExecuteMessage(b"id-t", [b"v" * MiB], ONE), 4)
    out = engine.client_data(allowed[:40])
    assert out == [
        Access(CqlRequest("execute", "insert", "ks.t", INSERT, 4, 4), ALLOW, 4),
        ToServer(allowed[:40]),
    ]
    assert engine.client_data(allowed[40:]) == [ToServer(allowed[40:])]

    refused = request(ExecuteMessage(b"id-secret", [b"v" * MiB], ONE), 5)
    out = feed(engine.client_data, reads(refused))
    assert sent(out) == b""
    assert_unauthorized(answered(out), 4, stream=5, message_contains="ks.secret")


def test_a_large_execute_of_an_unknown_id_is_dropped_then_answered_unprepared():
    engine = started(max_held_frame=HELD)
    frame = request(ExecuteMessage(b"\x01\x02\x03", [b"v" * MiB], ONE), 7)

    out = feed(engine.client_data, reads(frame))

    assert sent(out) == b""
    [envelope] = client_envelopes(answered(out), 4)
    assert (envelope.stream, error_code(envelope)) == (7, UNPREPARED)
    assert Reply(7, {"opcode": "ERROR", "error_code": UNPREPARED}) in out


# --------------------------------------------------------------------------- held whole


def batch(stream: int, value: bytes, text: str = INSERT) -> bytes:
    message = BatchMessage(BatchType.LOGGED, [(False, text, [value]), (False, text, [b"x"])], ONE)
    return request(message, stream)


def test_a_batch_is_held_whole_in_one_buffer_and_handed_to_the_server_as_it_is():
    frame = batch(8, b"v" * (HELD - 1000))
    for way, chunks in ways(frame):
        engine = started(max_held_frame=HELD)
        out = feed(engine.client_data, chunks[:-1])
        assert out == [], way  # every statement must be in before it is judged
        assert engine.held_bytes == len(frame) - len(chunks[-1]), way

        out = engine.client_data(chunks[-1])

        assert [type(c) for c in out] == [Access, Access, ToServer], way
        assert out[-1].data == frame and isinstance(out[-1].data, bytearray), way  # no copy
        assert engine.held_bytes == 0


def test_a_batch_longer_than_the_limit_is_refused_at_its_header():
    frame = batch(9, b"v" * HELD)
    engine = started(max_held_frame=HELD)

    out = engine.client_data(frame[:9])  # its header says how long it is: enough

    [answer, error] = out
    assert isinstance(error, ParseError) and error.error.limit == MAX_HELD_FRAME
    [envelope] = client_envelopes(answer.data, 4)
    assert (envelope.stream, error_code(envelope)) == (9, PROTOCOL_ERROR)
    assert "the most held for one request" in envelope.decode().message
    assert engine.client_data(frame[9:]) == []


def test_a_compressed_body_is_judged_whole_and_refused_past_the_limit():
    engine = started(compression="lz4", max_held_frame=HELD)
    value = random.Random(1).randbytes(HELD // 2)  # does not compress: a large body
    small = request(QueryMessage(INSERT, ONE), 1, 4, lz4_compress)
    message = QueryMessage(INSERT, ONE)
    message.query_params = [value]
    held = request(message, 2, 4, lz4_compress)
    assert 64 * KiB < len(held) < HELD and held[1] & 0x01

    out = feed(engine.client_data, [small, *reads(held)])

    assert sent(out) == small + held
    assert [c.request.stream for c in out if isinstance(c, Access)] == [1, 2]

    message.query_params = [value * 3]
    too_long = request(message, 3, 4, lz4_compress)
    out = engine.client_data(too_long[:9])
    assert [c.error.limit for c in out if isinstance(c, ParseError)] == [MAX_HELD_FRAME]


# --------------------------------------------------------------------------- v5 segments


@pytest.mark.parametrize("compression", [False, True], ids=["v5", "v5-lz4"])
def test_a_v5_envelope_is_judged_on_its_first_segment_and_the_rest_forwarded_as_received(
    compression,
):
    engine = started(version=5, compression="lz4" if compression else None, max_held_frame=HELD)
    wire = segments(query(INSERT, 1, b"v" * MiB, version=5), compression)
    first = _first_segment_length(wire, compression)  # one whole segment

    out = engine.client_data(wire[:first])

    assert out == [
        Access(CqlRequest("query", "insert", "ks.t", INSERT, 1, 5), ALLOW, 1),
        ToServer(wire[:first]),
    ]
    assert engine.reading_body and engine.held_bytes == 0
    out = feed(engine.client_data, reads(wire[first:], 100_000))
    assert sent(out) == wire[first:]
    assert not engine.reading_body and engine.held_bytes == 0


@pytest.mark.parametrize("compression", [False, True], ids=["v5", "v5-lz4"])
def test_a_denied_v5_envelope_has_its_segments_dropped_then_gets_its_answer(compression):
    wire = segments(query(SECRET, 2, b"v" * MiB, version=5), compression)
    for way, chunks in ways(wire):
        engine = started(
            deny_table("ks.secret"),
            version=5,
            compression="lz4" if compression else None,
            max_held_frame=HELD,
        )
        out = feed(engine.client_data, chunks)
        assert sent(out) == b"", way
        assert_unauthorized(
            answered(out),
            5,
            stream=2,
            compression="lz4" if compression else None,
            message_contains="ks.secret",
        )


def test_a_v5_query_naming_an_unqualified_table_waits_for_its_keyspace_after_the_values():
    engine = started(version=5)
    unqualified = segments(
        query("INSERT INTO t (a, b) VALUES (1, ?)", 1, b"v" * (300 * KiB), version=5, keyspace="ks")
    )
    first = _first_segment_length(unqualified)

    assert engine.client_data(unqualified[:first]) == []  # the keyspace comes last
    assert engine.reading_headers
    out = engine.client_data(unqualified[first:])
    assert [c.request.table for c in out if isinstance(c, Access)] == ["ks.t"]
    assert sent(out) == unqualified

    qualified = segments(query(INSERT, 2, b"v" * (300 * KiB), version=5, keyspace="other"))
    out = engine.client_data(qualified[:first])
    assert [c.request.table for c in out if isinstance(c, Access)] == ["ks.t"]  # judged now


def test_a_v5_batch_over_the_limit_is_refused_once_its_first_segment_says_how_long_it_is():
    message = BatchMessage(BatchType.LOGGED, [(False, INSERT, [b"v" * HELD])], ONE)
    wire = segments(request(message, 4, 5))
    engine = started(version=5, max_held_frame=HELD)

    out = engine.client_data(wire[: _first_segment_length(wire)])

    [error] = [c for c in out if isinstance(c, ParseError)]
    assert error.error.limit == MAX_HELD_FRAME
    [envelope] = client_envelopes(answered(out), 5)
    assert (envelope.stream, error_code(envelope)) == (4, PROTOCOL_ERROR)


def _first_segment_length(wire: bytes, compression: bool = False) -> int:
    codec = SegmentCodec(lz4_compress, lz4_decompress) if compression else SegmentCodec()
    header = codec.decode_header(io.BytesIO(wire[: codec.header_length_with_crc]))
    return codec.header_length_with_crc + header.payload_length + 4


# --------------------------------------------------------------------------- the clocks


def test_a_large_query_is_a_head_until_judged_then_a_body_until_its_last_byte():
    engine = started(max_held_frame=HELD)
    frame = query(INSERT, 1, b"v" * MiB)
    before = engine.heads_read

    engine.client_data(frame[:20])  # the header and part of the query string
    assert engine.reading_headers and not engine.reading_body
    assert engine.held_bytes == 20

    engine.client_data(frame[20:100])  # judged
    assert engine.reading_body and not engine.reading_headers
    assert engine.heads_read != before

    assert engine.client_timed_out(BODY_TIMEOUT) == [Close("body_timeout")]
    assert not engine.reading_body and engine.client_data(frame[100:]) == []


def test_client_eof_inside_a_streamed_query_ends_it_toward_the_server():
    engine = started(max_held_frame=HELD)
    frame = query(INSERT, 1, b"v" * MiB)
    engine.client_data(frame[:HELD])

    out = engine.client_data(b"")

    assert [type(c) for c in out] == [Log, ShutdownServer]
    assert "more due" in out[0].message
    assert not engine.reading_body and engine.held_bytes == 0


def test_trailing_garbage_after_a_large_query():
    engine = started(max_held_frame=HELD)
    frame = query(INSERT, 1, b"v" * MiB)

    out = engine.client_data(frame + b"\x01garbage-garbage")

    assert sent(out) == frame
    assert isinstance(out[-1], ParseError) and out[-1].close


# --------------------------------------------------------------------------- memory


def peak_while_fed(engine: CqlEngine, frame: bytes) -> int:
    """The most the engine allocates while ``frame`` comes in 256 KiB reads, each read
    a fresh bytes object let go once handed over (as the transport does)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(frame), 256 * KiB):
            engine.client_data(frame[i : i + 256 * KiB])
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_streamed_query_costs_a_read_not_its_size():
    # Before: a 64 MiB QUERY peaked at 4.1x its size in the engine alone (its
    # bytearray, a slice of it, bytes of that slice, the envelope's body).
    frame = query(INSERT, 1, b"v" * (32 * MiB))
    peak = peak_while_fed(started(), frame)
    assert peak < 2 * MiB, peak


def test_a_frame_held_whole_costs_about_its_size_once():
    message = BatchMessage(BatchType.LOGGED, [(False, INSERT, [b"v" * (12 * MiB)])], ONE)
    frame = request(message, 1)
    peak = peak_while_fed(started(), frame)
    assert peak < 1.3 * len(frame), peak / len(frame)


# --------------------------------------------------------------------------- a drain


def test_a_drain_waits_for_the_last_byte_of_a_dropped_request_and_finishes_behind_its_answer():
    engine = started(deny_table("ks.secret"), max_held_frame=HELD)
    frame = query(SECRET, 3, b"v" * MiB)
    engine.client_data(frame[:100])  # judged and denied: the rest is still to come
    assert engine.finish() == []

    assert engine.client_data(frame[100:-1]) == []  # not between requests yet
    out = engine.client_data(frame[-1:])

    assert [type(c) for c in out] == [ToClient, Finished]
    assert_unauthorized(out[0].data, 4, stream=3, message_contains="ks.secret")


def test_a_drain_waits_for_a_streamed_request_and_its_answer():
    engine = started(max_held_frame=HELD)
    frame = query(INSERT, 1, b"v" * MiB)
    engine.client_data(frame[:100])
    engine.finish()

    assert Finished(told=False) not in engine.client_data(frame[100:])
    assert engine.server_data(rows_void(1))[-1] == Finished(told=False)
