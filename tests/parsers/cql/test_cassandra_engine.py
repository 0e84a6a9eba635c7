"""CqlEngine transcripts: requests encoded by the real driver's message classes,
answers built byte by byte from the spec, and the exact commands that come out."""

from __future__ import annotations

import io
import struct

import pytest
from cassandra import ConsistencyLevel
from cassandra.connection import lz4_compress, lz4_decompress
from cassandra.protocol import (
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    ProtocolHandler,
    QueryMessage,
    StartupMessage,
)
from cassandra.query import BatchType
from cassandra.segment import SegmentCodec

from parsers.base import (
    Access,
    Close,
    Decision,
    Log,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    ToClient,
    ToServer,
)
from parsers.cql.engine import CqlEngine
from parsers.requests import CqlRequest
from tests.support.cql_wire import assert_unauthorized

ONE = ConsistencyLevel.ONE
ALLOW = Decision(True, policy="p", reason="ok")


def deny_table(*tables: str):
    def decide(request: CqlRequest) -> Decision:
        if request.table in tables:
            return Decision(
                False, policy="cql-policy", rule="ingress[0].l7", reason="no rule allows it"
            )
        return ALLOW

    return decide


def request(msg, stream: int, version: int = 4, compressor=None) -> bytes:
    return ProtocolHandler.encode_message(msg, stream, version, compressor, False)


def response(opcode: int, body: bytes, stream: int, version: int = 4, flags: int = 0) -> bytes:
    return struct.pack(">BBhBI", 0x80 | version, flags, stream, opcode, len(body)) + body


def string(s: str) -> bytes:
    return struct.pack(">H", len(s)) + s.encode()


def ready(stream: int, version: int = 4) -> bytes:
    return response(0x02, b"", stream, version)


def rows_void(stream: int, version: int = 4) -> bytes:
    return response(0x08, struct.pack(">i", 1), stream, version)


def set_keyspace(ks: str, stream: int, version: int = 4) -> bytes:
    return response(0x08, struct.pack(">i", 3) + string(ks), stream, version)


def prepared(
    prepared_id: bytes, stream: int, version: int = 4, flags: int = 0, prefix: bytes = b""
) -> bytes:
    body = prefix + struct.pack(">iH", 4, len(prepared_id)) + prepared_id
    body += struct.pack(">iii", 0, 0, 0) + struct.pack(
        ">ii", 4, 0
    )  # no bind variables, no result metadata
    return response(0x08, body, stream, version, flags)


def started(
    decide=lambda r: ALLOW, version: int = 4, compression: str | None = None, **kw
) -> CqlEngine:
    engine = CqlEngine(decide, **kw)
    options = {"CQL_VERSION": "3.4.5"} | ({"COMPRESSION": compression} if compression else {})
    startup = request(StartupMessage("3.4.5", options), 0, version)
    assert engine.client_data(startup) == [ToServer(startup)]
    out = engine.server_data(ready(0, version))
    assert out[-1] == ToClient(ready(0, version))
    return engine


# --------------------------------------------------------------------------


def test_allowed_query_is_judged_then_forwarded_unchanged():
    engine = started()
    frame = request(QueryMessage("SELECT * FROM ks.t", ONE), 5)
    assert engine.client_data(frame) == [
        Access(CqlRequest("query", "select", "ks.t", "SELECT * FROM ks.t", 5, 4), ALLOW, 5),
        ToServer(frame),
    ]
    assert engine.server_data(rows_void(5)) == [
        Reply(5, {"opcode": "RESULT", "result": "Void"}),
        ToClient(rows_void(5)),
    ]


@pytest.mark.parametrize("version", [3, 4, 5])
def test_denied_query_answered_unauthorized_on_its_stream_and_others_unaffected(version):
    engine = started(deny_table("ks.secret"), version)
    codec = SegmentCodec()
    a = request(QueryMessage("SELECT * FROM ks.a", ONE), 1, version)
    secret = request(QueryMessage("SELECT * FROM ks.secret", ONE), 2, version)
    b = request(QueryMessage("SELECT * FROM ks.b", ONE), 3, version)
    if version < 5:
        out = engine.client_data(a + secret + b)
        assert [type(c).__name__ for c in out] == [
            "Access",
            "Access",
            "Reply",
            "ToServer",
            "ToClient",
            "Access",
            "ToServer",
        ]
        assert out[3] == ToServer(a) and out[6] == ToServer(b)
    else:
        # the three envelopes travel in one v5 segment; the proxy re-frames the allowed two
        buf = io.BytesIO()
        codec.encode(buf, a + secret + b)
        out = engine.client_data(buf.getvalue())
        to_server = [c.data for c in out if isinstance(c, ToServer)]
        assert len(to_server) == 1
        header = codec.decode_header(io.BytesIO(to_server[0][:6]))
        assert header.is_self_contained
        segment = codec.decode(io.BytesIO(to_server[0][6:]), header)
        assert segment.payload == a + b
    [denial] = [c.data for c in out if isinstance(c, ToClient)]
    assert_unauthorized(
        denial,
        version,
        stream=2,
        message_contains="select on ks.secret denied by policy cql-policy rule ingress[0].l7",
    )
    access = [c for c in out if isinstance(c, Access)]
    assert [(c.request.table, c.decision.allowed, c.key) for c in access] == [
        ("ks.a", True, 1),
        ("ks.secret", False, 2),
        ("ks.b", True, 3),
    ]
    assert Reply(2, {"opcode": "ERROR", "error_code": 0x2100}) in out


def test_v5_lz4_denial_is_a_compressed_segment_the_driver_codec_reads():
    engine = started(deny_table("ks.secret"), 5, "lz4")
    codec = SegmentCodec(lz4_compress, lz4_decompress)
    buf = io.BytesIO()
    text = "SELECT * FROM ks.secret WHERE " + " AND ".join(f"c{i} = {i}" for i in range(40))
    codec.encode(buf, request(QueryMessage(text, ONE), 9, 5))
    out = engine.client_data(buf.getvalue())
    assert not [c for c in out if isinstance(c, ToServer)]
    [answer] = [c.data for c in out if isinstance(c, ToClient)]
    assert codec.decode_header(io.BytesIO(answer[:8])).is_self_contained
    assert_unauthorized(answer, 5, stream=9, compression="lz4", message_contains="ks.secret")


def test_v5_large_query_split_over_segments_is_forwarded_as_received_or_denied_whole():
    codec = SegmentCodec()
    big = "SELECT * FROM ks.t WHERE a IN (" + ",".join(str(i) for i in range(40000)) + ")"
    buf = io.BytesIO()
    frame = request(QueryMessage(big, ONE), 4, 5)
    assert len(frame) > 128 * 1024
    codec.encode(buf, frame)
    wire = buf.getvalue()

    engine = started(version=5)
    out = []
    for i in range(0, len(wire), 7000):
        out += engine.client_data(wire[i : i + 7000])
    assert b"".join(c.data for c in out if isinstance(c, ToServer)) == wire
    assert [c.request.table for c in out if isinstance(c, Access)] == ["ks.t"]

    engine = started(deny_table("ks.t"), version=5)
    out = engine.client_data(wire)
    assert not [c for c in out if isinstance(c, ToServer)]
    [answer] = [c.data for c in out if isinstance(c, ToClient)]
    assert_unauthorized(answer, 5, stream=4, message_contains="ks.t")


def test_v4_lz4_bodies_are_judged_and_denials_compressed():
    engine = started(deny_table("ks.secret"), 4, "lz4")
    ok = request(QueryMessage("SELECT * FROM ks.ok", ONE), 1, 4, lz4_compress)
    no = request(QueryMessage("SELECT * FROM ks.secret", ONE), 2, 4, lz4_compress)
    assert ok[1] & 0x01 and no[1] & 0x01
    out = engine.client_data(ok + no)
    assert [c for c in out if isinstance(c, ToServer)] == [ToServer(ok)]
    denial = out[-1].data
    assert denial[1] == 0x01  # compressed, as negotiated
    assert_unauthorized(denial, 4, stream=2, compression="lz4", message_contains="ks.secret")


def test_unqualified_tables_resolve_through_use_and_the_v5_keyspace_flag():
    engine = started(version=5)
    codec = SegmentCodec()

    def seg(frame):
        buf = io.BytesIO()
        codec.encode(buf, frame)
        return buf.getvalue()

    out = engine.client_data(seg(request(QueryMessage("USE ks", ONE), 1, 5)))
    assert out[0].request.action == "use" and out[0].decision.allowed
    engine.server_data(seg(set_keyspace("ks", 1, 5)))
    assert engine.keyspace == "ks"
    out = engine.client_data(seg(request(QueryMessage("SELECT * FROM t", ONE), 2, 5)))
    assert out[0].request.table == "ks.t"
    out = engine.client_data(
        seg(request(QueryMessage("SELECT * FROM t", ONE, keyspace="other"), 3, 5))
    )
    assert out[0].request.table == "other.t"
    out = engine.client_data(
        seg(request(PrepareMessage("INSERT INTO t (a) VALUES (?)", keyspace="pk"), 4, 5))
    )
    assert out[0].request == CqlRequest(
        "prepare", "insert", "pk.t", "INSERT INTO t (a) VALUES (?)", 4, 5
    )


def test_execute_of_an_unknown_id_is_answered_unprepared_and_never_forwarded():
    engine = started()
    execute = request(ExecuteMessage(b"\x01\x02\x03", [], ONE), 7)
    out = engine.client_data(execute)
    assert not [c for c in out if isinstance(c, ToServer)]
    [access] = [c for c in out if isinstance(c, Access)]
    assert not access.decision.allowed and "unknown prepared id" in access.decision.reason
    assert Reply(7, {"opcode": "ERROR", "error_code": 0x2500}) in out
    frame = out[-1].data
    code, n = struct.unpack(">iH", frame[9:15])
    assert code == 0x2500
    assert frame[15 + n :] == b"\x00\x03\x01\x02\x03"  # the unknown id, as [short bytes]


def test_prepared_ids_are_learned_from_results_and_executes_judged_as_their_statement():
    engine = started(deny_table("ks.secret"))
    for stream, text, pid in [
        (1, "SELECT * FROM ks.t WHERE a = ?", b"id-t"),
        (2, "SELECT * FROM ks.pub", b"id-pub"),
    ]:
        out = engine.client_data(request(PrepareMessage(text), stream))
        assert out[0].request.opcode == "prepare"
        # tracing id, warnings and a custom payload precede the result body
        prefix = (
            b"\x11" * 16
            + struct.pack(">H", 1)
            + string("warn")
            + struct.pack(">H", 1)
            + string("k")
            + struct.pack(">i", 1)
            + b"v"
        )
        out = engine.server_data(prepared(pid, stream, flags=0x02 | 0x08 | 0x04, prefix=prefix))
        assert out[0] == Reply(stream, {"opcode": "RESULT", "result": "Prepared"})
    execute = request(ExecuteMessage(b"id-t", [b"\x00\x00\x00\x01"], ONE), 3)
    out = engine.client_data(execute)
    assert out == [
        Access(
            CqlRequest("execute", "select", "ks.t", "SELECT * FROM ks.t WHERE a = ?", 3, 4),
            ALLOW,
            3,
        ),
        ToServer(execute),
    ]
    # a prepare that is denied is never learned, so its id stays unknown
    out = engine.client_data(request(PrepareMessage("SELECT * FROM ks.secret"), 4))
    assert_unauthorized(out[-1].data, 4, stream=4, message_contains="select on ks.secret")


def test_batch_is_allowed_only_if_every_member_is():
    engine = started(deny_table("ks.secret"))
    engine.client_data(request(PrepareMessage("INSERT INTO ks.t (a) VALUES (?)"), 1))
    engine.server_data(prepared(b"ins", 1))
    ok = request(
        BatchMessage(
            BatchType.LOGGED,
            [
                (True, b"ins", [b"\x00\x00\x00\x01"]),
                (False, "UPDATE ks.u SET b = 1 WHERE a = 1", []),
            ],
            ONE,
        ),
        2,
    )
    out = engine.client_data(ok)
    assert [
        (c.request.opcode, c.request.action, c.request.table, c.key)
        for c in out
        if isinstance(c, Access)
    ] == [("batch", "insert", "ks.t", (2, 0)), ("batch", "update", "ks.u", (2, 1))]
    assert out[-1] == ToServer(ok)
    assert engine.server_data(rows_void(2))[:2] == [
        Reply((2, 0), {"opcode": "RESULT", "result": "Void"}),
        Reply((2, 1), {"opcode": "RESULT", "result": "Void"}),
    ]

    bad = request(
        BatchMessage(
            BatchType.UNLOGGED,
            [
                (True, b"ins", [b"\x00\x00\x00\x02"]),
                (False, "DELETE FROM ks.secret WHERE a = 1", []),
            ],
            ONE,
        ),
        3,
    )
    out = engine.client_data(bad)
    assert not [c for c in out if isinstance(c, ToServer)]
    access = [c for c in out if isinstance(c, Access)]
    assert [(c.request.table, c.decision.allowed) for c in access] == [
        ("ks.t", False),
        ("ks.secret", False),
    ]
    assert "batch refused: delete ks.secret is denied" in access[0].decision.reason
    assert_unauthorized(out[-1].data, 4, stream=3, message_contains="delete on ks.secret")


def test_audit_decisions_are_forwarded():
    engine = started(lambda r: Decision(True, policy="p", reason="would deny", audit=True))
    frame = request(QueryMessage("DROP TABLE ks.t", ONE), 1)
    out = engine.client_data(frame)
    assert out[0].decision.audit and out[-1] == ToServer(frame)


def test_options_startup_register_are_not_judged():
    engine = CqlEngine(lambda r: pytest.fail("must not be judged"))
    options = request(OptionsMessage(), 0)
    assert engine.client_data(options) == [ToServer(options)]


def test_unsupported_protocol_version_is_answered_so_the_driver_downgrades():
    engine = CqlEngine(lambda r: ALLOW)
    startup = bytearray(request(StartupMessage("3.4.5", {"CQL_VERSION": "3.4.5"}), 0, 4))
    startup[0] = 0x42  # DSE_V2, what the driver tries first
    out = engine.client_data(bytes(startup))
    assert not [c for c in out if isinstance(c, ToServer)]
    [answer] = [c.data for c in out if isinstance(c, ToClient)]
    assert answer[0] == 0x85 and answer[4] == 0x00
    code, n = struct.unpack(">iH", answer[9:15])
    assert code == 0x000A and "unsupported protocol version" in answer[15 : 15 + n].decode()
    assert not [c for c in out if isinstance(c, ParseError)]  # negotiation, not an error
    assert [c.level for c in out if isinstance(c, Log)] == ["info"]


def test_malformed_body_is_answered_protocol_error_and_the_connection_continues():
    engine = started()
    broken = struct.pack(">BBhBI", 4, 0, 6, 0x07, 4) + struct.pack(
        ">i", 1000
    )  # [long string] past the end
    good = request(QueryMessage("SELECT * FROM ks.t", ONE), 7)
    response_bit = bytearray(good)
    response_bit[0] = 0x84
    out = engine.client_data(broken + bytes(response_bit) + good)
    assert [c.close for c in out if isinstance(c, ParseError)] == [False, False]
    answers = [c.data for c in out if isinstance(c, ToClient)]
    assert [struct.unpack(">h", a[2:4])[0] for a in answers] == [6, 7]
    assert all(struct.unpack(">i", a[9:13])[0] == 0x000A for a in answers)
    assert out[-1] == ToServer(good)


def test_oversized_frame_is_refused_and_the_connection_closed():
    engine = started(max_frame=1000)
    header = struct.pack(">BBhBI", 4, 0, 3, 0x07, 5000)
    out = engine.client_data(header + b"x" * 100)
    assert not [c for c in out if isinstance(c, ToServer)]
    [error] = [c for c in out if isinstance(c, ParseError)]
    assert error.close and error.error.code == "frame_too_large"
    [answer] = [c.data for c in out if isinstance(c, ToClient)]
    assert struct.unpack(">h", answer[2:4])[0] == 3 and answer[9:13] == struct.pack(">i", 0x000A)
    assert engine.client_data(b"more") == []


def test_trailing_garbage_after_valid_frames():
    engine = started()
    good = request(QueryMessage("SELECT * FROM ks.t", ONE), 1)
    out = engine.client_data(good + b"\x01garbage-garbage")
    assert out[1] == ToServer(good)
    assert isinstance(out[-1], ParseError) and out[-1].close


def test_v5_segment_with_bad_crc_closes_the_connection():
    engine = started(version=5)
    buf = io.BytesIO()
    SegmentCodec().encode(buf, request(QueryMessage("SELECT * FROM ks.t", ONE), 1, 5))
    wire = bytearray(buf.getvalue())
    wire[-1] ^= 0xFF  # payload CRC32
    out = engine.client_data(bytes(wire))
    assert [type(c).__name__ for c in out] == ["ParseError"]
    assert out[0].close and "CRC32" in str(out[0].error)
    wire = bytearray(buf.getvalue())
    wire[4] ^= 0x01  # header CRC24
    out = started(version=5).client_data(bytes(wire))
    assert "CRC24" in str(out[0].error)


def test_denial_waits_for_a_server_envelope_split_over_segments():
    engine = started(deny_table("ks.secret"), version=5)
    codec = SegmentCodec()
    big = response(0x08, struct.pack(">i", 1) + b"\x00" * 200_000, 1, 5)
    buf = io.BytesIO()
    codec.encode(buf, big)
    wire = buf.getvalue()
    first = wire[: 6 + 128 * 1024 - 1 + 4]  # the first of two segments
    out = engine.server_data(first)
    assert out == [ToClient(first)]
    q = io.BytesIO()
    codec.encode(q, request(QueryMessage("SELECT * FROM ks.secret", ONE), 2, 5))
    out = engine.client_data(q.getvalue())
    assert not [
        c for c in out if isinstance(c, ToClient)
    ]  # held: it would land inside the envelope
    out = engine.server_data(wire[len(first) :])
    assert out[0] == ToClient(wire[len(first) :])
    assert isinstance(out[1], ToClient) and len(out) == 2


def test_partial_header_then_eof():
    engine = started()
    assert not engine.reading_headers
    assert engine.client_data(b"\x04\x00") == []
    assert engine.reading_headers
    out = engine.client_data(b"")
    assert isinstance(out[0], Log) and "2 bytes dropped" in out[0].message
    assert out[1:] == [ShutdownServer(), Close("client closed; every response delivered")]


def test_client_eof_with_nothing_owed_ends_the_connection():
    # CQL has no half-close: a connection left half open would hold two descriptors
    # until the idle timeout.
    engine = started()
    assert engine.client_data(b"") == [
        ShutdownServer(),
        Close("client closed; every response delivered"),
    ]


def test_client_eof_waits_for_the_responses_still_owed():
    engine = started()
    frame = request(QueryMessage("SELECT * FROM ks.t", ONE), 5)
    engine.client_data(frame)
    assert engine.client_data(b"") == [ShutdownServer()]
    assert engine.server_data(rows_void(5)) == [
        Reply(5, {"opcode": "RESULT", "result": "Void"}),
        ToClient(rows_void(5)),
        Close("client closed; every response delivered"),
    ]


def test_pipelining_past_max_pending_holds_the_rest_until_half_are_answered():
    engine = started(max_pending=4)
    frames = [request(QueryMessage("SELECT * FROM ks.t", ONE), n) for n in range(8)]

    cmds = engine.client_data(b"".join(frames))
    assert [c.key for c in cmds if isinstance(c, Access)] == [0, 1, 2, 3]
    assert b"".join(c.data for c in cmds if isinstance(c, ToServer)) == b"".join(frames[:4])
    assert not engine.reading_headers  # held whole, not a slow head
    assert engine.client_data(b"") == []  # EOF waits behind the held requests

    assert [c for c in engine.server_data(rows_void(0)) if isinstance(c, Access)] == []
    two = engine.server_data(rows_void(1))  # 2 owed: half
    assert [c.key for c in two if isinstance(c, Access)] == [4, 5]
    assert b"".join(c.data for c in two if isinstance(c, ToServer)) == b"".join(frames[4:6])

    engine.server_data(rows_void(2))
    rest = engine.server_data(rows_void(3))
    assert [c.key for c in rest if isinstance(c, Access)] == [6, 7]
    assert isinstance(rest[-1], ShutdownServer)  # then the client's EOF, in order
    for n in range(4, 8):
        last = engine.server_data(rows_void(n))
    assert last[-1] == Close("client closed; every response delivered")


def test_server_eof_ends_the_connection():
    engine = started()
    assert engine.server_data(b"") == [ShutdownClient(), Close("server closed")]


# --------------------------------------------------------------------------
# Bad input never crashes the engine: it answers, or closes, and stops.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _feed_safely(engine: CqlEngine, chunks) -> list:
    out = []
    for side, data in chunks:
        out += (engine.client_data if side == "c" else engine.server_data)(data)
    closing = [c for c in out if isinstance(c, ParseError) and c.close]
    if closing:
        # after a close-worthy error the engine is inert
        assert engine.client_data(b"\x04\x00\x00\x01\x07\x00\x00\x00\x00") == []
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("cs"), st.binary(min_size=1, max_size=64)), max_size=12),
    st.sampled_from([3, 4, 5]),
    st.sampled_from([None, "lz4", "snappy"]),
)
def test_random_bytes_never_crash_the_engine(chunks, version, compression):
    if version == 5 and compression == "snappy":
        compression = None
    _feed_safely(started(version=version, compression=compression), chunks)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.sampled_from([4, 5]))
def test_corrupted_driver_frames_never_crash_the_engine(position, value, version):
    codec = SegmentCodec()
    frames = b"".join(
        [
            request(QueryMessage("SELECT * FROM ks.t WHERE a = 1", ONE), 1, version),
            request(PrepareMessage("INSERT INTO t (a, b) VALUES (?, ?)"), 2, version),
            request(
                ExecuteMessage(b"abc", [b"\x00\x00\x00\x01", None], ONE, result_metadata_id=b"m"),
                3,
                version,
            ),
            request(
                BatchMessage(
                    BatchType.LOGGED,
                    [(False, "DELETE FROM ks.t WHERE a = 2", []), (True, b"abc", [b"x"])],
                    ONE,
                ),
                4,
                version,
            ),
        ]
    )
    if version == 5:
        buf = io.BytesIO()
        codec.encode(buf, frames)
        frames = buf.getvalue()
    corrupted = bytearray(frames)
    corrupted[position % len(corrupted)] = value
    out = _feed_safely(started(version=version), [("c", bytes(corrupted))])
    assert all(isinstance(c, (Access, Reply, ToServer, ToClient, ParseError, Log)) for c in out)


@pytest.mark.parametrize(
    "compression, body",
    [
        ("lz4", struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 8),  # claims ~4 GiB uncompressed
        ("snappy", b"\xff\xff\xff\xff\x0f" + b"\x00" * 8),
    ],
)
def test_compressed_bodies_claiming_huge_sizes_are_refused_before_inflating(compression, body):
    engine = started(version=4, compression=compression, max_frame=1 << 20)
    frame = struct.pack(">BBhBI", 4, 0x01, 5, 0x07, len(body)) + body
    out = engine.client_data(frame)
    assert not [c for c in out if isinstance(c, ToServer)]
    [answer] = [c.data for c in out if isinstance(c, ToClient)]
    assert struct.unpack(">h", answer[2:4])[0] == 5


@pytest.mark.parametrize("version", [4, 5])
def test_custom_payload_tracing_and_beta_flags_on_requests(version):
    engine = started(version=version)
    msg = QueryMessage("DELETE FROM ks.t WHERE a = 1", ONE)
    msg.custom_payload = {"tenant": b"blue", "trace-tag": b"x"}
    msg.tracing = True
    frame = bytearray(request(msg, 11, version))
    frame[1] |= 0x10  # beta flag: allowed, ignored
    assert frame[1] & 0x04 and frame[1] & 0x02
    if version == 5:
        buf = io.BytesIO()
        SegmentCodec().encode(buf, bytes(frame))
        wire = buf.getvalue()
    else:
        wire = bytes(frame)
    out = engine.client_data(wire)
    assert [(c.request.action, c.request.table) for c in out if isinstance(c, Access)] == [
        ("delete", "ks.t")
    ]
    assert out[-1] == ToServer(wire)


def test_server_events_and_heartbeats_pass_without_judgement():
    engine = started(version=5)
    codec = SegmentCodec()

    def seg(frame):
        buf = io.BytesIO()
        codec.encode(buf, frame)
        return buf.getvalue()

    heartbeat = seg(request(OptionsMessage(), 30, 5))
    assert engine.client_data(heartbeat) == [ToServer(heartbeat)]
    event_body = string("SCHEMA_CHANGE") + string("CREATED") + string("KEYSPACE") + string("ks")
    event = seg(response(0x0C, event_body, -1, 5))
    assert engine.server_data(event) == [ToClient(event)]
    supported = seg(response(0x06, struct.pack(">H", 0), 30, 5))
    assert engine.server_data(supported) == [ToClient(supported)]
