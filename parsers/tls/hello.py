"""The ClientHello, read without decrypting anything: SNI, ALPN, versions, ECH.

``ClientHelloReader`` is sans-I/O and strict. Bytes go in as they arrive, cut
anywhere; ``feed`` returns ``None`` until the whole ClientHello is in, then the
parsed ``ClientHello``, and from then on the reader holds the exact bytes of the
records that carried it (``raw``) and whatever the client sent behind them
(``rest``), for the engine to forward untouched. The hello may be cut over
several records (RFC 8446 5.1 allows any fragmentation of a handshake message)
and those over any number of reads.

Anything we will not pass raises a ``TlsError`` carrying the fatal alert owed
(``parsers/tls/wire.py``), at the record version the client used:

- the first bytes are not a TLS record (plain text, an SSLv2-style header):
  no alert, the client would not understand one;
- a record of another type before the ClientHello is whole, or a handshake
  message other than a ClientHello: ``unexpected_message``;
- a record longer than 2^14 bytes: ``record_overflow``;
- a ClientHello that announces more than ``max_client_hello`` bytes: ``decode_error``,
  from its 4-byte header, before any of it is buffered (``ClientHelloTooLarge``,
  a ``LimitExceeded``: the flow log names the limit);
- lengths that do not add up, an empty list the RFC says is not empty, bytes
  left over: ``decode_error``; the same extension twice, or ``pre_shared_key``
  not last: ``illegal_parameter`` (RFC 8446 4.2), as OpenSSL answers, so that
  the proxy and the server can never read two different names out of one hello;
- a ``host_name`` that is not a DNS name (not ASCII, a NUL, an empty label, a
  trailing dot, over 253 bytes): ``unrecognized_name`` (RFC 6066 3).

Versions are not judged here: the server negotiates them, and part 2 of issue
12 (termination) brings our own minimum.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

from parsers.requests import TlsClientHello
from parsers.tls.wire import (
    ACCESS_DENIED,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    CLIENT_HELLO,
    CONTENT_TYPES,
    DECODE_ERROR,
    EXT_ALPN,
    EXT_ENCRYPTED_CLIENT_HELLO,
    EXT_PRE_SHARED_KEY,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE,
    HANDSHAKE_HEADER,
    ILLEGAL_PARAMETER,
    MAX_PLAINTEXT,
    NAME_TYPE_HOST_NAME,
    PROTOCOL_VERSION,
    RECORD_HEADER,
    RECORD_OVERFLOW,
    TLS10,
    UNEXPECTED_MESSAGE,
    UNRECOGNIZED_NAME,
    ClientHelloTooLarge,
    TlsError,
    alert_record,
    is_grease,
    version_name,
)

# The largest ClientHello (handshake message body) we read: one full record's worth.
# Real ones are 0.2 to 2 KiB (about 1.8 KiB with a post-quantum X25519MLKEM768 key
# share), so this leaves eight times that, while a client can make us buffer no more
# than this (plus 5 bytes of record header per fragment) before it is judged.
# haproxy reads the SNI out of its request buffer (``tune.bufsize``, 16 KiB); Envoy's
# tls_inspector reads up to 64 KiB (``TLS_MAX_CLIENT_HELLO``). docs/limits.md.
MAX_CLIENT_HELLO: Final = 16 * 1024

# A DNS name as SNI carries it (RFC 6066 3: ASCII, no trailing dot); underscores are
# let through, as resolvers and OpenSSL do.
_HOST_NAME: Final = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")
_MAX_HOST_NAME: Final = 253


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello says in the clear.

    ``server_name`` is the ``host_name`` of the server_name extension as sent, ``""``
    when there is none. With ECH (``ech``) it is the outer ClientHello's name, the
    client-facing server's public name: the real one is encrypted, and that outer
    name is what policy judges (docs/tls.md). ``versions`` are the supported_versions
    offered, in the client's order, GREASE left out (``()`` when the extension is
    absent: then ``legacy_version`` is the highest offered).
    """

    record_version: int
    legacy_version: int
    versions: tuple[int, ...]
    server_name: str
    alpn: tuple[str, ...]
    ech: bool
    extensions: tuple[int, ...]  # types in wire order, GREASE included

    @property
    def offered(self) -> tuple[int, ...]:
        return self.versions or (self.legacy_version,)

    def request(self) -> TlsClientHello:
        """The typed request policy judges."""
        return TlsClientHello(
            self.server_name,
            self.alpn,
            tuple(version_name(v) for v in self.offered),
            self.ech,
        )

    def alert(self, description: int = ACCESS_DENIED) -> bytes:
        """A fatal alert for this client, at its record version."""
        return alert_record(description, self.record_version)


def opens_client_hello(head: bytes, max_client_hello: int = MAX_CLIENT_HELLO) -> bool:
    """Whether ``head``, a connection's first bytes, plainly opens a ClientHello that
    ``ClientHelloReader`` reads on: a handshake record (version 3.x) of 4 to
    ``MAX_PLAINTEXT`` bytes whose message is a ClientHello within ``max_client_hello``.
    A cheap check of the common case, for a caller that only wants the bound: True
    means the reader, fed these bytes, raises nothing; False means nothing by itself
    (a short head, a hello split across tiny records): the reader says what is wrong."""
    if len(head) < _HEADERS.size:
        return False
    # (Read as three numbers, not seven: this runs for every terminated connection.)
    fields: tuple[int, int, int] = _HEADERS.unpack_from(head)
    opening, record_length, message = fields
    return (
        opening == _HANDSHAKE_3
        and HANDSHAKE_HEADER <= record_length <= MAX_PLAINTEXT
        and message >> 24 == CLIENT_HELLO
        and message & 0xFFFFFF <= max_client_hello
    )


# A record header (type and major version; the minor one skipped; length) and a
# handshake header (its type in the top byte, its 24-bit length below).
_HEADERS: Final = struct.Struct(">HxHI")
assert _HEADERS.size == RECORD_HEADER + HANDSHAKE_HEADER
# A handshake record of version 3.x: type and major version as one number.
_HANDSHAKE_3: Final = HANDSHAKE << 8 | 3


class ClientHelloReader:
    """Reads one ClientHello out of the client's first bytes; see the module doc."""

    __slots__ = (
        "_max",
        "_retry",
        "_early_data",
        "_buf",
        "_pos",
        "_msg",
        "_need",
        "_version",
        "raw",
        "rest",
        "passed",
    )

    def __init__(
        self,
        max_client_hello: int = MAX_CLIENT_HELLO,
        *,
        retry: bool = False,
        early_data: bool = False,
    ) -> None:
        self._max = max_client_hello
        # ``retry``: the second ClientHello, after a HelloRetryRequest. A TLS 1.3 client in
        # middlebox compatibility mode may send a ChangeCipherSpec record first (RFC 8446
        # D.4), and one whose first hello offered early data (``early_data``) may still be
        # sending it: the server skips those application_data records (RFC 8446 4.2.10).
        # Such records are not the hello's: they are handed out in ``passed`` at once.
        self._retry = retry
        self._early_data = early_data
        self.passed = b""
        self._buf = bytearray()  # every byte received, the records' headers included
        self._pos = 0  # records whole up to here
        self._msg = bytearray()  # the handshake message so far, headers stripped
        self._need: int | None = None  # its whole length, once its header is in
        self._version: int | None = None  # the first record's version
        self.raw = b""  # once read: the records that carried the ClientHello, as received
        self.rest = b""  # once read: what came behind them

    @property
    def started(self) -> bool:
        """True once a byte of the ClientHello has arrived."""
        return bool(self._buf)

    @property
    def held(self) -> int:
        """Bytes held until the ClientHello is whole (none once it is)."""
        return len(self._buf) + len(self._msg)

    def feed(self, data: bytes) -> ClientHello | None:
        """More of the client's bytes; the ClientHello once it is whole, else None."""
        buf = self._buf
        if not buf and data:
            _sniff(data[0])
        buf += data
        while len(buf) - self._pos >= RECORD_HEADER:
            pos = self._pos
            ctype, major, minor = buf[pos], buf[pos + 1], buf[pos + 2]
            length = buf[pos + 3] << 8 | buf[pos + 4]
            if self._version is None:
                if major != 3:
                    raise TlsError(
                        f"a record of type {ctype} with version {major}.{minor}: not TLS",
                        code="not_tls",
                        alert=None,
                    )
                self._version = major << 8 | minor
            version = self._version
            if self._retry and not self._msg and ctype in (CHANGE_CIPHER_SPEC, APPLICATION_DATA):
                if ctype == CHANGE_CIPHER_SPEC:
                    if length != 1 or len(buf) > pos + RECORD_HEADER and buf[pos + 5] != 1:
                        raise self._error(
                            "a malformed change_cipher_spec record", UNEXPECTED_MESSAGE
                        )
                elif not self._early_data:
                    raise self._error(
                        "application data before the second ClientHello, and the first "
                        "offered no early data",
                        UNEXPECTED_MESSAGE,
                    )
                elif length > MAX_PLAINTEXT + 256:  # TLSCiphertext, RFC 8446 5.2
                    raise self._error(f"an encrypted record of {length} bytes", RECORD_OVERFLOW)
                end = pos + RECORD_HEADER + length
                if len(buf) < end:
                    return None
                self.passed += bytes(buf[:end])  # pos is 0: nothing of the hello came yet
                del buf[:end]
                continue
            if ctype != HANDSHAKE:
                what = CONTENT_TYPES.get(ctype, f"type {ctype}")
                raise self._error(
                    f"a {what} record before the ClientHello was whole", UNEXPECTED_MESSAGE
                )
            if length > MAX_PLAINTEXT:
                raise self._error(
                    f"a record of {length} bytes (at most {MAX_PLAINTEXT})", RECORD_OVERFLOW
                )
            if not length:
                raise self._error("an empty handshake record (RFC 8446 5.1)", DECODE_ERROR)
            end = pos + RECORD_HEADER + length
            if self._need is None:
                # The message's own header may sit in a record still arriving: judge it
                # at once, so that an oversized ClientHello is refused before it is read.
                head = self._msg + buf[pos + RECORD_HEADER : min(end, pos + RECORD_HEADER + 4)]
                if len(head) >= HANDSHAKE_HEADER:
                    self._need = self._header(head, version)
            if len(buf) < end:
                return None
            self._pos = end
            self._msg += buf[pos + RECORD_HEADER : end]
            msg = self._msg
            if self._need is not None and len(msg) >= self._need:
                if len(msg) > self._need:
                    raise self._error(
                        f"{len(msg) - self._need} bytes of another handshake message behind "
                        "the ClientHello, before the server answered",
                        UNEXPECTED_MESSAGE,
                    )
                hello = parse_client_hello(bytes(msg[HANDSHAKE_HEADER:]), version)
                self.raw, self.rest = bytes(buf[:end]), bytes(buf[end:])
                self._buf, self._msg = bytearray(), bytearray()
                return hello
        return None

    def _header(self, head: bytearray, version: int) -> int:
        """The ClientHello's whole length, from its 4-byte handshake header."""
        if head[0] != CLIENT_HELLO:
            raise self._error(
                f"a handshake message of type {head[0]} where a ClientHello belongs",
                UNEXPECTED_MESSAGE,
            )
        size = head[1] << 16 | head[2] << 8 | head[3]
        if size > self._max:
            raise ClientHelloTooLarge(
                f"a ClientHello of {size} bytes (at most {self._max})", record_version=version
            )
        return HANDSHAKE_HEADER + size

    def _error(self, message: str, alert: int) -> TlsError:
        code = {
            UNEXPECTED_MESSAGE: "unexpected_message",
            RECORD_OVERFLOW: "record_overflow",
        }.get(alert, "decode_error")
        return TlsError(message, code=code, alert=alert, record_version=self._version or TLS10)


def _sniff(first: int) -> None:
    """Refuse at once what cannot be the first byte of a TLS connection."""
    if first in CONTENT_TYPES:
        return  # a TLS record type; the others than handshake are refused with an alert
    if first & 0x80:
        raise TlsError(
            f"an SSLv2-style record header (first byte 0x{first:02x}): an SSLv2-compatible "
            "ClientHello, which no TLS 1.2 or later client sends (RFC 6176), or not TLS",
            code="sslv2_hello",
            alert=None,
        )
    hint = " (plain text: an HTTP request on a TLS port?)" if 0x20 < first < 0x7F else ""
    raise TlsError(
        f"first byte 0x{first:02x} is not a TLS record type{hint}", code="not_tls", alert=None
    )


# ------------------------------------------------------------------------- the message


class _Cursor:
    """Reads the big-endian fields and length-prefixed vectors of one buffer; running
    short of bytes is a ``decode_error``."""

    __slots__ = ("_data", "_pos", "_version", "_what")

    def __init__(self, data: bytes, version: int, what: str) -> None:
        self._data = data
        self._pos = 0
        self._version = version
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if self.remaining < n:
            raise self.error(f"{self._what} ends inside a field ({n} bytes wanted)")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.remaining:
            raise self.error(f"{self.remaining} bytes left over at the end of {self._what}")

    def error(self, message: str, alert: int = DECODE_ERROR) -> TlsError:
        code = {ILLEGAL_PARAMETER: "illegal_parameter", UNRECOGNIZED_NAME: "bad_server_name"}
        return TlsError(
            message,
            code=code.get(alert, "decode_error"),
            alert=alert,
            record_version=self._version,
        )

    def sub(self, data: bytes, what: str) -> _Cursor:
        return _Cursor(data, self._version, what)


def parse_client_hello(body: bytes, record_version: int = TLS10) -> ClientHello:
    """A ClientHello's body (after its 4-byte handshake header), RFC 8446 4.1.2 (and
    RFC 5246 7.4.1.2, whose extensions block may be absent)."""
    c = _Cursor(body, record_version, "the ClientHello")
    legacy_version = c.u16()
    if legacy_version >> 8 != 3:
        raise c.error(
            f"ClientHello version {legacy_version >> 8}.{legacy_version & 0xFF}", PROTOCOL_VERSION
        )
    c.take(32)  # random
    if len(c.vec8()) > 32:
        raise c.error("a session id of more than 32 bytes")
    suites = c.vec16()
    if not suites or len(suites) % 2:
        raise c.error(f"a cipher suite list of {len(suites)} bytes")
    if not c.vec8():
        raise c.error("no compression method")
    server_name = ""
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech = False
    types: list[int] = []
    if c.remaining:  # no extensions at all is a TLS 1.2 (and older) ClientHello
        block = c.sub(c.vec16(), "the extensions")
        c.done()
        seen: set[int] = set()
        while block.remaining:
            kind = block.u16()
            data = block.vec16()
            if kind in seen:
                raise c.error(f"extension {kind} twice (RFC 8446 4.2)", ILLEGAL_PARAMETER)
            if EXT_PRE_SHARED_KEY in seen:
                raise c.error(
                    "pre_shared_key is not the last extension (RFC 8446 4.2.11)",
                    ILLEGAL_PARAMETER,
                )
            seen.add(kind)
            types.append(kind)
            if kind == EXT_SERVER_NAME:
                server_name = _server_name(c.sub(data, "the server_name extension"))
            elif kind == EXT_ALPN:
                alpn = _alpn(c.sub(data, "the ALPN extension"))
            elif kind == EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(c.sub(data, "supported_versions"))
            elif kind == EXT_ENCRYPTED_CLIENT_HELLO:
                if not data:
                    raise c.error("an empty encrypted_client_hello extension")
                ech = True
    return ClientHello(
        record_version, legacy_version, versions, server_name, alpn, ech, tuple(types)
    )


def _server_name(c: _Cursor) -> str:
    """RFC 6066 3: exactly one entry, of type host_name (as OpenSSL requires)."""
    names = c.sub(c.vec16(), "the server name list")
    c.done()
    if not names.remaining:
        raise c.error("an empty server name list")
    name_type = names.u8()
    name = names.vec16()
    if names.remaining:
        raise c.error("more than one server name (RFC 6066 3 allows one host_name)")
    if name_type != NAME_TYPE_HOST_NAME:
        raise c.error(f"a server name of type {name_type} (only host_name, 0, exists)")
    if not name:
        raise c.error("an empty host_name")
    if len(name) > _MAX_HOST_NAME or not _HOST_NAME.fullmatch(name):
        shown = name[:80].decode("ascii", "backslashreplace")
        raise c.error(
            f"host_name {shown!r} is not a DNS name (RFC 6066 3: ASCII, no trailing dot)",
            UNRECOGNIZED_NAME,
        )
    return name.decode("ascii")


def _alpn(c: _Cursor) -> tuple[str, ...]:
    """RFC 7301 3.1: a non-empty list of non-empty protocol names."""
    names = c.sub(c.vec16(), "the ALPN protocol list")
    c.done()
    if not names.remaining:
        raise c.error("an empty ALPN protocol list")
    out: list[str] = []
    while names.remaining:
        name = names.vec8()
        if not name:
            raise c.error("an empty ALPN protocol name")
        out.append(name.decode("ascii", "backslashreplace"))
    return tuple(out)


def _supported_versions(c: _Cursor) -> tuple[int, ...]:
    """RFC 8446 4.2.1: ProtocolVersion versions<2..254>."""
    raw = c.vec8()
    c.done()
    if not raw or len(raw) % 2:
        raise c.error(f"a supported_versions list of {len(raw)} bytes")
    versions = (int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
    return tuple(v for v in versions if not is_grease(v))
