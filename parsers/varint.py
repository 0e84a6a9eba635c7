"""Unsigned varints (LEB128): seven bits a byte, low bits first, high bit = more.

Kafka's flexible versions use them for compact lengths, array counts and
tagged fields; Snappy (a CQL compression) starts a body with one, the
uncompressed length. Both cap them at 32 bits, so at five bytes. One codec
serves both protocols, which is why it lives here and not in either package.
"""

from __future__ import annotations

# 5 x 7 bits covers 32 bits; a sixth byte is never legal.
MAX_UVARINT_BYTES = 5


class VarintError(ValueError):
    """Not an unsigned varint: longer than five bytes, or cut short.

    A ``ValueError``, so the Kafka engine's "undecodable body" handling, which
    catches ``ValueError``, covers it.
    """


class TruncatedVarint(VarintError):
    """The buffer ends inside the varint (more bytes may complete it)."""


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"unsigned varint of a negative number ({value})")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """The varint at ``buf[pos:]``, and the position just after it."""
    end = len(buf)
    if pos < end and buf[pos] < 0x80:  # one byte: most lengths and counts
        return buf[pos], pos + 1
    value = shift = 0
    for i in range(pos, pos + MAX_UVARINT_BYTES):
        if i >= end:
            raise TruncatedVarint(f"buffer ends inside a varint at byte {i}")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise VarintError(f"varint longer than {MAX_UVARINT_BYTES} bytes at byte {pos}")
