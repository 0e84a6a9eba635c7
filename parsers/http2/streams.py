"""Per-stream state of the HTTP/2 relay, and gRPC message counting.

A stream has the same id on both hops. Each direction has a queue of what one
peer sent that the other peer's flow-control windows have not yet accepted.

The window a sender gets follows its receiver's (docs/http2-grpc.md, "Flow
control"): over a flow's life the sender is granted B (the relay's own buffer,
``H2Limits.stream_window``) plus the receiver's initial window plus every
WINDOW_UPDATE the receiver sends, passed on in batches. So at any time

    what the sender may still send + what the relay holds + credit due = B + W

where W is what the receiver still accepts. A fast receiver gets a pipe as deep
as its own window; a stalled one (W = 0) costs the relay B at most. The same
holds per connection with ``H2Limits.connection_window``, and there what the
sender may still send plus what the relay holds never passes
``H2Limits.connection_window_cap``, whatever the receiver grants.
"""

from __future__ import annotations

from collections import deque
from typing import Any, TypeAlias

from parsers.http2.frames import DEFAULT_MAX_FRAME_SIZE, DEFAULT_WINDOW

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

    __slots__ = ("messages", "skip", "_prefix")

    def __init__(self) -> None:
        self.messages = 0
        # Payload bytes of the current message still to pass: a frame within
        # them starts and ends no message, and may be counted by taking its
        # length off here without a call to ``feed``.
        self.skip = 0
        self._prefix = b""  # partial 5-byte prefix carried across frames

    def feed(self, data: bytes | memoryview) -> None:
        pos, size = 0, len(data)
        if not self.skip and not self._prefix and size > 5:
            # The frame begins a message: most often (a unary call) it holds
            # exactly that message, which is counted without the loop below.
            length = int.from_bytes(data[1:5], "big")
            if length == size - 5:
                self.messages += 1
                return
        while pos < size:
            if self.skip:
                step = min(self.skip, size - pos)
                self.skip -= step
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
            self.skip = length


class Hop:
    """One peer's connection, as the relay sees it: what the peer accepts from us
    and what we accept from it, connection-wide, and what is to be written to it."""

    __slots__ = (
        "window",
        "initial",
        "advertised",
        "max_frame",
        "credit",
        "owed",
        "held",
        "out",
        "blocked",
    )

    def __init__(self) -> None:
        self.window = DEFAULT_WINDOW  # what the peer's connection window still accepts
        self.initial = DEFAULT_WINDOW  # its SETTINGS_INITIAL_WINDOW_SIZE: new streams' window
        # Ours toward it, as it applies it: what it may send on a new stream.
        self.advertised = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME_SIZE  # its SETTINGS_MAX_FRAME_SIZE
        self.credit = DEFAULT_WINDOW  # what it may still send us, connection-wide
        # Connection credit due to it and not yet sent (WINDOW_UPDATE in batches):
        # the other peer's updates and bytes the relay dropped; below 0, a debt
        # (bytes the relay wrote itself into the other peer's window).
        self.owed = 0
        self.held = 0  # bytes it sent that wait in the relay's queues (with padding)
        self.out: list[Any] = []  # bytes and memoryviews for it, joined once per call
        self.blocked: dict[int, Stream] = {}  # streams whose queue toward it waits for window


class Flow:
    """One direction of a stream: the request (client to server) or the response."""

    __slots__ = ("open", "done", "window", "credit", "owed", "queue", "length", "seen", "grpc")

    def __init__(self, window: int, credit: int, owed: int, grpc: bool) -> None:
        self.open = True  # the sender may still send (no END_STREAM from it yet)
        self.done = False  # END_STREAM handed to the receiver (or the flow abandoned)
        self.window = window  # what the receiver still accepts on this stream
        self.credit = credit  # what the sender may still send us on this stream
        # Stream credit due to the sender and not yet sent: the receiver's updates
        # (its initial window, for a request); below 0, a debt (its window shrank).
        self.owed = owed
        self.queue: deque[QueueItem] | None = None  # what waits for the receiver's window
        self.length: int | None = None  # content-length (RFC 9113 §8.1.1)
        self.seen = 0  # DATA bytes seen against it
        self.grpc = GrpcCounter() if grpc else None


class Stream:
    """One client stream and, once allowed and opened, its upstream twin (same id)."""

    __slots__ = ("sid", "request", "response", "opened", "held", "status", "grpc_status", "replied")

    def __init__(self, sid: int, request: Flow, response: Flow) -> None:
        self.sid = sid
        self.request = request
        self.response = response
        self.opened = False  # the request HEADERS went upstream
        self.held: bytes | None = None  # request HEADERS frames waiting for an upstream slot
        # The final response status, once its HEADERS went to the client.
        self.status: int | None = None
        self.grpc_status: int | None = None
        self.replied = False
