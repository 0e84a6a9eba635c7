"""MessageReader edge cases, both implementations, every split: limits hold
at the same byte whole or split, errors carry what was read before them,
and the inputs the fuzzer once broke stay fixed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.http1.engine import Http1Limits, request_reader, response_reader
from parsers.http1.errors import (
    AmbiguousFraming,
    HeadersTooLarge,
    Http1Error,
    IncompleteMessage,
    InvalidChunk,
)
from parsers.http1.reader import Data, End, Head
from tests.fuzz.targets import readers as fuzz_readers
from tests.parsers.http1.helpers import IMPLS
from tests.support.feeding import splits

LIMITS = Http1Limits(max_head=256, max_chunk_line=64)
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def read(impl, pieces, kind="request", limits=LIMITS):
    reader = request_reader(impl, limits) if kind == "request" else response_reader(impl, limits)
    events = []
    try:
        for piece in pieces:
            events += reader.feed(piece)
    except Http1Error as exc:
        return _summary(events + exc.events), type(exc)
    return _summary(events), None


def _summary(events):
    out = []
    for e in events:
        if type(e) is Head:
            out.append(("head", e.head.method or e.head.status))
        elif type(e) is Data:
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + e.data)
            else:
                out.append(("data", e.data))
        elif type(e) is End:
            out.append(("end", e.trailers))
    return out


def all_splits_agree(data, kind="request", limits=LIMITS):
    results = {
        (impl, name): read(impl, pieces, kind, limits)
        for impl in IMPLS
        for name, pieces in splits(data, randoms=3)
    }
    first = next(iter(results.values()))
    assert all(r == first for r in results.values()), results
    return first


@pytest.mark.parametrize("size,error", [(64, None), (65, InvalidChunk)])
def test_chunk_line_limit_is_the_same_whole_or_split(size, error):
    line = b"1;" + b"x" * (size - 2)
    events, got = all_splits_agree(CHUNKED + line + b"\r\na\r\n0\r\n\r\n")
    assert got is error
    if error is None:
        assert events == [("head", "POST"), ("data", b"a"), ("end", ())]


@pytest.mark.parametrize("extra,error", [(0, None), (1, HeadersTooLarge)])
def test_head_limit_is_the_same_whole_or_split(extra, error):
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    head = base.replace(b"X: ", b"X: " + b"v" * (256 - len(base) + extra))
    assert len(head) == 256 + extra
    assert all_splits_agree(head)[1] is error


def test_trailer_section_limit():
    trailers = b"".join(b"T%d: %s\r\n" % (i, b"v" * 20) for i in range(12))
    assert all_splits_agree(CHUNKED + b"0\r\n" + trailers + b"\r\n")[1] is HeadersTooLarge


def test_error_carries_earlier_pipelined_messages():
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    events, error = all_splits_agree(data)
    assert events == [("head", "GET"), ("end", ())] and error is AmbiguousFraming


def test_eof_inside_a_body_is_incomplete():
    events, error = all_splits_agree(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab" + b""
    )
    assert error is None
    for impl in IMPLS:
        reader = request_reader(impl)
        reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
        with pytest.raises(IncompleteMessage):
            reader.feed(b"")


def test_close_delimited_response_ends_at_eof():
    for impl in IMPLS:
        reader = response_reader(impl)
        assert [type(e) for e in reader.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")] == [Head, Data]
        assert [type(e) for e in reader.feed(b"")] == [End]


def test_response_to_head_has_no_body():
    for impl in IMPLS:
        reader = response_reader(impl)
        reader.expect("HEAD", False)
        events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        assert [type(e) for e in events] == [Head, End]


# Inputs the fuzzer broke once (docs/http1.md, "Fuzzing"): first byte = split step.
FUZZ_REGRESSIONS = [
    b"\x07GET /old HTTP/1.0\r\n\r\n\r",
    b"\x07PUT / HTTP/1.1\r\nContent-Leng",
    b"\nPOST /a HTTP/1.1\r\nHost: "
    b"example.test\r\nTransfer-Encoding:\xa0chunked\r\n\r\nffff3\r\nabc\r\n0\r\n\r\n",
    b'\x03POST /a HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n1;a=b;c="'
    + b"\xa3" * 300
    + b'd e"\r\nabc\r\n0\r\n\r\n',
    b"\x00\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x01o",
    b"\x02GET old HTTP/1.0\r\n",
    b"\x00HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\n_onnection: "
    b"Keep-Alive\r\nTransfer-Encoding: \r\n\r\n",
    b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: "
    b"\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    b"\x05PUT /url HTTP/1.1\r\nTransfer-Encoding: chunked"
    + b"\t" * 100
    + b"\r\n\r\n3\r\nfoo\r\n\r\n",
    b"\x00PUT /url HTTP/1.1\r\nTransfer-Encoding: gzip \t\r\n\r\n",
]


@pytest.mark.parametrize("data", FUZZ_REGRESSIONS)
def test_fuzz_regressions(data):
    fuzz_readers(data)


# ------------------------------------------------------------- one whole message per read
#
# ``read_whole`` reads a read that is exactly one message without making its events;
# whatever it declines, ``feed`` reads. A reader driven "read_whole, else feed" must
# give the same messages, errors and parse counts as one driven by ``feed`` alone.

GET = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz"
CHUNKED_POST = CHUNKED + b"3\r\nabc\r\n0\r\n\r\n"
CLOSING_GET = b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
BAD_FRAMING = (
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
)
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\n\r\nstream"


class CountingHeads:
    """A head parser that counts the heads it is asked to parse (the real one behind)."""

    def __init__(self, heads):
        self._heads = heads
        self.parsed = 0

    def complete(self, *args):
        self.parsed += 1
        return self._heads.complete(*args)

    def __getattr__(self, name):
        return getattr(self._heads, name)


def counting_reader(impl, kind):
    reader = request_reader(impl) if kind == "request" else response_reader(impl)
    reader._heads = counting = CountingHeads(reader._heads)
    if kind == "request":
        reader._parse_head = counting.complete  # a request reader calls it directly
    return reader, counting


def whole_events(head, data):
    """The events ``read_whole`` stands for."""
    if head.framing == "length":
        return [Head(head), Data(data[len(data) - head.length :]), End()]
    return [Head(head), End()]


def drive(impl, kind, reads, *, whole, methods=()):
    """Each read through ``read_whole`` first (``whole``) or ``feed`` only: the
    summary of the events, the error if any, and how many heads were parsed."""
    reader, counting = counting_reader(impl, kind)
    for method in methods:
        reader.expect(method, False)
    events = []
    taken = 0
    try:
        for data in reads:
            head = reader.read_whole(data) if whole else None
            if head is not None:
                taken += 1
                events += whole_events(head, data)
            else:
                events += reader.feed(data)
    except Http1Error as exc:
        return _summary(events + exc.events), type(exc), counting.parsed, taken
    return _summary(events), None, counting.parsed, taken


@pytest.mark.parametrize("impl", IMPLS)
def test_a_request_per_read_is_read_whole_and_nothing_is_parsed_twice(impl):
    reads = [GET, POST, GET + GET, CHUNKED_POST, GET[:10], GET[10:], CLOSING_GET]
    by_feed = drive(impl, "request", reads, whole=False)
    by_whole = drive(impl, "request", reads, whole=True)
    assert by_whole[:3] == by_feed[:3]
    assert by_feed[0] == [
        *[("head", "GET"), ("end", ())],
        *[("head", "POST"), ("data", b"xyz"), ("end", ())],
        *[("head", "GET"), ("end", ())] * 2,
        *[("head", "POST"), ("data", b"abc"), ("end", ())],
        *[("head", "GET"), ("end", ())] * 2,
    ]
    assert by_feed[2] == 7  # heads: one parse each, whichever way they were read
    # Read whole: the first GET, the POST, the closing GET; the rest were fed.
    assert by_whole[3] == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_after_a_request_read_whole_the_reader_stands_where_feed_leaves_it(impl):
    # Nothing is read after Connection: close, and an Upgrade pauses the reader.
    for reads in ([CLOSING_GET, GET], [UPGRADE, GET]):
        by_feed = drive(impl, "request", reads, whole=False)
        assert drive(impl, "request", reads, whole=True)[:3] == by_feed[:3]
    reader = request_reader(impl)
    assert reader.read_whole(UPGRADE) is not None
    assert reader.feed(GET) == []  # kept for resume() or take_leftover()
    assert reader.take_leftover() == GET


@pytest.mark.parametrize("impl", IMPLS)
def test_a_bad_head_read_whole_gets_the_error_feed_gives_and_is_parsed_once(impl):
    by_feed = drive(impl, "request", [GET, BAD_FRAMING], whole=False)
    by_whole = drive(impl, "request", [GET, BAD_FRAMING], whole=True)
    assert by_feed[1] is AmbiguousFraming
    assert by_whole[:3] == by_feed[:3]


@pytest.mark.parametrize("impl", IMPLS)
def test_responses_read_whole_follow_the_requests_they_answer(impl):
    # HEAD's answer has no body whatever it announces; 1xx comes before the answer.
    methods = ["GET", "HEAD", "GET", "GET", "GET", "GET"]
    reads = [OK_2, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", CONTINUE, OK_2]
    reads += [NO_CONTENT, CHUNKED_OK, UNTIL_CLOSE]
    by_feed = drive(impl, "response", reads, whole=False, methods=methods)
    by_whole = drive(impl, "response", reads, whole=True, methods=methods)
    assert by_whole[:3] == by_feed[:3]
    assert [e for e in by_feed[0] if e[0] == "head"] == [
        ("head", s) for s in (200, 200, 100, 200, 204, 200, 200)
    ]
    assert by_whole[3] == 5  # all but the chunked and the close-delimited answers


HTTP1_READS = [GET, POST, CHUNKED_POST, CLOSING_GET, UPGRADE, BAD_FRAMING, b"\r\n" + GET]


@given(
    messages=st.lists(st.sampled_from(HTTP1_READS), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=80), max_size=6),
    impl=st.sampled_from(IMPLS),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_read_whole_or_feed_read_any_stream_alike(messages, cuts, impl):
    stream = b"".join(messages)
    reads, at = [], 0
    for cut in cuts:  # some reads split anywhere, then one message per read
        if at + cut < len(stream):
            reads.append(stream[at : at + cut])
            at += cut
    reads += [m for m in _messages_from(stream[at:], messages)]
    by_feed = drive(impl, "request", reads, whole=False)
    assert drive(impl, "request", reads, whole=True)[:3] == by_feed[:3]


def _messages_from(rest, messages):
    """``rest`` (a tail of the messages joined) cut at message boundaries where it can be."""
    out = []
    for message in reversed(messages):
        if len(rest) > len(message) and rest.endswith(message):
            out.insert(0, message)
            rest = rest[: -len(message)]
    if rest:
        out.insert(0, rest)
    return out
