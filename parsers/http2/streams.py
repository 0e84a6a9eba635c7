"""Per-stream state of the HTTP/2 relay: the two one-way pipes and gRPC message counting.

A ``Pipe`` holds what one peer sent on a stream that the other peer's flow
control window has not yet accepted. Received DATA is only acknowledged to
its sender once it has been handed to the other connection (see
``H2Engine._flush``), so a pipe never holds more than the receive window we
advertised: a slow reader slows the writer instead of growing a buffer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, TypeAlias

# Pipe items: (DATA, payload, flow-controlled length) | (TRAILERS, headers) |
# (END,) | (RESET, error_code). Plain tuples keep the hot path cheap.
DATA, TRAILERS, END, RESET = 0, 1, 2, 3
PipeItem: TypeAlias = tuple[Any, ...]  # one of the shapes above


class Pipe:
    __slots__ = ("items", "unacked", "end_queued")

    def __init__(self) -> None:
        self.items: deque[PipeItem] = deque()
        self.unacked = 0  # flow-controlled bytes queued and not yet acknowledged
        self.end_queued = False  # END (or trailers) is in ``items`` already


class GrpcCounter:
    """Counts length-prefixed gRPC messages in a DATA stream without copying payloads.

    Each message is 1 byte flag + 4 bytes big-endian length + payload; frames
    may split a message anywhere, including inside the 5-byte prefix.
    """

    __slots__ = ("messages", "_skip", "_prefix")

    def __init__(self) -> None:
        self.messages = 0
        self._skip = 0  # payload bytes of the current message still to pass
        self._prefix = b""  # partial 5-byte prefix carried across frames

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            need = 5 - len(self._prefix)
            if self._prefix or size - pos < 5:
                self._prefix += data[pos : pos + need]
                pos += min(need, size - pos)
                if len(self._prefix) < 5:
                    return
                prefix, self._prefix = self._prefix, b""
                length = int.from_bytes(prefix[1:5], "big")
            else:
                length = int.from_bytes(data[pos + 1 : pos + 5], "big")
                pos += 5
            self.messages += 1
            self._skip = length


class Stream:
    """One client stream and, once allowed and opened, its upstream twin."""

    __slots__ = (
        "cid",
        "sid",
        "key",
        "headers",
        "request_ended",
        "to_server",
        "to_client",
        "request_done",
        "response_done",
        "denied",
        "status",
        "grpc_status",
        "grpc_in",
        "grpc_out",
        "replied",
    )

    def __init__(self, cid: int, key: Hashable, grpc: bool) -> None:
        self.cid = cid
        self.sid: int | None = None  # upstream stream id, once opened
        self.key = key
        # request headers waiting for an upstream slot
        self.headers: Sequence[tuple[bytes, bytes]] | None = None
        self.request_ended = False  # END_STREAM came with the request HEADERS
        self.to_server = Pipe()
        self.to_client = Pipe()
        self.request_done = False  # END_STREAM handed to the server (or request abandoned)
        self.response_done = False  # END_STREAM handed to the client (or stream reset)
        self.denied = False
        self.status: int | None = None
        self.grpc_status: int | None = None
        self.grpc_in = GrpcCounter() if grpc else None
        self.grpc_out = GrpcCounter() if grpc else None
        self.replied = False
