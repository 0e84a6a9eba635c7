"""CQL native protocol wire format (v3, v4, v5): envelopes, v5 segments, compression.

Pure functions and small value types; no state about a connection. The
engine in ``parsers/cql/engine.py`` keeps the state and decides what to do.

An *envelope* (called a frame in v3/v4) is a 9-byte header plus a body:

    version(1) flags(1) stream(2, signed) opcode(1) length(4)   big-endian

From v5 on, once STARTUP completes, envelopes travel inside *segments*:
a little-endian header (3 bytes, or 5 with LZ4) followed by its CRC24, the
payload, and the payload's CRC32. A self-contained segment carries whole
envelopes; a large envelope is cut over several non-self-contained ones.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeAlias

import lz4.block  # type: ignore[import-untyped]  # python-lz4 ships no types

from parsers.base import MAX_FRAME, FrameTooLarge, ProtocolError
from parsers.varint import VarintError, decode_uvarint

# What the readers accept: whole frames, or slices of a receive buffer.
_Bytes: TypeAlias = bytes | bytearray | memoryview

HEADER = struct.Struct(">BBhBI")
_USHORT, _INT = struct.Struct(">H"), struct.Struct(">i")
HEADER_LEN = 9
# The spec's ceiling for a frame body; the engine may be configured lower.
SPEC_MAX_FRAME = 256 * 1024 * 1024
SUPPORTED_VERSIONS = (3, 4, 5)
RESPONSE_BIT = 0x80

# Header flags
FLAG_COMPRESSED = 0x01
FLAG_TRACING = 0x02
FLAG_CUSTOM_PAYLOAD = 0x04
FLAG_WARNING = 0x08
FLAG_BETA = 0x10

# Opcodes
ERROR, STARTUP, READY, AUTHENTICATE = 0x00, 0x01, 0x02, 0x03
OPTIONS, SUPPORTED, QUERY, RESULT = 0x05, 0x06, 0x07, 0x08
PREPARE, EXECUTE, REGISTER, EVENT = 0x09, 0x0A, 0x0B, 0x0C
BATCH, AUTH_CHALLENGE, AUTH_RESPONSE, AUTH_SUCCESS = 0x0D, 0x0E, 0x0F, 0x10

OPCODE_NAMES = {
    ERROR: "ERROR",
    STARTUP: "STARTUP",
    READY: "READY",
    AUTHENTICATE: "AUTHENTICATE",
    OPTIONS: "OPTIONS",
    SUPPORTED: "SUPPORTED",
    QUERY: "QUERY",
    RESULT: "RESULT",
    PREPARE: "PREPARE",
    EXECUTE: "EXECUTE",
    REGISTER: "REGISTER",
    EVENT: "EVENT",
    BATCH: "BATCH",
    AUTH_CHALLENGE: "AUTH_CHALLENGE",
    AUTH_RESPONSE: "AUTH_RESPONSE",
    AUTH_SUCCESS: "AUTH_SUCCESS",
}
REQUEST_OPCODES = frozenset(
    {STARTUP, OPTIONS, QUERY, PREPARE, EXECUTE, REGISTER, BATCH, AUTH_RESPONSE}
)

# RESULT kinds
RESULT_VOID, RESULT_ROWS, RESULT_SET_KEYSPACE, RESULT_PREPARED, RESULT_SCHEMA_CHANGE = 1, 2, 3, 4, 5
RESULT_KIND_NAMES = {1: "Void", 2: "Rows", 3: "SetKeyspace", 4: "Prepared", 5: "SchemaChange"}

# Error codes used by the proxy itself
ERR_PROTOCOL = 0x000A
ERR_UNAUTHORIZED = 0x2100
ERR_UNPREPARED = 0x2500

# QUERY / EXECUTE parameter flags (a byte in v3/v4, an int in v5)
QF_VALUES = 0x01
QF_PAGE_SIZE = 0x04
QF_PAGING_STATE = 0x08
QF_SERIAL_CONSISTENCY = 0x10
QF_TIMESTAMP = 0x20
QF_NAMES_FOR_VALUES = 0x40
QF_KEYSPACE = 0x80  # v5
QF_NOW_IN_SECONDS = 0x100  # v5


class CqlError(ProtocolError):
    """Malformed CQL traffic. ``stream`` is the offending envelope's stream
    id when known, so the engine can answer on it."""

    def __init__(
        self, message: str, *, stream: int | None = None, code: str = "cql_protocol_error"
    ):
        super().__init__(message, code=code)
        self.stream = stream


class Truncated(CqlError):
    """A body ended before a field did. In a whole envelope that is malformed; in
    the first bytes of one it means more are needed: ``needed`` body bytes."""

    def __init__(self, message: str, *, stream: int | None = None, needed: int = 0):
        super().__init__(message, stream=stream)
        self.needed = needed


class CqlFrameTooLarge(FrameTooLarge):
    """An envelope longer than the engine's ``max_frame`` (or, ``limit`` set to
    ``max_held_frame``, one it would have to hold whole past ``max_held_frame``)."""

    def __init__(self, message: str, *, stream: int | None = None, limit: str = MAX_FRAME):
        super().__init__(message, limit=limit)
        self.stream = stream


# --------------------------------------------------------------------------
# Envelopes


@dataclass(frozen=True, slots=True)
class Envelope:
    version: int  # without the response bit
    flags: int
    stream: int
    opcode: int
    # As on the wire (possibly compressed in v3/v4). A memoryview for a large
    # envelope, read where it lies: only the start of its body when it is being
    # judged on its first bytes.
    body: _Bytes

    @property
    def opcode_name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"0x{self.opcode:02x}")


def parse_header(buf: _Bytes, pos: int = 0) -> tuple[int, int, int, int, int]:
    """(version byte, flags, stream, opcode, body length) at ``pos``."""
    vbyte, flags, stream, opcode, length = HEADER.unpack_from(buf, pos)
    return vbyte, flags, stream, opcode, length


def encode_envelope(version: int, flags: int, stream: int, opcode: int, body: bytes) -> bytes:
    return HEADER.pack(version, flags, stream, opcode, len(body)) + body


def error_body(code: int, message: str, extra: bytes = b"") -> bytes:
    text = message.encode()
    return struct.pack(">iH", code, len(text)) + text + extra


# --------------------------------------------------------------------------
# Reading bodies ([string], [long string], [short bytes], ...)


class BodyReader:
    """Reads the notation of spec section 3 from a body, raising CqlError on
    truncation (``Truncated``, which says how many body bytes were needed)."""

    __slots__ = ("data", "pos", "stream")

    def __init__(self, data: _Bytes, stream: int | None = None, pos: int = 0):
        self.data = data
        self.pos = pos
        self.stream = stream

    def _end(self, n: int) -> int:
        end = self.pos + n
        if n < 0:
            raise CqlError("truncated message body", stream=self.stream)
        if end > len(self.data):
            raise Truncated("truncated message body", stream=self.stream, needed=end)
        return end

    def _take(self, n: int) -> _Bytes:
        end = self._end(n)
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def skip(self, n: int) -> None:
        self.pos = self._end(n)  # no slice: a skipped value may be megabytes

    def byte(self) -> int:
        return self._take(1)[0]

    def short(self) -> int:
        value: int = _USHORT.unpack(self._take(2))[0]
        return value

    def int(self) -> int:
        value: int = _INT.unpack(self._take(4))[0]
        return value

    def string(self) -> str:
        return self._decode(self._take(self.short()))

    def long_string(self) -> str:
        n = self.int()
        if n < 0:
            raise CqlError("negative [long string] length", stream=self.stream)
        return self._decode(self._take(n))

    def short_bytes(self) -> bytes:
        return bytes(self._take(self.short()))

    def bytes_(self) -> bytes | None:
        n = self.int()
        return None if n < 0 else bytes(self._take(n))

    def value(self) -> None:
        n = self.int()
        if n >= 0:
            self.skip(n)
        elif n < -2:
            raise CqlError("invalid [value] length", stream=self.stream)

    def string_list(self) -> list[str]:
        return [self.string() for _ in range(self.short())]

    def string_map(self) -> dict[str, str]:
        return {self.string(): self.string() for _ in range(self.short())}

    def bytes_map(self) -> None:
        for _ in range(self.short()):
            self.string()
            n = self.int()
            if n > 0:
                self.skip(n)

    def _decode(self, raw: _Bytes) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise CqlError("string is not UTF-8", stream=self.stream) from None


# --------------------------------------------------------------------------
# v3/v4 frame body compression (negotiated in STARTUP)


def lz4_frame_compress(body: bytes) -> bytes:
    # Cassandra prefixes the LZ4 block with the uncompressed length, big-endian.
    compressed: bytes = lz4.block.compress(body, store_size=False)
    return struct.pack(">I", len(body)) + compressed


def lz4_frame_decompress(body: bytes, limit: int = SPEC_MAX_FRAME) -> bytes:
    if len(body) < 4:
        raise CqlError("LZ4 body shorter than its length prefix")
    size = struct.unpack_from(">I", body)[0]
    if size > limit:  # checked before lz4 allocates the output buffer
        raise CqlError(f"LZ4 body claims {size} bytes uncompressed, over the {limit} limit")
    try:
        plain: bytes = lz4.block.decompress(body[4:], uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise CqlError(f"bad LZ4 body: {e}") from None
    return plain


def _snappy() -> ModuleType:
    # python-snappy (untyped); imported lazily, only snappy connections pay for it
    import snappy  # type: ignore[import-untyped]

    module: ModuleType = snappy
    return module


def snappy_frame_compress(body: bytes) -> bytes:
    compressed: bytes = _snappy().compress(body)
    return compressed


def snappy_frame_decompress(body: bytes, limit: int = SPEC_MAX_FRAME) -> bytes:
    size = _varint(body)
    if size is None or size > limit:
        raise CqlError(f"Snappy body with a bad or oversized length ({size}, limit {limit})")
    try:
        plain: bytes = _snappy().uncompress(body)
    except Exception as e:  # snappy raises its own (unexported) error types
        raise CqlError(f"bad Snappy body: {e}") from None
    return plain


def _varint(data: bytes) -> int | None:
    """Snappy's leading varint: the uncompressed length (None if malformed)."""
    try:
        return decode_uvarint(data)[0]
    except VarintError:
        return None


# (compress, decompress with a size limit)
FrameCodec: TypeAlias = tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]
FRAME_CODECS: dict[str, FrameCodec] = {
    "lz4": (lz4_frame_compress, lz4_frame_decompress),
    "snappy": (snappy_frame_compress, snappy_frame_decompress),
}


# --------------------------------------------------------------------------
# v5 segments

SEGMENT_MAX_PAYLOAD = 128 * 1024 - 1
_CRC24_INIT = 0x875060
_CRC24_POLY = 0x1974F0B
_CRC32_INIT = zlib.crc32(b"\xfa\x2d\x55\xca")


def _crc24_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
        table.append(crc & 0xFFFFFF)
    return tuple(table)


_CRC24_TABLE = _crc24_table()


def crc24(value: int, nbytes: int) -> int:
    """CRC24 over the ``nbytes`` little-endian bytes of the header integer
    (MSB-first, init 0x875060, polynomial 0x1974F0B), a byte at a time."""
    crc = _CRC24_INIT
    for _ in range(nbytes):
        crc = ((crc << 8) & 0xFFFFFF) ^ _CRC24_TABLE[((crc >> 16) ^ value) & 0xFF]
        value >>= 8
    return crc


def crc32(payload: _Bytes) -> int:
    return zlib.crc32(payload, _CRC32_INIT)


@dataclass(frozen=True, slots=True)
class Segment:
    raw_len: int  # bytes the whole segment occupies on the wire
    payload: bytes  # decompressed
    self_contained: bool


def segment_header_len(compressed: bool) -> int:
    return 8 if compressed else 6  # header (5 or 3) + CRC24 (3)


def read_segment(
    buf: _Bytes, pos: int, compressed: bool, max_len: int | None = None
) -> Segment | None:
    """Decode the segment at ``buf[pos:]``, or None if it is not complete yet."""
    hlen = 5 if compressed else 3
    if len(buf) - pos < hlen + 3:
        return None
    header = int.from_bytes(buf[pos : pos + hlen], "little")
    expected = int.from_bytes(buf[pos + hlen : pos + hlen + 3], "little")
    if crc24(header, hlen) != expected:
        raise CqlError("segment header CRC24 mismatch")
    length = header & SEGMENT_MAX_PAYLOAD
    header >>= 17
    uncompressed = 0
    if compressed:
        uncompressed = header & SEGMENT_MAX_PAYLOAD
        header >>= 17
    self_contained = bool(header & 1)
    total = hlen + 3 + length + 4
    if len(buf) - pos < total:
        return None
    start = pos + hlen + 3
    payload = bytes(buf[start : start + length])
    if crc32(payload) != int.from_bytes(buf[start + length : start + length + 4], "little"):
        raise CqlError("segment payload CRC32 mismatch")
    if uncompressed:
        try:
            payload = lz4.block.decompress(payload, uncompressed_size=uncompressed)
        except lz4.block.LZ4BlockError as e:
            raise CqlError(f"bad LZ4 segment: {e}") from None
    return Segment(total, payload, self_contained)


def encode_segments(payload: bytes, compressed: bool) -> bytes:
    """``payload`` (whole envelopes) as one self-contained segment, or cut into
    non-self-contained ones when it exceeds the segment maximum."""
    if len(payload) <= SEGMENT_MAX_PAYLOAD:
        return _encode_segment(payload, compressed, True)
    return b"".join(
        _encode_segment(payload[i : i + SEGMENT_MAX_PAYLOAD], compressed, False)
        for i in range(0, len(payload), SEGMENT_MAX_PAYLOAD)
    )


def _encode_segment(payload: bytes, compressed: bool, self_contained: bool) -> bytes:
    body, uncompressed = payload, 0
    if compressed:
        packed = lz4.block.compress(payload, store_size=False)
        if len(packed) < len(payload):  # else send as-is, signalled by length 0
            body, uncompressed = packed, len(payload)
    header, hlen, shift = len(body), 3, 17
    if compressed:
        header |= uncompressed << 17
        hlen, shift = 5, 34
    if self_contained:
        header |= 1 << shift
    return (
        header.to_bytes(hlen, "little")
        + crc24(header, hlen).to_bytes(3, "little")
        + body
        + crc32(body).to_bytes(4, "little")
    )
