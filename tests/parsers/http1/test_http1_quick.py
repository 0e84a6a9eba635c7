"""The quick read of plain request heads (parsers/http1/quick.py).

Whatever the quick scan accepts, both full parsers accept with the same parsed head;
whatever it passes on, the full parser judges. A head it marks canonical (``wire``)
is byte for byte what the engine would have written for it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import Access, ToServer, allow_all
from parsers.http1.engine import Http1Engine, serialise_request
from parsers.http1.errors import Http1Error
from parsers.http1.fast import CRequestHead
from parsers.http1.head import PyRequestHead
from parsers.http1.quick import MAX_QUICK_FIELDS, QuickRequestHead, quick_request_head
from tests.parsers.http1.helpers import edited

REALISTIC = (
    b"GET /public/item/17?q=9157 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Request-Id: 4f27-17\r\n\r\n"
)


def full_parsers():
    return [CRequestHead(), PyRequestHead()]


def test_a_plain_head_is_read_as_both_parsers_read_it_and_forwarded_as_it_came():
    head = quick_request_head(REALISTIC)
    assert head is not None
    assert (head.method, head.target, head.version) == ("GET", "/public/item/17?q=9157", "1.1")
    assert head.headers == [(b"Host", b"127.0.0.1:8080"), (b"X-Request-Id", b"4f27-17")]
    assert (head.framing, head.keep_alive, head.upgrade) == ("none", True, False)
    for parser in full_parsers():
        assert parser.complete(REALISTIC) == head
    assert head.wire is REALISTIC
    assert serialise_request(head) == REALISTIC


def test_a_body_announced_last_as_the_engine_writes_it_is_canonical():
    raw = b"POST /orders HTTP/1.1\r\nHost: api\r\nContent-Length: 12\r\n\r\n"
    head = quick_request_head(raw)
    assert head is not None and (head.framing, head.length) == ("length", 12)
    assert head.wire == raw == serialise_request(head)


@pytest.mark.parametrize(
    "raw",
    [
        # read, but written otherwise by the engine: forwarded re-serialised
        b"POST /o HTTP/1.1\r\nContent-Length: 3\r\nHost: a\r\n\r\n",  # Content-Length not last
        b"POST /o HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\n",  # spelled otherwise
        b"POST /o HTTP/1.1\r\nHost: a\r\nContent-Length: 03\r\n\r\n",  # leading zero
        b"GET /o HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",  # dropped when forwarded
    ],
)
def test_heads_the_engine_writes_otherwise_are_read_but_not_forwarded_as_they_came(raw):
    head = quick_request_head(raw)
    assert head is not None and head.wire is None
    for parser in full_parsers():
        assert parser.complete(raw) == head
    assert serialise_request(head) != raw


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",  # no space after the colon
        b"GET / HTTP/1.1\r\nHost:  a\r\n\r\n",  # two
        b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",  # trailing space
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\tc\r\n\r\n",  # HTAB in a value
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \xe9\r\n\r\n",  # obs-text
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n",  # empty value
        b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",  # obs-fold
        b"GET /a://b HTTP/1.1\r\nHost: a\r\n\r\n",  # "://" in the target
        b"GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n",  # not an escape
        b"GET /a%4 HTTP/1.1\r\nHost: a\r\n\r\n",  # half an escape
        b"GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",  # fragment
        b"GET /a|b HTTP/1.1\r\nHost: a\r\n\r\n",  # origin-form, but not a simple target
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute-form
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n",  # a method it leaves to the parser
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",  # bare LF
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_QUICK_FIELDS + 1) + b"\r\n",
    ],
)
def test_anything_unusual_is_left_to_the_full_parser(raw):
    assert quick_request_head(raw) is None


def test_the_full_parser_still_refuses_what_the_scan_passes_on():
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    for parser in full_parsers():
        with pytest.raises(Http1Error) as quick_error:
            QuickRequestHead(parser).complete(bad)
        with pytest.raises(Http1Error) as own_error:
            type(parser)().complete(bad)
        assert type(quick_error.value) is type(own_error.value)
        assert quick_error.value.code == own_error.value.code


def test_a_head_that_arrived_in_pieces_leaves_no_state_behind():
    for parser in full_parsers():
        quick = QuickRequestHead(parser)
        quick.partial(REALISTIC[:20])  # the full parser checks the unfinished head
        assert quick.complete(REALISTIC).wire is REALISTIC
        # The next head starts afresh: a bad one is refused from its own first byte.
        with pytest.raises(Http1Error):
            quick.partial(b"\x01")


def test_the_engine_forwards_a_canonical_head_as_it_came_and_judges_it_once():
    seen = []

    def decide(request):
        seen.append(request)
        return allow_all(request)

    engine = Http1Engine(decide)
    out = engine.client_data(REALISTIC)
    assert [type(c) for c in out] == [Access, ToServer]
    assert out[1].data == REALISTIC
    (request,) = seen
    assert (request.method, request.path, request.host) == (
        "GET",
        "/public/item/17?q=9157",
        "127.0.0.1:8080",
    )
    assert request.headers == (("host", "127.0.0.1:8080"), ("x-request-id", "4f27-17"))


# ---------------------------------------------------------------- properties

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TARGET = "abcdefghijklmnopqrstuvwxyzABCZ0123456789-._~!$&'()*+,;=:@/?%|#\"[]{}"
# Bytes a mutation inserts or writes over: delimiters and whatever the scan must refuse.
NASTY = b" \t\r\n:%/?#@\x00\x7f\x80\xff\x0bAz0-,;="

plain_heads = st.builds(
    lambda method, target, minor, fields, special: (
        b"%s /%s HTTP/1.%d\r\n" % (method, target.encode(), minor)
        + b"".join(n.encode() + b": " + v for n, v in fields)
        + special
        + b"\r\n"
    ),
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    st.text(TARGET, max_size=24),
    st.sampled_from([0, 1]),
    st.lists(
        st.tuples(
            st.text(TOKEN, min_size=1, max_size=10),
            st.one_of(
                st.binary(max_size=16).map(lambda b: bytes(c for c in b if 0x20 <= c < 0x7F)),
                st.sampled_from([b"a b", b"a ", b" a", b"a\t", b"a\tb", b"", b"\xe9", b"x: y"]),
            ).map(lambda v: v + b"\r\n"),
        ),
        max_size=4,
    ),
    st.sampled_from(
        [
            b"Host: example.test\r\n",
            b"Host: h:8080\r\nConnection: keep-alive\r\n",
            b"Host: h\r\nConnection: close\r\n",
            b"Host: h\r\nContent-Length: 5\r\n",
            b"Host: h\r\nContent-Length: 0\r\n",
            b"Host: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n",
            b"Host: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n",
            b"Host: h\r\nTransfer-Encoding: chunked\r\n",
            b"",
        ]
    ),
)


def _check(raw: bytes) -> None:
    head = quick_request_head(raw)
    if head is None:
        return
    for parser in full_parsers():
        assert parser.complete(raw) == head, raw  # never raises: the scan is stricter
    if head.wire is not None:
        assert head.wire == serialise_request(head)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_heads)
def test_what_the_scan_reads_both_parsers_read_the_same(raw):
    _check(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plain_heads,
    st.lists(
        st.tuples(st.integers(0, 200), st.sampled_from(["insert", "replace", "delete"])),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(NASTY),
)
def test_mutated_heads_the_scan_reads_both_parsers_read_the_same(raw, edits, byte):
    # The empty line stays: the reader hands whole heads.
    whole = edited(raw[:-4], edits, byte) + b"\r\n\r\n"
    if whole.find(b"\r\n\r\n") != len(whole) - 4:
        return  # not one head any more
    _check(whole)
