"""Read what a CQL client receives, with cassandra-driver's own codecs, for denial tests.

Nothing here uses the engine's wire module (``parsers/cql/wire.py``): v5
segments are read with the driver's ``SegmentCodec``, compressed v4 bodies
inflated with the driver's LZ4/Snappy functions, and bodies decoded by the
driver's ``ProtocolHandler.decode_message``, the code a real client runs.
The 9-byte envelope header is read with ``struct`` as the spec lays it out.

    answers = client_envelopes(data, version=5, compression="lz4")
    assert_unauthorized(data, version=5, stream=2, compression="lz4")
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from cassandra.connection import locally_supported_compressions, lz4_compress, lz4_decompress
from cassandra.protocol import ErrorMessage, ProtocolHandler, UnauthorizedErrorMessage
from cassandra.segment import SegmentCodec

ERROR = 0x00
UNAUTHORIZED = 0x2100
_HEADER = struct.Struct(">BBhBI")  # version, flags, stream, opcode, body length
_COMPRESSED = 0x01

# The driver's own table: what it would use on a connection that negotiated it.
DECOMPRESSORS = {None: None} | {
    name: decompress for name, (_, decompress) in locally_supported_compressions.items()
}


@dataclass
class Envelope:
    """One response envelope as the driver reads it."""

    version_byte: int
    flags: int
    stream: int
    opcode: int
    body: bytes  # as on the wire (still compressed when the flag says so)

    def decode(self, compression: str | None = None):
        """The driver's message object for this envelope."""
        return ProtocolHandler.decode_message(
            self.version_byte & 0x7F,
            {},
            self.stream,
            self.flags,
            self.opcode,
            self.body,
            DECOMPRESSORS[compression],
            None,
        )


def client_envelopes(data: bytes, version: int, compression: str | None = None) -> list[Envelope]:
    """Every envelope in ``data``, bytes sent toward the client after STARTUP.

    From v5 the envelopes travel inside segments (with LZ4 when negotiated);
    the whole of ``data`` must be complete segments and complete envelopes.
    """
    if version >= 5:
        codec = SegmentCodec(lz4_compress, lz4_decompress) if compression else SegmentCodec()
        buffer, payload = io.BytesIO(data), bytearray()
        while buffer.tell() < len(data):
            header = codec.decode_header(buffer)
            payload += codec.decode(buffer, header).payload
        data = bytes(payload)
    envelopes, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= _HEADER.size, "envelope header cut short"
        vbyte, flags, stream, opcode, length = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        assert len(body) == length, "envelope body cut short"
        envelopes.append(Envelope(vbyte, flags, stream, opcode, body))
        pos += _HEADER.size + length
    return envelopes


def assert_unauthorized(
    data: bytes,
    version: int,
    stream: int,
    compression: str | None = None,
    message_contains: str = "",
) -> UnauthorizedErrorMessage:
    """``data`` is exactly one ERROR envelope, Unauthorized (0x2100), on ``stream``."""
    (envelope,) = client_envelopes(data, version, compression)
    assert envelope.version_byte == 0x80 | version, "a response of the negotiated version"
    assert (envelope.stream, envelope.opcode) == (stream, ERROR)
    message = envelope.decode(compression)
    assert isinstance(message, ErrorMessage), message
    assert message.code == UNAUTHORIZED and isinstance(message, UnauthorizedErrorMessage), message
    assert message_contains in message.message
    # Unauthorized carries only [int] code and [string] message: nothing may follow.
    assert envelope.flags & ~_COMPRESSED == 0, "no tracing, warnings or payload on a denial"
    body = envelope.body
    if envelope.flags & _COMPRESSED:
        assert version < 5 and compression, "v5 compresses segments, v4 only when negotiated"
        body = DECOMPRESSORS[compression](body)
    (length,) = struct.unpack_from(">H", body, 4)
    assert len(body) == 4 + 2 + length, "bytes after the Unauthorized message"
    return message
