"""Per-stream state of the HTTP/2 relay, and gRPC message counting.

A stream has the same id on both hops. Each direction has a queue of what one
peer sent that the other peer's flow-control windows have not yet accepted.
Received DATA is only credited back to its sender (WINDOW_UPDATE) once it has
been handed to the other hop, so a queue never holds more than the receive
window the relay advertised: a slow reader slows the writer instead of
growing a buffer.
"""

from __future__ import annotations

from collections import deque
from typing import Any, TypeAlias

# Queue items: (DATA, payload, flow-controlled length, END_STREAM) |
# (TRAILERS, framed header block) | (RESET, error code). Plain tuples keep the
# hot path cheap.
DATA, TRAILERS, RESET = 0, 1, 2
QueueItem: TypeAlias = tuple[Any, ...]  # one of the shapes above


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

    def feed(self, data: bytes | memoryview) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            need = 5 - len(self._prefix)
            if self._prefix or size - pos < 5:
                self._prefix += bytes(data[pos : pos + need])
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
    """One client stream and, once allowed and opened, its upstream twin (same id)."""

    __slots__ = (
        "sid",
        "client_open",
        "server_open",
        "opened",
        "held",
        "request_done",
        "response_done",
        "client_window",
        "server_window",
        "client_credit",
        "server_credit",
        "client_owed",
        "server_owed",
        "to_server",
        "to_client",
        "request_length",
        "request_seen",
        "response_length",
        "response_seen",
        "status",
        "grpc_status",
        "grpc_in",
        "grpc_out",
        "replied",
    )

    def __init__(
        self, sid: int, grpc: bool, *, receive_window: int, client_window: int, server_window: int
    ) -> None:
        self.sid = sid
        self.client_open = True  # the client may still send (no END_STREAM from it yet)
        self.server_open = True  # the server may still send
        self.opened = False  # the request HEADERS went upstream
        self.held: bytes | None = None  # request HEADERS frames waiting for an upstream slot
        self.request_done = False  # END_STREAM handed to the server (or the request abandoned)
        self.response_done = False  # END_STREAM handed to the client (or the stream reset)
        # Send windows: what the client, and the server, still accept on this stream.
        self.client_window = client_window
        self.server_window = server_window
        # Receive windows: what the client, and the server, may still send us.
        self.client_credit = receive_window
        self.server_credit = receive_window
        # Bytes forwarded and not yet credited back to their sender (WINDOW_UPDATE).
        self.client_owed = 0
        self.server_owed = 0
        self.to_server: deque[QueueItem] | None = None
        self.to_client: deque[QueueItem] | None = None
        # content-length (RFC 9113 §8.1.1) and the DATA bytes seen against it
        self.request_length: int | None = None
        self.request_seen = 0
        self.response_length: int | None = None
        self.response_seen = 0
        # The final response status, once its HEADERS went to the client.
        self.status: int | None = None
        self.grpc_status: int | None = None
        self.grpc_in = GrpcCounter() if grpc else None
        self.grpc_out = GrpcCounter() if grpc else None
        self.replied = False
