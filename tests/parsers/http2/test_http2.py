"""H2Engine transcripts: a real h2 client and a real h2 server object, the engine between.

Every transcript runs three ways: bytes handed over whole, byte by byte, and
split at random points.
"""

from __future__ import annotations

import h2.events as ev
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame

from parsers.base import Access, Close, Decision, ParseError, Reply
from parsers.http2.engine import H2Engine, H2Limits
from parsers.requests import GrpcCall, HttpRequest
from tests.support.h2_transcript import (
    SPLITS,
    Transcript,
    assert_grpc_trailers_only,
    grpc_headers,
    grpc_message,
    request_headers,
)

DENY_RULE = Decision(
    False, policy="default/grpc-demo", rule="ingress[0].rules.grpc[0]", reason="no rule matched"
)


def decide(request):
    """Deny /admin* over HTTP and grpc.testing.TestService/UnaryCall over gRPC."""
    if isinstance(request, GrpcCall):
        if request.method == "UnaryCall":
            return DENY_RULE
        return Decision(True, policy="default/grpc-demo", rule="ingress[0].rules.grpc[1]")
    if request.path.startswith("/admin"):
        return Decision(False, policy="default/web", rule="ingress[0].rules.http[0]")
    return Decision(True, policy="default/web", rule="ingress[0].rules.http[1]")


@pytest.fixture(params=list(SPLITS))
def split(request):
    return SPLITS[request.param]


def respond(
    t: Transcript, stream_id: int, body: bytes = b"hello", status: bytes = b"200", trailers=None
):
    t.server.send_headers(stream_id, [(b":status", status), (b"content-type", b"text/plain")])
    t.send_body(t.server, stream_id, body, end_stream=trailers is None)
    if trailers is not None:
        t.server.send_headers(stream_id, trailers, end_stream=True)
    t.pump()


def test_get_is_judged_forwarded_and_answered(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(
        1, request_headers("/index.html", extra=[(b"accept", b"*/*")]), end_stream=True
    )
    t.pump()

    (access,) = t.of(Access)
    assert access.request == HttpRequest(
        "GET", "/index.html", "example.test", (("accept", "*/*"),), version="2"
    )
    assert access.decision.allowed and access.key == 1
    (received,) = t.of(ev.RequestReceived, "server")
    assert received.headers[3] == (b":path", b"/index.html")
    assert (b"accept", b"*/*") in received.headers

    respond(t, received.stream_id, b"x" * 70_000)
    (response,) = t.of(ev.ResponseReceived, "client")
    assert response.headers[0] == (b":status", b"200")
    assert t.body("client", 1) == b"x" * 70_000
    assert t.of(ev.StreamEnded, "client")[0].stream_id == 1
    assert t.of(Reply) == [Reply(1, {"status": 200})]


def test_denied_request_gets_403_and_never_reaches_server(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/admin/users", "POST"))
    t.client.send_data(1, b"secret body")
    t.pump()

    assert not t.of(ev.RequestReceived, "server")
    assert t.to_server_bytes < 200  # preface + SETTINGS + WINDOW_UPDATE only
    (response,) = t.of(ev.ResponseReceived, "client")
    assert dict(response.headers)[b":status"] == b"403"
    assert t.body("client", 1) == b"Access denied"
    assert t.of(ev.StreamReset, "client")[0].error_code == ErrorCodes.NO_ERROR
    assert t.of(Access)[0].decision.allowed is False
    assert t.of(Reply) == [Reply(1, {"status": 403})]

    # The connection is fine: the next request goes through.
    t.client.send_headers(3, request_headers("/ok"), end_stream=True)
    t.pump()
    assert [e.headers[3][1] for e in t.of(ev.RequestReceived, "server")] == [b"/ok"]


def test_denied_grpc_call_is_trailers_only_and_other_streams_go_on(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, grpc_headers("/grpc.testing.TestService/EmptyCall"))
    t.client.send_headers(
        3, grpc_headers("/grpc.testing.TestService/UnaryCall", [(b"x-token", b"t0p")])
    )
    t.client.send_data(3, grpc_message(b"denied payload"), end_stream=True)
    t.client.send_data(1, grpc_message(b""), end_stream=True)
    t.pump()

    calls = [a.request for a in t.of(Access)]
    assert [(c.service, c.method) for c in calls] == [
        ("grpc.testing.TestService", "EmptyCall"),
        ("grpc.testing.TestService", "UnaryCall"),
    ]
    assert calls[1].http.path == "/grpc.testing.TestService/UnaryCall"
    (only,) = t.of(ev.RequestReceived, "server")
    assert dict(only.headers)[b":path"] == b"/grpc.testing.TestService/EmptyCall"
    assert b"denied payload" not in t.body("server", only.stream_id)

    headers = assert_grpc_trailers_only(t, 3, grpc_status=7)  # PERMISSION_DENIED
    assert b"default/grpc-demo" in headers[b"grpc-message"]
    assert b"ingress[0].rules.grpc[0]" in headers[b"grpc-message"]
    assert Reply(
        3, {"status": 200, "grpc_status": 7, "request_messages": 0, "response_messages": 0}
    ) in t.of(Reply)

    sid = only.stream_id
    t.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    t.server.send_data(sid, grpc_message(b""))
    t.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    t.pump()
    trailers = [e for e in t.of(ev.TrailersReceived, "client") if e.stream_id == 1]
    assert trailers[0].headers == [(b"grpc-status", b"0")]
    assert Reply(
        1, {"status": 200, "grpc_status": 0, "request_messages": 1, "response_messages": 1}
    ) in t.of(Reply)


def test_grpc_messages_counted_across_frame_splits_and_trailers_relayed(split):
    t = Transcript(H2Engine(decide), split).start()
    path = "/grpc.testing.TestService/FullDuplexCall"
    t.client.send_headers(1, grpc_headers(path, [(b"x-meta-bin", b"AAEC")]))
    stream = grpc_message(b"a" * 10) + grpc_message(b"b" * 30000) + grpc_message(b"")
    # Split so that one frame ends inside a 5-byte prefix.
    t.client.send_data(1, stream[:12])
    t.client.send_data(1, stream[12:17])
    t.send_body(t.client, 1, stream[17:])
    t.client.send_headers(1, [(b"x-client-trailer", b"1")], end_stream=True)
    t.pump()
    (req,) = t.of(ev.RequestReceived, "server")
    assert (b"x-meta-bin", b"AAEC") in req.headers
    assert t.body("server", req.stream_id) == stream
    assert t.of(ev.TrailersReceived, "server")[0].headers == [(b"x-client-trailer", b"1")]

    t.server.send_headers(
        req.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
    )
    t.server.send_data(req.stream_id, grpc_message(b"r1") + grpc_message(b"r2"))
    t.server.send_headers(
        req.stream_id, [(b"grpc-status", b"5"), (b"grpc-message", b"not found")], end_stream=True
    )
    t.pump()
    assert t.of(ev.TrailersReceived, "client")[0].headers == [
        (b"grpc-status", b"5"),
        (b"grpc-message", b"not found"),
    ]
    assert t.of(Reply) == [
        Reply(1, {"status": 200, "grpc_status": 5, "request_messages": 3, "response_messages": 2})
    ]


def test_resets_travel_both_ways(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/slow"))
    t.client.send_headers(3, request_headers("/also-slow"), end_stream=True)
    t.pump()
    first, second = t.of(ev.RequestReceived, "server")

    t.client.reset_stream(1, ErrorCodes.CANCEL)
    t.pump()
    (reset,) = t.of(ev.StreamReset, "server")
    assert (reset.stream_id, reset.error_code) == (first.stream_id, ErrorCodes.CANCEL)

    t.server.reset_stream(second.stream_id, ErrorCodes.REFUSED_STREAM)
    t.pump()
    (reset,) = t.of(ev.StreamReset, "client")
    assert (reset.stream_id, reset.error_code) == (3, ErrorCodes.REFUSED_STREAM)
    assert {r.key: r.fields["reset"] for r in t.of(Reply)} == {
        1: "client reset CANCEL",
        3: "server reset REFUSED_STREAM",
    }


def test_ping_is_answered(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.ping(b"12345678")
    t.pump()
    assert [e.ping_data for e in t.of(ev.PingAckReceived, "client")] == [b"12345678"]


def test_many_concurrent_streams_interleaved(split):
    t = Transcript(H2Engine(decide), split).start()
    ids = list(range(1, 80, 2))
    for cid in ids:
        t.client.send_headers(cid, request_headers(f"/item/{cid}", "POST"))
    for cid in reversed(ids):
        t.client.send_data(cid, f"body-{cid}".encode(), end_stream=True)
    t.pump()
    by_path = {dict(e.headers)[b":path"]: e.stream_id for e in t.of(ev.RequestReceived, "server")}
    assert len(by_path) == len(ids)
    for cid in ids:
        assert t.body("server", by_path[f"/item/{cid}".encode()]) == f"body-{cid}".encode()
    for cid in ids:
        respond(t, by_path[f"/item/{cid}".encode()], f"answer-{cid}".encode())
    for cid in ids:
        assert t.body("client", cid) == f"answer-{cid}".encode()
    assert sorted(r.key for r in t.of(Reply)) == ids


def test_server_max_concurrent_streams_is_honoured(split):
    t = Transcript(H2Engine(decide), split).start(
        server_settings={ev.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
    )
    for cid in range(1, 20, 2):
        t.client.send_headers(cid, request_headers(f"/q/{cid}"), end_stream=True)
    t.pump()
    served = []
    for _ in range(10):
        open_now = [
            e.stream_id for e in t.of(ev.RequestReceived, "server") if e.stream_id not in served
        ]
        assert 1 <= len(open_now) <= 2
        respond(t, open_now[0], b"ok")
        served.append(open_now[0])
    assert len({e.stream_id for e in t.of(ev.ResponseReceived, "client")}) == 10


def test_non_reading_server_stops_the_client_at_the_window(split):
    limits = H2Limits(stream_window=65535 * 2, connection_window=1 << 20)
    t = Transcript(H2Engine(decide, limits=limits), split).start()
    t.server_reads = False
    t.client.send_headers(1, request_headers("/upload", "POST"))
    payload = b"z" * 1_000_000
    sent = 0
    for _ in range(100):
        window = min(t.client.local_flow_control_window(1), t.client.max_outbound_frame_size)
        if window == 0:
            break
        t.client.send_data(1, payload[sent : sent + window])
        sent += window
        t.pump()
    # The client stopped after the proxy's window plus the server's window: no more.
    assert sent == limits.stream_window + 65535
    assert len(t.body("server", 1)) == 65535
    t.server_resumes_reading()
    for _ in range(200):
        window = min(
            t.client.local_flow_control_window(1),
            t.client.max_outbound_frame_size,
            len(payload) - sent,
        )
        if window == 0:
            break
        t.client.send_data(1, payload[sent : sent + window])
        sent += window
        t.pump()
    t.client.end_stream(1)
    t.pump()
    assert t.body("server", 1) == payload


def test_slow_client_slows_the_server(split):
    limits = H2Limits(stream_window=65535, connection_window=1 << 20)
    t = Transcript(H2Engine(decide, limits=limits), split).start()
    t.client_reads = False
    t.client.send_headers(1, request_headers("/download"), end_stream=True)
    t.pump()
    t.server.send_headers(1, [(b":status", b"200")])
    body = b"d" * 500_000
    sent = 0
    while t.server.local_flow_control_window(1) and sent < len(body):
        n = min(t.server.local_flow_control_window(1), t.server.max_outbound_frame_size)
        t.server.send_data(1, body[sent : sent + n])
        sent += n
        t.pump()
    assert sent == 65535 * 2  # client window + proxy window
    assert len(t.body("client", 1)) == 65535


def test_graceful_goaway_from_server_lets_streams_finish(split):
    t = Transcript(H2Engine(decide), split, graceful_client=True).start()
    t.client.send_headers(1, request_headers("/a"), end_stream=True)
    t.pump()
    # h2's own close_connection() would stop the test server from answering.
    t.server_raw(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    assert t.of(ev.ConnectionTerminated, "client")[0].error_code == ErrorCodes.NO_ERROR
    assert not t.of(Close)
    t.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    t.pump()
    assert t.of(ev.ResponseReceived, "client")[0].stream_id == 1
    assert any(isinstance(c, Close) for c in t.commands)


# ---------------------------------------------------------------- violations


def test_bad_preface_is_a_connection_error(split):
    engine = H2Engine(decide)
    commands = []
    for chunk in split(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\x00" * 20):
        commands += engine.client_data(chunk)
    (error,) = [c for c in commands if isinstance(c, ParseError)]
    assert error.side == "client" and error.close
    assert error.error.code == "h2_protocol_error"
    assert b"\x07" in error.error.wire_reply  # a GOAWAY frame (type 7)
    assert isinstance(commands[-1], Close)
    assert engine.client_data(b"more") == []


def test_data_on_stream_zero_is_a_connection_protocol_error(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client_raw(b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc")
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert isinstance(t.commands[-1], Close)


def test_oversized_frame_is_a_frame_size_error(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/up", "POST"))
    t.pump()
    size = 20000  # above our SETTINGS_MAX_FRAME_SIZE of 16384
    t.client_raw(size.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"q" * size)
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR


def header_block_frames(stream_id: int, block: bytes, piece: int = 16384) -> bytes:
    """HEADERS then CONTINUATION frames carrying ``block``, none with END_HEADERS."""
    frames = b""
    for n, at in enumerate(range(0, len(block), piece)):
        chunk = block[at : at + piece]
        kind = 0x1 if n == 0 else 0x9  # HEADERS, then CONTINUATION
        head = len(chunk).to_bytes(3, "big") + bytes([kind, 0]) + stream_id.to_bytes(4, "big")
        frames += head + chunk
    return frames


def test_a_header_block_parked_past_the_hard_cap_is_enhance_your_calm(split):
    """An unfinished HEADERS + CONTINUATION sequence may not park more than the hard
    header-list cap (256 KiB) in the proxy (issue 14, finding 6)."""
    t = Transcript(H2Engine(decide), split).start()
    t.client_raw(header_block_frames(1, b"\x00" * (256 * 1024 + 1)))
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert not t.of(ev.RequestReceived, "server")
    assert isinstance(t.commands[-1], Close)


def test_a_header_block_under_the_cap_may_wait_for_its_end(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client_raw(header_block_frames(1, b"\x00" * (200 * 1024)))
    assert not t.of(ev.ConnectionTerminated, "client")
    assert t.engine.reading_headers  # the driver's header deadline runs meanwhile


def test_malformed_request_is_a_stream_error_only(split):
    t = Transcript(H2Engine(decide), split, strict_client=False).start()
    t.client.send_headers(1, [*request_headers("/"), (b"Upper-Case", b"x")], end_stream=True)
    t.client.send_headers(3, [*request_headers("/"), (b"connection", b"close")], end_stream=True)
    t.client.send_headers(
        5, [(b":method", b"GET"), (b":path", b"/")], end_stream=True
    )  # no :scheme
    t.client.send_headers(7, request_headers("/fine"), end_stream=True)
    t.pump()
    resets = {e.stream_id: e.error_code for e in t.of(ev.StreamReset, "client")}
    assert resets == {
        1: ErrorCodes.PROTOCOL_ERROR,
        3: ErrorCodes.PROTOCOL_ERROR,
        5: ErrorCodes.PROTOCOL_ERROR,
    }
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [b"/fine"]
    errors = t.of(ParseError)
    assert len(errors) == 3 and not any(e.close for e in errors)
    assert not t.of(ev.ConnectionTerminated, "client")


def test_header_list_over_the_advertised_size_gets_431(split):
    t = Transcript(H2Engine(decide), split).start()
    big = [(f"x-h{i}".encode(), b"v" * 1000) for i in range(80)]  # ~83 KB > 64 KiB
    t.client.send_headers(1, request_headers("/", extra=big), end_stream=True)
    t.client.send_headers(3, request_headers("/after"), end_stream=True)
    t.pump()
    statuses = {
        e.stream_id: dict(e.headers)[b":status"] for e in t.of(ev.ResponseReceived, "client")
    }
    assert statuses == {1: b"431"}
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [b"/after"]


def test_header_list_over_the_hard_cap_is_a_connection_error(split):
    t = Transcript(H2Engine(decide), split).start()
    big = [(f"x-h{i}".encode(), b"v" * 4000) for i in range(80)]  # ~320 KB
    t.client.send_headers(1, request_headers("/", extra=big), end_stream=True)
    t.pump()
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert not t.of(ev.RequestReceived, "server")


def test_malformed_response_resets_the_client_stream(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    t.server.config.validate_outbound_headers = False
    t.server.config.normalize_outbound_headers = False
    t.server.send_headers(1, [(b":status", b"200"), (b"Bad Name", b"x")])
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (1, ErrorCodes.INTERNAL_ERROR)
    ]
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "server")] == [
        (1, ErrorCodes.PROTOCOL_ERROR)
    ]
    assert [e.side for e in t.of(ParseError)] == ["server"]


def test_server_protocol_violation_closes_with_goaway_to_both(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    t.server_raw(b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc")  # DATA on stream 0
    assert t.of(ev.ConnectionTerminated, "server")[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert t.of(ev.ConnectionTerminated, "client")[0].error_code == ErrorCodes.INTERNAL_ERROR
    assert t.of(ParseError)[0].side == "server"


def test_oversized_frame_is_refused_from_its_header_alone(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client_raw(
        (1 << 24 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    )  # 8 MiB announced, no body
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert isinstance(t.commands[-1], Close)


def test_body_longer_than_content_length_is_a_stream_error(split):
    t = Transcript(H2Engine(decide), split, strict_client=False).start()
    t.client.send_headers(1, request_headers("/upload", "POST", extra=[(b"content-length", b"3")]))
    t.client.send_data(1, b"abcdef", end_stream=True)
    t.client.send_headers(3, request_headers("/next"), end_stream=True)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (1, ErrorCodes.PROTOCOL_ERROR)
    ]
    assert not t.of(ev.ConnectionTerminated, "client")
    # Upstream the next request goes through. The bad one's HEADERS went on as
    # they arrived (frames are relayed one by one); it was cancelled before its
    # body completed.
    upstream = {dict(e.headers)[b":path"]: e.stream_id for e in t.of(ev.RequestReceived, "server")}
    assert b"/next" in upstream
    if b"/upload" in upstream:
        assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "server")] == [
            (upstream[b"/upload"], ErrorCodes.CANCEL)
        ]
        assert not t.body("server", upstream[b"/upload"]).endswith(b"def")
    errors = t.of(ParseError)
    assert [(e.side, e.close) for e in errors] == [("client", False)]


def test_data_after_end_stream_is_a_stream_closed_error(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    late = DataFrame(1, data=b"late", flags=["END_STREAM"])
    t.client_raw(late.serialize())
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (1, ErrorCodes.STREAM_CLOSED)
    ]
    assert not t.of(ev.ConnectionTerminated, "client")
    # The server's request is cancelled (STREAM_CLOSED concerns only the client hop).
    assert [e.error_code for e in t.of(ev.StreamReset, "server")] == [ErrorCodes.CANCEL]


def test_response_body_shorter_than_content_length_resets_the_client_stream(split):
    t = Transcript(H2Engine(decide), split).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    t.server.config.validate_outbound_headers = False
    t.server.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")])
    t.server.send_data(1, b"short", end_stream=True)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (1, ErrorCodes.INTERNAL_ERROR)
    ]
    assert not t.of(ev.ConnectionTerminated, "client")
    assert [e.side for e in t.of(ParseError)] == ["server"]


def test_streams_over_our_concurrency_limit_are_refused_one_by_one(split):
    limits = H2Limits(max_concurrent_streams=3)
    t = Transcript(H2Engine(decide, limits=limits), split).start()
    # The h2 client object respects the limit; lift it to play a client that does not.
    t.client.remote_settings = type(t.client.remote_settings)(
        client=False, initial_values={ev.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
    )
    for cid in (1, 3, 5, 7, 9):
        t.client.send_headers(cid, request_headers(f"/s{cid}"))
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (7, ErrorCodes.REFUSED_STREAM),
        (9, ErrorCodes.REFUSED_STREAM),
    ]
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [
        b"/s1",
        b"/s3",
        b"/s5",
    ]
    assert not t.of(ev.ConnectionTerminated, "client")
    # Once one ends, a new stream is accepted.
    t.client.end_stream(1)
    t.pump()
    t.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    t.pump()
    t.client.send_headers(11, request_headers("/s11"), end_stream=True)
    t.pump()
    assert dict(t.of(ev.RequestReceived, "server")[-1].headers)[b":path"] == b"/s11"


def test_reading_headers_covers_the_preface_and_unfinished_header_blocks():
    engine = H2Engine(decide)
    assert engine.reading_headers
    t = Transcript(engine).start()
    assert not engine.reading_headers
    block = t.client.encoder.encode(request_headers("/slow"))
    # HEADERS without END_HEADERS: the rest of the block is still to come.
    t.client_raw(len(block[:5]).to_bytes(3, "big") + b"\x01\x01\x00\x00\x00\x01" + block[:5])
    assert engine.reading_headers
    t.client_raw(len(block[5:]).to_bytes(3, "big") + b"\x09\x04\x00\x00\x00\x01" + block[5:])
    assert not engine.reading_headers
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [b"/slow"]


def test_decision_header_edits_are_applied_before_forwarding(split):
    edits = (
        ("add", "X-Probe", "true"),
        ("delete", "x-secret", ""),
        ("replace", "x-tenant", "blue"),
    )
    t = Transcript(H2Engine(lambda request: Decision(True, edits=edits)), split).start()
    extra = [(b"x-secret", b"s3"), (b"x-tenant", b"red"), (b"accept", b"*/*")]
    t.client.send_headers(1, request_headers("/edited", extra=extra), end_stream=True)
    t.pump()
    (received,) = t.of(ev.RequestReceived, "server")
    regular = [(n, v) for n, v in received.headers if not n.startswith(b":")]
    assert regular == [(b"accept", b"*/*"), (b"x-probe", b"true"), (b"x-tenant", b"blue")]
    # The judged request is the one the client sent.
    assert t.of(Access)[0].request.header_values("x-secret") == ["s3"]


def test_server_eof_after_a_complete_response_still_delivers_it(split):
    t = Transcript(H2Engine(decide), split, graceful_client=True).start()
    t.client_reads = False
    t.client.send_headers(1, request_headers("/big"), end_stream=True)
    t.client.send_headers(3, request_headers("/unanswered"), end_stream=True)
    t.pump()
    body = bytes(range(256)) * 600  # 150 KB: more than the client's 64 KiB window
    t.server.send_headers(1, [(b":status", b"200")])
    t.send_body(t.server, 1, body, end_stream=True)
    assert len(t.body("client", 1)) == 65535  # the rest waits in the proxy
    t._run(t.engine.server_data(b""))  # the server closes its socket
    assert not t.of(Close)
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (3, ErrorCodes.INTERNAL_ERROR)
    ]
    # The client reads on: the whole body arrives, then the connection closes.
    for event in t.of(ev.DataReceived, "client"):
        t.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    t.client_reads = True
    t.pump()
    assert t.body("client", 1) == body
    assert t.of(ev.StreamEnded, "client")[-1].stream_id == 1
    assert isinstance(t.commands[-1], Close)
    # New streams after the server left are refused, not hung.
    assert t.of(ev.ConnectionTerminated, "client")[0].error_code == ErrorCodes.NO_ERROR


@pytest.mark.parametrize("path", ["/admin/x", "/allowed"])
def test_headers_and_reset_in_one_read(path):
    """The client gives up on a stream in the same read that opened it."""
    t = Transcript(H2Engine(decide)).start()
    t.client.send_headers(1, request_headers(path, "POST"))
    t.client.reset_stream(1, ErrorCodes.CANCEL)
    t.client.send_headers(3, request_headers("/next"), end_stream=True)
    t.pump()
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")][-1] == b"/next"
    assert not t.of(ev.ConnectionTerminated, "client")
    assert not any(isinstance(e, ev.ResponseReceived) and e.stream_id == 1 for e in t.client_events)


def test_window_update_and_reset_in_one_read_while_data_waits(split):
    limits = H2Limits(stream_window=65535 * 2)
    t = Transcript(H2Engine(decide, limits=limits), split).start()
    t.server_reads = False
    t.client.send_headers(1, request_headers("/up", "POST"))
    for _ in range(10):
        step = min(t.client.local_flow_control_window(1), t.client.max_outbound_frame_size)
        if not step:
            break
        t.client.send_data(1, b"u" * step)
        t.pump()
    # The server opens its window and resets the stream in the same write.
    t.server.acknowledge_received_data(65535, 1)
    t.server.reset_stream(1, ErrorCodes.CANCEL)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.of(ev.StreamReset, "client")] == [
        (1, ErrorCodes.CANCEL)
    ]
    assert not t.of(ev.ConnectionTerminated, "client")
    # The discarded bytes went back to the client's connection window: a new
    # upload larger than what is left of it still goes through.
    t.server_reads = True
    t.client.send_headers(3, request_headers("/after", "POST"))
    t.send_body(t.client, 3, b"a" * 200_000, end_stream=True)
    assert t.body("server", 3) == b"a" * 200_000


def test_graceful_goaway_from_client_finishes_streams_then_closes(split):
    t = Transcript(H2Engine(decide), split, graceful_client=True, graceful_server=True).start()
    t.client.send_headers(1, request_headers("/in-flight"), end_stream=True)
    t.pump()
    t.client_raw(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    # The server hears a graceful GOAWAY too (no pushes accepted: last_stream_id 0).
    assert [(e.error_code, e.last_stream_id) for e in t.of(ev.ConnectionTerminated, "server")] == [
        (ErrorCodes.NO_ERROR, 0)
    ]
    assert not t.of(Close)
    respond(t, 1, b"still delivered")
    assert t.body("client", 1) == b"still delivered"
    assert isinstance(t.commands[-1], Close)
