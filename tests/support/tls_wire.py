"""TLS bytes for tests: real ClientHellos from Python's ``ssl``, hand-built ones for the
cases no real client sends, record framing, and reading an alert off the wire.

    hello = real_client_hello("api.example.com", alpn=["h2"])   # OpenSSL's own bytes
    msg = client_hello_message(sni="a.example", extensions=[ext(0xFE0D, b"\\x00...")])
    wire = records(msg, sizes=[7, 100])                         # one message, three records
    assert read_alert(reply) == (0x0301, "fatal", "access_denied")
    # and what OpenSSL, the client, makes of it:
    assert alert_seen_by_client(client, incoming, reply) == "TLSV1_ALERT_ACCESS_DENIED"
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Iterable, Sequence

HANDSHAKE = 22
CLIENT_HELLO = 1

# RFC 8446 6 and RFC 6066 3, written out here rather than taken from parsers/tls/wire.py,
# so that a wrong code there cannot make a test agree with it.
ALERT_NAMES = {
    10: "unexpected_message",
    22: "record_overflow",
    40: "handshake_failure",
    47: "illegal_parameter",
    49: "access_denied",
    50: "decode_error",
    70: "protocol_version",
    112: "unrecognized_name",
}


def real_client_hello(
    server_name: str | None = "api.example.com",
    *,
    alpn: Sequence[str] = (),
    context: ssl.SSLContext | None = None,
) -> bytes:
    """The first flight of a real OpenSSL client (Python's ``ssl`` on a MemoryBIO)."""
    client, _incoming, outgoing = memory_client(server_name, alpn=alpn, context=context)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def memory_client(
    server_name: str | None,
    *,
    alpn: Sequence[str] = (),
    context: ssl.SSLContext | None = None,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS client with no socket: (object, bytes in, bytes out)."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    # What a current client offers, whatever this Python's build defaults to.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    return client, incoming, outgoing


# ---------------------------------------------------------------------------- building


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def vec8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def ext(kind: int, data: bytes) -> bytes:
    return u16(kind) + vec16(data)


def sni_ext(name: bytes | str, name_type: int = 0) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return ext(0, vec16(bytes([name_type]) + vec16(raw)))


def alpn_ext(*names: bytes | str) -> bytes:
    raw = b"".join(vec8(n.encode() if isinstance(n, str) else n) for n in names)
    return ext(16, vec16(raw))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec8(b"".join(u16(v) for v in versions)))


def client_hello_body(
    *,
    extensions: Iterable[bytes] | None = (),
    legacy_version: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    cipher_suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves the extensions block out."""
    body = (
        u16(legacy_version)
        + b"\x22" * 32
        + vec8(session_id)
        + vec16(cipher_suites)
        + vec8(compression)
    )
    if extensions is not None:
        body += vec16(b"".join(extensions))
    return body


def handshake(body: bytes, msg_type: int = CLIENT_HELLO) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def client_hello_message(
    sni: str | None = "api.example.com",
    alpn: Sequence[str] = ("h2", "http/1.1"),
    versions: Sequence[int] = (0x0304, 0x0303),
    extensions: Sequence[bytes] = (),
) -> bytes:
    """A whole ClientHello handshake message (with its 4-byte header)."""
    exts = []
    if sni is not None:
        exts.append(sni_ext(sni))
    if alpn:
        exts.append(alpn_ext(*alpn))
    if versions:
        exts.append(versions_ext(*versions))
    return handshake(client_hello_body(extensions=[*exts, *extensions]))


def records(
    message: bytes,
    *,
    version: int = 0x0301,
    sizes: Sequence[int] = (),
    content_type: int = HANDSHAKE,
) -> bytes:
    """``message`` framed as records: fragments of ``sizes`` bytes first, then the rest in
    records of at most 2^14 bytes."""
    out = bytearray()
    pos = 0
    for size in sizes:
        out += _record(content_type, version, message[pos : pos + size])
        pos += size
    while pos < len(message):
        out += _record(content_type, version, message[pos : pos + (1 << 14)])
        pos += 1 << 14
    return bytes(out)


def _record(content_type: int, version: int, fragment: bytes) -> bytes:
    return bytes([content_type]) + u16(version) + vec16(fragment)


def reframe(flight: bytes, sizes: Sequence[int]) -> bytes:
    """A real client's first flight (one ClientHello record) cut into records of
    ``sizes`` bytes: the same handshake message, so the handshake still completes."""
    version = int.from_bytes(flight[1:3], "big")
    length = int.from_bytes(flight[3:5], "big")
    message, rest = flight[5 : 5 + length], flight[5 + length :]
    return records(message, version=version, sizes=sizes) + rest


# ---------------------------------------------------------------------------- reading


def read_alert(data: bytes) -> tuple[int, str, str]:
    """(record version, level, description) of the one alert record ``data`` must be."""
    assert len(data) == 7, f"an alert record is 7 bytes, got {data!r}"
    assert data[0] == 21, f"content type {data[0]}, not alert (21): {data!r}"
    assert data[3:5] == b"\x00\x02", f"alert record length {data[3:5]!r}"
    level = {1: "warning", 2: "fatal"}.get(data[5], f"level {data[5]}")
    return int.from_bytes(data[1:3], "big"), level, ALERT_NAMES.get(data[6], f"alert {data[6]}")


def expect_alert(data: bytes, description: str, version: int = 0x0301) -> None:
    """``data`` is exactly one fatal ``description`` alert at record ``version``: what a
    denial must be (tests/parsers/tls/test_tls_denial_mutations.py proves this check
    catches a wrong one)."""
    got_version, level, name = read_alert(data)
    assert level == "fatal", f"a {level} alert: the client may go on ({data!r})"
    assert name == description, f"alert {name}, not {description} ({data!r})"
    assert got_version == version, f"record version 0x{got_version:04x}, not 0x{version:04x}"


def alert_seen_by_client(client: ssl.SSLObject, incoming: ssl.MemoryBIO, data: bytes) -> str:
    """What the OpenSSL client that sent a ClientHello makes of ``data`` as its answer:
    the reason of the ``SSLError`` its handshake ends with (``TLSV1_ALERT_ACCESS_DENIED``)."""
    incoming.write(data)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        raise AssertionError("the client waits for more: no alert in what it read") from None
    except ssl.SSLError as err:
        return str(err.reason)
    raise AssertionError("the client's handshake went on")
