"""What the server's first record says, for the flow log.

After an allowed ClientHello the engine relays bytes it cannot read. Its one
look at the server's side is the first record, which is in the clear in every
TLS version: a ServerHello (the version and cipher suite chosen, or a
HelloRetryRequest), or an alert (the server refused the handshake itself). That
is the reply of the flow record, and its arrival is the latency measured.

``ServerFirstRecord`` never raises and never holds bytes back: the engine has
forwarded them already. It keeps a copy of at most one record.
"""

from __future__ import annotations

from typing import Any

from parsers.tls.wire import (
    ALERT,
    CONTENT_TYPES,
    EXT_SUPPORTED_VERSIONS,
    FATAL,
    HANDSHAKE,
    HANDSHAKE_HEADER,
    HELLO_RETRY_RANDOM,
    MAX_CIPHERTEXT,
    RECORD_HEADER,
    SERVER_HELLO,
    alert_name,
    cipher_suite_name,
    version_name,
)

Fields = dict[str, Any]


class ServerFirstRecord:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Fields | None:
        """More of the server's first bytes: the reply fields once known, else None."""
        buf = self._buf
        buf += data[: RECORD_HEADER + MAX_CIPHERTEXT - len(buf)]
        if len(buf) < RECORD_HEADER:
            return None
        ctype, major = buf[0], buf[1]
        length = buf[3] << 8 | buf[4]
        if ctype not in CONTENT_TYPES or major != 3:
            return {"server": "not TLS"}
        if ctype == ALERT:
            if length < 2:
                return {"record": "alert"}
            if len(buf) < RECORD_HEADER + 2:
                return None
            level = "fatal" if buf[5] == FATAL else "warning"
            return {"alert": alert_name(buf[6]), "level": level}
        if ctype != HANDSHAKE:
            return {"record": CONTENT_TYPES[ctype]}
        if length < HANDSHAKE_HEADER:
            return {"record": "handshake"}
        if len(buf) < RECORD_HEADER + HANDSHAKE_HEADER:
            return None
        body_start = RECORD_HEADER + HANDSHAKE_HEADER
        if buf[5] != SERVER_HELLO:
            return {"handshake": buf[5]}
        size = buf[6] << 16 | buf[7] << 8 | buf[8]
        # A ServerHello cut over two records is legal and rare: read what this one holds.
        end = body_start + min(size, length - HANDSHAKE_HEADER)
        if len(buf) < end:
            return None
        return _server_hello(bytes(buf[body_start:end]))


def _server_hello(body: bytes) -> Fields:
    """RFC 8446 4.1.3 (RFC 5246 7.4.1.3): the version and cipher suite chosen."""
    try:
        legacy = int.from_bytes(body[0:2], "big")
        random = body[2:34]
        sid_end = 35 + body[34]
        suite = int.from_bytes(body[sid_end : sid_end + 2], "big")
        if len(body) < sid_end + 3:
            raise IndexError
        version = legacy
        pos = sid_end + 3
        if len(body) >= pos + 2:
            end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
            pos += 2
            while pos + 4 <= end:
                kind = int.from_bytes(body[pos : pos + 2], "big")
                size = int.from_bytes(body[pos + 2 : pos + 4], "big")
                if kind == EXT_SUPPORTED_VERSIONS and size == 2:
                    version = int.from_bytes(body[pos + 4 : pos + 6], "big")
                pos += 4 + size
    except IndexError:
        return {"handshake": "server_hello", "malformed": True}
    fields: Fields = {"version": version_name(version), "cipher_suite": cipher_suite_name(suite)}
    if random == HELLO_RETRY_RANDOM:
        fields["hello_retry_request"] = True
    return fields
