"""Size-prefixed frames out of a byte stream, copying each byte at most once.

Kafka frames run to megabytes (a produce batch, a fetch response) and arrive
in socket-sized chunks. Appending chunks to one growing bytearray re-allocates
and copies it over and over; here chunks are kept as they came and a frame is
assembled once, when it is taken, each chunk let go as soon as it is copied (so
a frame costs about its own size, not twice it). ``take_upto`` hands out chunks
without assembling them at all, for bytes that are only passed through.
"""

from __future__ import annotations

from collections import deque


class FrameBuffer:
    __slots__ = ("_parts", "_off", "_have")

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._off = 0  # bytes of _parts[0] already consumed
        self._have = 0  # bytes available

    def __len__(self) -> int:
        return self._have

    def feed(self, data: bytes) -> None:
        if data:
            self._parts.append(bytes(data))
            self._have += len(data)

    def peek(self, n: int) -> bytes | None:
        """The first ``n`` bytes (n small), not consumed; None if not there yet."""
        if self._have < n:
            return None
        return self._head(n)

    def peek_upto(self, n: int) -> bytes:
        """The first ``n`` bytes, or all there are if fewer, not consumed."""
        return self._head(min(n, self._have))

    def _head(self, n: int) -> bytes:
        if not n:
            return b""
        first = self._parts[0]
        if len(first) - self._off >= n:
            return first[self._off : self._off + n]
        out = bytearray()
        off = self._off
        for part in self._parts:
            out += part[off : off + n - len(out)]
            off = 0
            if len(out) == n:
                break
        return bytes(out)

    def take(self, n: int) -> bytes | bytearray:
        """Consume exactly ``n`` bytes (the caller checked ``len(self) >= n``): the
        chunk itself when it is exactly them, else a copy (a ``bytearray`` when they
        span chunks, the caller's to keep)."""
        parts = self._parts
        first = parts[0]
        if self._off == 0 and len(first) == n:
            parts.popleft()
            self._have -= n
            return first
        if len(first) - self._off >= n:
            return bytes(self._take_pieces(n)[0])
        # Spanning chunks: grow one buffer, dropping each chunk once it is copied,
        # rather than joining them all (the chunks and the join would be 2x).
        frame = bytearray()
        need = n
        while need:
            first = parts[0]
            avail = len(first) - self._off
            if avail <= need:
                frame += memoryview(first)[self._off :] if self._off else first
                parts.popleft()
                self._off = 0
                need -= avail
            else:
                frame += memoryview(first)[self._off : self._off + need]
                self._off += need
                need = 0
        self._have -= n
        return frame

    def take_upto(self, n: int) -> list[bytes]:
        """Consume up to ``n`` bytes, as the chunks they arrived in (whole
        chunks are not copied; a chunk split by a frame boundary is)."""
        return [bytes(p) for p in self._take_pieces(min(n, self._have))]

    def _take_pieces(self, n: int) -> list[bytes | memoryview]:
        pieces: list[bytes | memoryview] = []
        need = n
        parts = self._parts
        while need:
            first = parts[0]
            avail = len(first) - self._off
            if avail <= need:
                pieces.append(memoryview(first)[self._off :] if self._off else first)
                parts.popleft()
                self._off = 0
                need -= avail
            else:
                pieces.append(memoryview(first)[self._off : self._off + need])
                self._off += need
                need = 0
        self._have -= n
        return pieces
