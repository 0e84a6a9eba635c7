"""MessageReader edge cases, both implementations, every split: limits hold
at the same byte whole or split, errors carry what was read before them,
and the inputs the fuzzer once broke stay fixed."""

from __future__ import annotations

import pytest

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
