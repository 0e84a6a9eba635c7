"""Property tests (hypothesis) for the HTTP/1 readers, both implementations.

- any split of a valid stream reads the same as the whole stream;
- parse -> serialise (canonical framing) -> parse gives the same messages;
- on arbitrary bytes the C and Python parsers agree.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.http1.engine import request_reader, response_reader, serialise_request
from parsers.http1.errors import Http1Error
from parsers.http1.reader import Data, End, Head

IMPLS = ("c", "python")
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"

names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: (
        n.lower()
        not in (
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "upgrade",
            "expect",
            "trailer",
        )
    )
)
values = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t")
)
bodies = st.binary(max_size=200)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    path = "/" + draw(st.text(PATH_CHARS, max_size=20))
    headers = [(draw(names).encode(), draw(values)) for _ in range(draw(st.integers(0, 5)))]
    body = draw(bodies)
    framing = draw(
        st.sampled_from(["length", "chunked"] if body else ["none", "length", "chunked"])
    )
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: example.test"]
    head += [n + b": " + v for n, v in headers]
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
        wire_body = body
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 50), max_size=10))
        wire_body, pos = b"", 0
        for size in sizes:
            piece = body[pos : pos + size]
            if not piece:
                break
            ext = draw(st.sampled_from([b"", b";a=b", b';x="y z"']))
            wire_body += b"%x" % len(piece) + ext + b"\r\n" + piece + b"\r\n"
            pos += len(piece)
        if pos < len(body):
            wire_body += b"%x\r\n" % (len(body) - pos) + body[pos:] + b"\r\n"
        wire_body += b"0\r\n\r\n"
    else:
        wire_body = b""
    return b"\r\n".join(head) + b"\r\n\r\n" + wire_body, (method, path, body)


streams = st.lists(requests(), min_size=1, max_size=3)


def read_all(impl, pieces, kind="request"):
    reader = request_reader(impl) if kind == "request" else response_reader(impl)
    events, error = [], None
    try:
        for piece in pieces:
            events += reader.feed(piece)
    except Http1Error as exc:
        events, error = events + exc.events, type(exc)
    messages = []
    for event in events:
        if type(event) is Head:
            messages.append([event.head, b"", False])
        elif type(event) is Data:
            messages[-1][1] += event.data
        elif type(event) is End:
            messages[-1][2] = True
    return [
        (h.method, h.target, h.status, h.version, tuple(h.headers), body, done)
        for h, body, done in messages
    ], error is not None


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_reads_like_the_whole(stream, points):
    data = b"".join(wire for wire, _ in stream)
    for impl in IMPLS:
        whole, rejected = read_all(impl, [data])
        assert not rejected
        assert [(m, t, body) for m, t, _, _, _, body, _ in whole] == [
            expected for _, expected in stream
        ]
        assert read_all(impl, cut(data, points)) == (whole, False)
        assert read_all(impl, [data[i : i + 1] for i in range(len(data))]) == (whole, False)


@settings(max_examples=100, deadline=None)
@given(streams)
def test_parse_serialise_parse_round_trip(stream):
    data = b"".join(wire for wire, _ in stream)
    for impl in IMPLS:
        reader = request_reader(impl)
        canonical = b""
        for event in reader.feed(data):
            if type(event) is Head:
                head = event.head
                canonical += serialise_request(head)
            elif type(event) is Data:
                canonical += (
                    b"%x\r\n" % len(event.data) + event.data + b"\r\n"
                    if head.framing == "chunked"
                    else event.data
                )
            elif type(event) is End:
                canonical += b"0\r\n\r\n" if head.framing == "chunked" else b""
        first, _ = read_all(impl, [data])
        again, rejected = read_all(impl, [canonical])
        assert not rejected

        def strip(messages):  # framing fields are rewritten canonically
            return [
                (
                    m,
                    t,
                    v,
                    tuple(
                        h
                        for h in hs
                        if h[0].lower() not in (b"content-length", b"transfer-encoding")
                    ),
                    b,
                )
                for m, t, _, v, hs, b, _ in messages
            ]

        assert strip(again) == strip(first)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["request", "response"]))
def test_implementations_agree_on_arbitrary_bytes(data, kind):
    assert read_all("c", [data], kind) == read_all("python", [data], kind)


@settings(max_examples=200, deadline=None)
@given(
    streams,
    st.integers(0, 10_000),
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\x00", b":", b",", b";", b"\x7f", b"\xff"]),
)
def test_implementations_agree_on_mutated_streams(stream, where, byte):
    data = b"".join(wire for wire, _ in stream)
    pos = where % (len(data) + 1)
    mutated = data[:pos] + byte + data[pos:]
    assert read_all("c", [mutated]) == read_all("python", [mutated])
    assert read_all("c", [mutated[i : i + 1] for i in range(len(mutated))]) == read_all(
        "python", [mutated]
    )
