"""Seed inputs: the llhttp/h11 corpora, the differential corpus, and ClientHellos."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from parsers.conformance.registry import CORPORA_DIR


def seeds() -> list[bytes]:
    out: list[bytes] = []
    for name in ("llhttp_vectors.json", "h11_vectors.json"):
        path = CORPORA_DIR / "http1" / name
        if path.exists():
            out += [base64.b64decode(r["raw_b64"]) for r in json.loads(path.read_text())]
    from tests.parsers.http1.test_differential_http1 import CORPUS

    out += [data for _, data in CORPUS]
    out += quickscan_seeds()
    out += tls_seeds()
    out += h2_seeds()
    # The first byte of an input chooses the split (see targets._pieces); for
    # h2_relay, from 128, small frames too, which h2_small_frame_seeds are made of.
    first = [bytes([i % 17]) + data for i, data in enumerate(out)]
    return first + [bytes([128 | 16]) + data for data in h2_small_frame_seeds()]


def h2_seeds() -> list[bytes]:
    """HTTP/2 exchanges as the h2_relay target reads them (after its split byte):
    client frames, then server frames. Made with hpack, as real peers would."""
    from hpack import Encoder

    from parsers.http2.frames import (
        ACK,
        CONTINUATION,
        DATA,
        END_HEADERS,
        END_STREAM,
        HEADERS,
        INITIAL_WINDOW_SIZE,
        PADDED,
        SETTINGS,
        frame,
        settings_frame,
        window_update,
    )  # fmt: skip

    client, server = Encoder(), Encoder()
    server.header_table_size = 0
    get = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/x")]
    post = [
        *get[1:3],
        (b":method", b"POST"),
        (b":path", b"/svc.S/M"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    first = client.encode(get)
    block = client.encode(post)  # refers to fields the first block indexed
    client_frames = (
        frame(SETTINGS, ACK, 0)
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, first)
        + frame(HEADERS, 0, 3, block[:4])
        + frame(CONTINUATION, END_HEADERS, 3, block[4:])
        + frame(DATA, END_STREAM, 3, b"\x00\x00\x00\x00\x02hi")
        + window_update(0, 1000)
    )
    server_frames = (
        frame(SETTINGS, ACK, 0)
        + frame(HEADERS, END_HEADERS, 1, server.encode([(b":status", b"200")]))
        + frame(DATA, END_STREAM, 1, b"hello")
        + frame(HEADERS, END_HEADERS, 3, server.encode([(b":status", b"200")]))
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, server.encode([(b"grpc-status", b"0")]))
    )
    # A download to a client with a 15-byte window: padded DATA queued, cut to
    # fit, the rest held until the stream ends (a new connection, new encoders).
    client, server = Encoder(), Encoder()
    server.header_table_size = 0
    small_window = (
        frame(SETTINGS, ACK, 0)
        + settings_frame({INITIAL_WINDOW_SIZE: 10})
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, client.encode(get))
        + window_update(1, 5)
    )
    held = (
        frame(SETTINGS, ACK, 0)
        + frame(HEADERS, END_HEADERS, 1, server.encode([(b":status", b"200")]))
        + frame(DATA, PADDED, 1, b"\x03" + b"d" * 100 + b"\x00" * 3)
        + frame(DATA, END_STREAM, 1, b"e" * 20)
    )
    return [_halves(client_frames, server_frames), _halves(small_window, held)]


def h2_small_frame_seeds() -> list[bytes]:
    """For h2_relay's small frames (48 bytes at most): a download and an upload in
    DATA frames of 40 bytes, which the pieces it is fed in cut anywhere."""
    from hpack import Encoder

    from parsers.http2.frames import (
        ACK,
        DATA,
        END_HEADERS,
        END_STREAM,
        HEADERS,
        SETTINGS,
        frame,
    )  # fmt: skip

    client, server = Encoder(), Encoder()
    server.header_table_size = 0
    get = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    post = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    body = [frame(DATA, 0, 3, bytes([n]) * 40) for n in range(5)]
    client_frames = (
        frame(SETTINGS, ACK, 0)
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, client.encode(get))
        + frame(HEADERS, END_HEADERS, 3, client.encode(post))
        + b"".join(body)
        + frame(DATA, END_STREAM, 3, b"")
    )
    status = server.encode([(b":status", b"200")])
    server_frames = (
        frame(SETTINGS, ACK, 0)
        + frame(HEADERS, END_HEADERS, 1, status)
        + b"".join(frame(DATA, 0, 1, bytes([n]) * 40) for n in range(6))
        + frame(DATA, END_STREAM, 1, b"z")
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, status)
    )
    # The share byte, then both sides; the shorter is made as long with frames
    # of an unknown type (ignored, RFC 9113 §5.5) of at most 48 bytes.
    gap = len(server_frames) - len(client_frames)
    while gap >= 9:
        size = min(gap - 9, 48)
        client_frames += frame(0x20, 0, 0, bytes(size))
        gap -= 9 + size
    assert gap == 0, "the two sides are not of equal length"
    return [bytes([128]) + client_frames + server_frames]


def _halves(client_frames: bytes, server_frames: bytes) -> bytes:
    """After the piece-size byte seeds() puts in front, the share byte: 128 cuts the
    rest in halves, so the shorter side gets a frame of an unknown type (ignored,
    RFC 9113 §5.5) that makes the halves equal."""
    from parsers.http2.frames import frame

    gap = abs(len(client_frames) - len(server_frames)) - 9
    filler = frame(0x20, 0, 0, b"\x00" * gap)
    if len(client_frames) < len(server_frames):
        client_frames += filler
    else:
        server_frames += filler
    return bytes([128]) + client_frames + server_frames


def quickscan_seeds() -> list[bytes]:
    """Plain request heads, in the C head scanner's subset and just outside it."""
    from tests.parsers.http1.test_http1_quickscan import BASES

    host = b"GET /public/item/%d?q=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    return [
        *BASES,
        host % (1, 2) + b"X-Request-Id: 4f27-17\r\nUser-Agent: wrk\r\n\r\n",
        host % (3, 4) + b"Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        host % (5, 6) + b"Content-Length: 2\r\n\r\n",
        host % (7, 8) + b"Expect: 100-continue\r\n\r\n",
        b"GET /x%41y:/z HTTP/1.0\r\nHost: [::1]:80\r\n\r\n",
        b"HEAD / HTTP/1.1\r\n" + b"X-F: v\r\n" * 100 + b"\r\n",
    ]


def tls_seeds() -> list[bytes]:
    """ClientHellos: OpenSSL's own, one cut over records, one with ECH, one with no name."""
    from tests.support.tls_wire import client_hello_message, ext, real_client_hello, records

    return [
        real_client_hello("api.example.com", alpn=["h2", "http/1.1"]),
        real_client_hello(None),
        records(client_hello_message("a.svc.example.com"), sizes=[1, 5, 40]),
        records(client_hello_message("public.example", extensions=[ext(0xFE0D, b"\x00" * 24)])),
    ]


def write_seeds(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    all_seeds = seeds()
    for data in all_seeds:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(all_seeds)
