"""Error codes of a Fetch response without decoding (or even joining) it.

A fetch response is mostly record batches, megabytes of them, which the proxy
only passes through. For the flow record it needs the error codes, which sit
between the batches. This walker reads the response as the chunks it arrived
in and skips every batch by its length: no copy of the records at all, where
a full decode would copy each batch once to join the frame and once more to
decode it.

Field layout from Kafka's FetchResponse.json, versions 4 to 18 (older
versions fall back to the full decode).
"""

from __future__ import annotations

import struct

from parsers.varint import MAX_UVARINT_BYTES, decode_uvarint

MIN_VERSION, MAX_VERSION = 4, 18
FLEXIBLE_FROM = 12

_INT16, _INT32 = struct.Struct(">h"), struct.Struct(">i")


class _Reader:
    """Sequential reads over a list of chunks."""

    __slots__ = ("_parts", "_i", "_off")

    def __init__(self, parts: list[bytes]):
        self._parts = parts
        self._i = 0
        self._off = 0

    def read(self, n: int) -> bytes:
        part = self._parts[self._i]
        if len(part) - self._off >= n:
            whole = part[self._off : self._off + n]
            self._advance(n)
            return whole
        out = bytearray()
        while len(out) < n:
            part = self._parts[self._i]
            take = min(n - len(out), len(part) - self._off)
            out += part[self._off : self._off + take]
            self._advance(take)
        return bytes(out)

    def skip(self, n: int) -> None:
        if n < 0:
            raise ValueError("negative length")
        self._advance(n)

    def _advance(self, n: int) -> None:
        self._off += n
        while self._i < len(self._parts) and self._off >= len(self._parts[self._i]):
            self._off -= len(self._parts[self._i])
            self._i += 1
        if self._i >= len(self._parts) and self._off > 0:
            raise ValueError("read past the end of the response")

    def int16(self) -> int:
        value: int = _INT16.unpack(self.read(2))[0]
        return value

    def int32(self) -> int:
        value: int = _INT32.unpack(self.read(4))[0]
        return value

    def uvarint(self) -> int:
        value, size = decode_uvarint(self._peek(MAX_UVARINT_BYTES))
        self._advance(size)
        return value

    def _peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from here (fewer at the end), not consumed."""
        part = self._parts[self._i] if self._i < len(self._parts) else b""
        if len(part) - self._off >= n:
            return part[self._off : self._off + n]
        out = bytearray(part[self._off :])
        for part in self._parts[self._i + 1 :]:
            if len(out) >= n:
                break
            out += part[: n - len(out)]
        return bytes(out)

    def tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.skip(self.uvarint())


def first_error(parts: list[bytes], version: int) -> int | None:
    """The top-level error code if set, else the first non-zero partition
    error code, else 0. None when this version is not handled here.

    ``parts`` is the whole framed response (size prefix included).
    """
    if not MIN_VERSION <= version <= MAX_VERSION:
        return None
    flexible = version >= FLEXIBLE_FROM
    r = _Reader(parts)
    r.skip(8)  # size, correlation id
    if flexible:
        r.tagged_fields()  # response header v1

    def count() -> int:
        n = r.uvarint() - 1 if flexible else r.int32()
        return max(n, 0)  # -1 / 0 encode a null array

    def skip_string() -> None:
        r.skip(max(r.uvarint() - 1, 0) if flexible else max(r.int16(), 0))

    r.skip(4)  # throttle_time_ms (v1+)
    top = 0
    if version >= 7:
        top = r.int16()
        r.skip(4)  # session_id
    if top:
        return top
    found = 0
    for _ in range(count()):
        if version >= 13:
            r.skip(16)  # topic_id
        else:
            skip_string()
        for _ in range(count()):
            r.skip(4)  # partition_index
            code = r.int16()
            if code and not found:
                found = code
            r.skip(8 + 8)  # high_watermark, last_stable_offset (v4+)
            if version >= 5:
                r.skip(8)  # log_start_offset
            for _ in range(count()):  # aborted_transactions (v4+)
                r.skip(16)
                if flexible:
                    r.tagged_fields()
            if version >= 11:
                r.skip(4)  # preferred_read_replica
            if flexible:
                r.skip(max(r.uvarint() - 1, 0))  # records
                r.tagged_fields()
            else:
                r.skip(max(r.int32(), 0))
        if flexible:
            r.tagged_fields()
    return found
