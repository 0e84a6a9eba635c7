"""Http1Engine transcripts: bytes in, commands out, for both parser implementations.

Every transcript is also replayed byte by byte and split at random points,
and must give the same commands as the whole input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from parsers.base import (
    ALLOW_ALL,
    Access,
    Close,
    Decision,
    ParseError,
    Reply,
    ShutdownServer,
    ToClient,
    ToServer,
    Yield,
    allow_all,
)
from parsers.http1.engine import Http1Engine, Http1Limits, active_implementation
from parsers.http1.errors import AmbiguousFraming, HeadersTooLarge, InvalidChunk, MalformedMessage
from parsers.requests import HttpRequest
from tests.parsers.http1.helpers import IMPLS, deny_path, normalise, sent
from tests.support.feeding import feed, splits

DENIED_403 = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nAccess denied"
)
DENIED_403_CLOSE = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
    b"Connection: close\r\n\r\nAccess denied"
)
BAD_400 = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b"Connection: close\r\n\r\nBad Request"
)
TOO_LARGE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: "
    b"31\r\n"
    b"Connection: close\r\n\r\nRequest Header Fields Too Large"
)
BAD_GATEWAY_502 = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b"Connection: close\r\n\r\nBad Gateway"
)

DENY = Decision(False, policy="test", rule="deny", reason="path /admin*")
ALLOW = Decision(True, policy="test", rule="allow")


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def engine_for(impl, decide=allow_all, **kw):
    return Http1Engine(decide, parser=impl, **kw)


def three_ways(
    impl, data: bytes, decide=allow_all, side="client", prime: bytes = b"", compare=None, **kw
):
    """Feed ``data`` whole, byte by byte and split at random; all must agree.
    ``prime`` is client bytes fed first (whole) when testing the server side.
    ``compare`` maps a transcript to what must agree (re-chunked bodies get
    chunk sizes from the input split, so those compare de-chunked)."""
    results = {}
    for name, pieces in splits(data, randoms=3):
        engine = engine_for(impl, decide, **kw)
        if prime:
            engine.client_data(prime)
        receive = engine.client_data if side == "client" else engine.server_data
        results[name] = normalise(feed(receive, pieces))
    whole = results["whole"]
    compare = compare or (lambda transcript: transcript)
    for name, got in results.items():
        assert comparable(compare(got)) == comparable(compare(whole)), f"{name} split differs"
    return whole


def comparable(value):
    """Exceptions compare by identity; compare a ParseError by what it says."""
    if isinstance(value, list | tuple):
        return [comparable(v) for v in value]
    if type(value) is ParseError:
        return ("ParseError", value.side, type(value.error).__name__, value.close)
    return value


def dechunked(transcript):
    """Command kinds, and the forwarded request stream with its chunked body decoded."""
    stream = sent(transcript, ToServer)
    head, _, body = stream.partition(b"\r\n\r\n")
    return (
        [type(c) for c in transcript if type(c) is not ToServer],
        head,
        _dechunk(body) if body else b"",
    )


# --------------------------------------------------------------------------
# The basic transcript


def test_get_is_judged_and_forwarded(impl):
    engine = engine_for(impl)
    assert engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == [
        Access(HttpRequest("GET", "/", "a", (("host", "a"),), "1.1"), ALLOW_ALL, 0),
        ToServer(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ]
    assert engine.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi") == [
        ToClient(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
        Reply(0, {"status": 200}),
    ]


def test_request_fields_are_lower_cased_in_wire_order(impl):
    wire = b"GET /p?q=1 HTTP/1.1\r\nHost: api.example\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3\r\n\r\n"
    (access, _) = three_ways(impl, wire)
    assert access.request == HttpRequest(
        "GET",
        "/p?q=1",
        "api.example",
        (("host", "api.example"), ("x-b", "2"), ("x-a", "1"), ("x-b", "3")),
        "1.1",
    )


def test_absolute_form_takes_host_from_target(impl):
    (access, fwd) = three_ways(
        impl, b"GET http://api.example:8080/v1?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"
    )
    assert (access.request.host, access.request.path) == ("api.example:8080", "/v1?x=1")
    assert fwd == ToServer(b"GET http://api.example:8080/v1?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")


def test_a_url_inside_an_origin_form_query_is_not_read_as_the_target(impl):
    """Policy judges the path the server gets: ``://`` in a query is not absolute-form."""
    wire = b"GET /admin/secret?x=://deathstar/public/a HTTP/1.1\r\nHost: deathstar\r\n\r\n"
    (access, fwd) = three_ways(impl, wire)
    assert (access.request.host, access.request.path) == (
        "deathstar",
        "/admin/secret?x=://deathstar/public/a",
    )
    assert fwd == ToServer(wire)


# --------------------------------------------------------------------------
# Canonical framing


def test_content_length_is_canonical(impl):
    wire = b"POST /u HTTP/1.1\r\nHost: a\r\ncontent-length:  005 \r\n\r\nhello"
    assert three_ways(impl, wire)[1:] == [
        ToServer(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    ]


def test_chunked_body_is_rechunked_without_extensions(impl):
    wire = (
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n"
    )
    out = three_ways(impl, wire, compare=dechunked)
    forwarded = sent(out, ToServer)
    assert forwarded.startswith(
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = forwarded.split(b"\r\n\r\n", 1)[1]
    # Split points change chunk sizes, never the de-chunked bytes or the end.
    assert body.endswith(b"0\r\nX-Sum: 1\r\n\r\n")
    assert _dechunk(body) == b"hello0123456789"
    assert b";name" not in forwarded


def _dechunk(body: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        if size == 0:
            return out
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def test_transfer_encoding_is_case_folded(impl):
    wire = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding:  Chunked \r\n\r\n0\r\n\r\n"
    out = three_ways(impl, wire)
    assert (
        sent(out, ToServer)
        == b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )


def test_body_streams_as_it_arrives(impl):
    engine = engine_for(impl)
    engine.client_data(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    assert engine.client_data(b"01234") == [ToServer(b"01234")]
    assert engine.client_data(b"56789GET /n HTTP/1.1\r\nHost: a\r\n\r\n")[0] == ToServer(b"56789")


def test_header_edits_apply_before_forwarding(impl):
    edits = (
        ("add", "X-Policy", "1"),
        ("delete", "Cookie", ""),
        ("replace", "User-Agent", "proxy"),
        ("add", "Content-Length", "9"),
    )
    decide = lambda request: Decision(True, edits=edits)  # noqa: E731
    wire = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nUser-Agent: curl\r\n\r\n"
    out = three_ways(impl, wire, decide)
    assert out[1] == ToServer(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Policy: 1\r\nUser-Agent: proxy\r\n\r\n"
    )


# --------------------------------------------------------------------------
# Denials


def test_denied_request_gets_403_and_nothing_is_forwarded(impl):
    wire = (
        b"POST /admin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    out = three_ways(impl, wire, deny_path("/admin"))
    assert [type(c) for c in out] == [Access, ToClient, Reply, Access, ToServer]
    assert out[0].decision == DENY and out[0].key == 0
    assert out[1] == ToClient(DENIED_403)
    assert out[2] == Reply(0, {"status": 403})
    assert out[4] == ToServer(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")


def test_denied_reply_waits_behind_earlier_response(impl):
    engine = engine_for(impl, deny_path("/admin"))
    out = engine.client_data(
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\nGET /b "
        b"HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert [type(c) for c in out] == [Access, ToServer, Access, Access, ToServer]
    assert (
        sent(out, ToServer)
        == b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert sent(out, ToClient) == b""  # the 403 must not overtake /a's response
    out = engine.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    assert out == [
        ToClient(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA"),
        Reply(0, {"status": 200}),
        ToClient(DENIED_403),
        Reply(1, {"status": 403}),
    ]
    out = engine.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    assert out == [
        ToClient(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB"),
        Reply(2, {"status": 200}),
    ]


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_pipelined_requests_past_max_pending_wait_unread_until_half_are_answered(impl):
    engine = engine_for(impl, deny_path("/admin"), max_pending=4)
    paths = ["/0", "/1", "/admin", "/3", "/4", "/5", "/6"]

    out = engine.client_data(b"".join(get(p) for p in paths))
    assert [c.request.path for c in out if type(c) is Access] == ["/0", "/1", "/admin", "/3"]
    assert sent(out, ToServer) == get("/0") + get("/1") + get("/3")
    assert not engine.reading_headers  # held whole: not a slow head
    assert engine.client_data(b"") == []  # the EOF waits behind the held requests

    out = engine.server_data(ok(b"0"))  # /1, /admin and /3 unanswered: more than half
    assert sent(out, ToClient) == ok(b"0")
    assert [c for c in out if type(c) is Access] == []

    out = engine.server_data(ok(b"1"))  # then the 403 of /admin: only /3 unanswered
    assert sent(out, ToClient) == ok(b"1") + DENIED_403
    assert [c.request.path for c in out if type(c) is Access] == ["/4", "/5", "/6"]
    assert sent(out, ToServer) == get("/4") + get("/5") + get("/6")
    assert out[-1] == ShutdownServer()  # and then the client's EOF, in order


def test_a_read_of_many_responses_is_answered_a_bounded_number_per_turn(impl):
    engine = engine_for(impl, max_pending=100, limits=Http1Limits(responses_per_turn=32))
    engine.client_data(b"".join(get(f"/{n}") for n in range(80)))

    out = engine.server_data(b"".join(ok(b"%d" % n) for n in range(80)))  # one read
    assert sent(out, ToClient) == b"".join(ok(b"%d" % n) for n in range(32))
    assert [c.fields["status"] for c in out if type(c) is Reply] == [200] * 32
    [turn] = [c for c in out if type(c) is Yield]
    assert turn.server  # the server is not read until the rest is answered

    assert engine.server_data(b"") == []  # the server's EOF waits behind them, in order
    out = turn.resume()
    assert sent(out, ToClient) == b"".join(ok(b"%d" % n) for n in range(32, 64))
    [turn] = [c for c in out if type(c) is Yield]

    out = turn.resume()
    assert sent(out, ToClient) == b"".join(ok(b"%d" % n) for n in range(64, 80))
    assert [c for c in out if type(c) is Yield] == []
    assert out[-1] == Close("server closed")  # then the EOF, answered as ever


def test_denied_with_connection_close_closes_after_403(impl):
    out = three_ways(
        impl, b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", deny_path("/admin")
    )
    assert out[1:] == [
        ToClient(DENIED_403_CLOSE),
        Reply(0, {"status": 403}),
        Close("denied request ends the connection"),
    ]


def test_denied_expect_continue_with_body_closes(impl):
    wire = b"PUT /admin HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    out = three_ways(impl, wire, deny_path("/admin"))
    assert out[1:] == [
        ToClient(DENIED_403_CLOSE),
        Reply(0, {"status": 403}),
        Close("denied request ends the connection"),
    ]


def test_denied_chunked_body_is_discarded_and_connection_kept(impl):
    wire = (
        b"POST /admin HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    out = three_ways(impl, wire, deny_path("/admin"), compare=dechunked)
    assert sent(out, ToServer) == b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    assert sent(out, ToClient) == DENIED_403


# --------------------------------------------------------------------------
# Strictness: 400 (or 431), never forwarded, then close.

STRICT_CASES = [
    (
        "cl_and_te",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "cl_differ",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "cl_same_twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        AmbiguousFraming,
    ),
    ("cl_list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", AmbiguousFraming),
    ("cl_sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", AmbiguousFraming),
    (
        "te_final_not_chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_unknown",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: pigeons, chunked\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_identity",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_gzip_chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_empty_element",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked\r\n\r\n0\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "te_http10",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        AmbiguousFraming,
    ),
    # Found by the fuzzer: str.strip() took NBSP (0xA0) for whitespace.
    (
        "te_nbsp",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xa0chunked\r\n\r\n0\r\n\r\n",
        AmbiguousFraming,
    ),
    (
        "connection_not_token",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: \xa0close\r\n\r\n",
        MalformedMessage,
    ),
    (
        "te_obfuscated",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
        AmbiguousFraming,
    ),
    ("obs_fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", MalformedMessage),
    (
        "space_before_colon",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        MalformedMessage,
    ),
    ("tab_before_colon", b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", MalformedMessage),
    ("bare_cr", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", MalformedMessage),
    ("bare_lf", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", MalformedMessage),
    ("nul_value", b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", MalformedMessage),
    ("ctl_value", b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", MalformedMessage),
    ("del_value", b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n", MalformedMessage),
    ("bad_method_token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("unknown_method", b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("lower_case_method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("bad_field_name", b"GET / HTTP/1.1\r\nHo(st: a\r\n\r\n", MalformedMessage),
    ("empty_field_name", b"GET / HTTP/1.1\r\n: a\r\n\r\n", MalformedMessage),
    ("double_space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("trailing_space", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", MalformedMessage),
    ("http09", b"GET /\r\n\r\n", MalformedMessage),
    ("http20", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", MalformedMessage),
    ("rtsp", b"OPTIONS / RTSP/1.0\r\nHost: a\r\n\r\n", MalformedMessage),
    ("space_in_target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("userinfo", b"GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("bad_scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("star_not_options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("relative_target", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
    ("missing_host", b"GET / HTTP/1.1\r\n\r\n", MalformedMessage),
    ("invalid_host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", MalformedMessage),
    ("host_with_path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", MalformedMessage),
    ("duplicate_host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", AmbiguousFraming),
    ("high_byte_target", b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", MalformedMessage),
]


@pytest.mark.parametrize("name,wire,error", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_strict_rejections(impl, name, wire, error):
    out = three_ways(impl, wire)
    assert [type(c) for c in out] == [ToClient, ParseError]
    assert out[0] == ToClient(BAD_400)
    assert isinstance(out[1].error, error) and out[1].side == "client" and out[1].close


CHUNK_CASES = [
    ("size_not_hex", b"zz\r\n"),
    ("size_space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("size_overflow", b"1" + b"0" * 16 + b"\r\n"),
    ("size_negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size_0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("ext_empty", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("ext_space", b"5; a=b\r\nhello\r\n0\r\n\r\n"),
    ("ext_open_quote", b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    ("data_too_long", b"3\r\nhello\r\n0\r\n\r\n"),
    ("bare_lf_after_size", b"5\nhello\r\n0\r\n\r\n"),
    ("trailer_fold", b"0\r\nX: a\r\n b\r\n\r\n"),
    ("trailer_content_length", b"0\r\nContent-Length: 5\r\n\r\n"),
    ("trailer_bad_name", b"0\r\nX Y: a\r\n\r\n"),
]


@pytest.mark.parametrize("name,body", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_bad_chunked_bodies_close_without_forwarding_the_bad_bytes(impl, name, body):
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    out = three_ways(
        impl,
        head + body,
        compare=lambda t: ([type(c) for c in t if type(c) is not ToServer], sent(t, ToClient)),
    )
    # The head had already gone (bodies stream); the bad chunk never does.
    assert sent(out, ToServer).startswith(head)
    assert body not in sent(out, ToServer)
    assert sent(out, ToClient) == BAD_400
    errors = [c for c in out if type(c) is ParseError]
    assert len(errors) == 1 and isinstance(errors[0].error, InvalidChunk | AmbiguousFraming)


def test_oversized_header_section_is_431(impl):
    wire = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 200 + b"\r\n\r\n"
    out = three_ways(impl, wire, limits=Http1Limits(max_head=128))
    assert out[0] == ToClient(TOO_LARGE_431)
    assert isinstance(out[1].error, HeadersTooLarge) and out[1].error.status == 431


def test_unterminated_huge_head_is_431_before_it_ends(impl):
    engine = engine_for(impl, limits=Http1Limits(max_head=1024))
    out = engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 300)
    assert out[0] == ToClient(TOO_LARGE_431)


def test_garbage_after_a_good_request_answers_in_order(impl):
    engine = engine_for(impl)
    out = engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\x00\r\n\r\n")
    assert [type(c) for c in out] == [Access, ToServer]
    out = engine.server_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert out == [
        ToClient(b"HTTP/1.1 204 No Content\r\n\r\n"),
        Reply(0, {"status": 204}),
        ToClient(BAD_400),
        ParseError("client", out[3].error, close=True),
    ]


# --------------------------------------------------------------------------
# Responses


def test_pipelined_responses_keep_in_step(impl):
    requests = (
        b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /e HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /n HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    responses = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # HEAD: no body despite the length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 304 Not "
        b"Modified\r\nContent-Length: 7\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\nuntil close"
    )
    out = three_ways(
        impl,
        responses,
        side="server",
        prime=requests,
        compare=lambda t: [c for c in t if type(c) is Reply],
    )
    replies = [c for c in out if type(c) is Reply]
    assert replies == [
        Reply(0, {"status": 200}),
        Reply(1, {"status": 200}),
        Reply(2, {"status": 304}),
    ]
    assert sent(out, ToClient) == responses


def test_close_delimited_response_completes_at_eof(impl):
    engine = engine_for(impl)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert engine.server_data(b"HTTP/1.0 200 OK\r\n\r\nbody") == [
        ToClient(b"HTTP/1.0 200 OK\r\n\r\nbody")
    ]
    assert engine.server_data(b"") == [
        Reply(0, {"status": 200}),
        Close("server ended the connection"),
    ]


def test_expect_continue_allowed(impl):
    engine = engine_for(impl)
    out = engine.client_data(
        b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert out[1] == ToServer(
        b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    )
    assert engine.server_data(b"HTTP/1.1 100 Continue\r\n\r\n") == [
        ToClient(b"HTTP/1.1 100 Continue\r\n\r\n")
    ]
    assert engine.client_data(b"abc") == [ToServer(b"abc")]
    assert engine.server_data(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n") == [
        ToClient(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
        Reply(0, {"status": 201}),
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
    ],
)
def test_server_garbage_is_502_and_close(impl, garbage):
    out = three_ways(impl, garbage, side="server", prime=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [type(c) for c in out] == [ParseError, ToClient, Reply, Close]
    assert out[0].side == "server"
    assert out[1] == ToClient(BAD_GATEWAY_502)
    assert out[2] == Reply(0, {"status": 502})


def test_server_garbage_mid_body_only_closes(impl):
    engine = engine_for(impl)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = engine.server_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nZZ\r\n"
    )
    assert out[0] == ToClient(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    assert [type(c) for c in out[1:]] == [ParseError, Close]


def test_server_eof_before_answer_is_502(impl):
    engine = engine_for(impl)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = engine.server_data(b"")
    assert [type(c) for c in out] == [ParseError, ToClient, Reply, Close]


def test_client_eof_mid_body_closes(impl):
    engine = engine_for(impl)
    engine.client_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert engine.client_data(b"") == [Close("client closed mid-request")]


def test_client_eof_after_request_half_closes(impl):
    engine = engine_for(impl)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert engine.client_data(b"") == [ShutdownServer()]


# --------------------------------------------------------------------------
# Upgrade


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_websocket_upgrade_becomes_a_tunnel(impl):
    engine = engine_for(impl)
    out = engine.client_data(UPGRADE + b"\x81\x02hi")
    assert out[1] == ToServer(UPGRADE)  # the frame waits for the server's answer
    out = engine.server_data(SWITCH + b"\x81\x02yo")
    assert out == [
        ToClient(SWITCH),
        Reply(0, {"status": 101}),
        ToServer(b"\x81\x02hi"),
        ToClient(b"\x81\x02yo"),
    ]
    assert engine.client_data(b"\x88\x00") == [ToServer(b"\x88\x00")]
    assert engine.server_data(b"GET / HTTP/1.1\r\n\r\n") == [ToClient(b"GET / HTTP/1.1\r\n\r\n")]
    assert engine.reading_headers is False


def test_upgrade_handler_gets_the_leftovers(impl):
    seen = []

    class Inner:
        protocol = "ws"
        reading_headers = False

        def client_data(self, data):
            seen.append(("client", data))
            return [ToServer(data.upper())]

        def server_data(self, data):
            seen.append(("server", data))
            return [ToClient(data.upper())]

    requests = []
    engine = engine_for(impl, upgrade_handler=lambda req: requests.append(req) or Inner())
    engine.client_data(UPGRADE + b"early")
    out = engine.server_data(SWITCH + b"late")
    assert requests[0].path == "/ws"
    assert out[-2:] == [ToServer(b"EARLY"), ToClient(b"LATE")]
    assert engine.client_data(b"more") == [ToServer(b"MORE")]
    assert seen == [("client", b"early"), ("server", b"late"), ("client", b"more")]


def test_refused_upgrade_stays_http(impl):
    engine = engine_for(impl)
    out = engine.client_data(UPGRADE + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [type(c) for c in out] == [Access, ToServer]  # /next waits: it might be tunnel data
    out = engine.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [type(c) for c in out] == [ToClient, Reply, Access, ToServer]
    assert out[3] == ToServer(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")


def test_denied_upgrade_stays_http(impl):
    wire = UPGRADE.replace(b"/ws", b"/admin/ws") + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    out = three_ways(impl, wire, deny_path("/admin"))
    assert [type(c) for c in out] == [Access, ToClient, Reply, Access, ToServer]
    assert out[1] == ToClient(DENIED_403)
    assert out[4] == ToServer(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")


def test_early_response_while_the_body_streams(impl):
    engine = engine_for(impl)
    engine.client_data(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    out = engine.server_data(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert out == [
        ToClient(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"),
        Reply(0, {"status": 413}),
    ]
    assert engine.client_data(b"defGET / HTTP/1.1\r\nHost: a\r\n\r\n")[0] == ToServer(b"def")


def test_unrequested_101_is_garbage(impl):
    engine = engine_for(impl)
    engine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = engine.server_data(SWITCH)
    assert [type(c) for c in out] == [ParseError, ToClient, Reply, Close]


# --------------------------------------------------------------------------
# Header timeout support, implementation switch


def test_http10_request_without_host_is_fine(impl):
    out = three_ways(impl, b"GET / HTTP/1.0\r\n\r\n")
    assert out[1] == ToServer(b"GET / HTTP/1.0\r\n\r\n")


def test_reading_headers_tracks_partial_heads(impl):
    engine = engine_for(impl)
    assert engine.reading_headers is False
    engine.client_data(b"GET / HTTP/1.1\r\nHo")
    assert engine.reading_headers is True
    engine.client_data(b"st: a\r\n\r\n")
    assert engine.reading_headers is False


def test_active_implementation_is_stated_and_switchable():
    assert active_implementation() in IMPLS
    for forced in IMPLS:
        env = dict(os.environ, L7PROXY_HTTP1_PARSER=forced)
        code = (
            "import parsers.http1.engine as h; "
            "print(h.ACTIVE_IMPLEMENTATION, h.Http1Engine(None).implementation)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == [forced, forced]


def test_unknown_parser_name_is_refused():
    with pytest.raises(ValueError):
        Http1Engine(allow_all, parser="rust")
