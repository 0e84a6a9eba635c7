"""Flood budgets for one HTTP/2 client connection, and the turns that bound one read's work.

The engine processes the client's input in *turns*: at most a number of frames,
and of payload bytes of frames other than DATA, per turn
(``H2Limits.frames_per_turn`` and ``bytes_per_turn``). A turn always ends on a
frame boundary and holds at least one frame; the rest waits for the next turn of
the event loop (``parsers.base.Yield``). Payload bytes are counted because a
header block costs by its size (HPACK decoding and validation in pure Python).

Every whole frame's header is shown to the ``FloodGuard`` before the frame is
processed, so a budget counted in the client's frames is enforced at the exact
frame that exceeds it: the frames before it are processed, that one and the
rest are not, and the GOAWAY names the last stream processed. The RST_STREAM
frames the proxy sends are counted after the turn that made them, so a budget
they exhaust is enforced at most one turn late.

No clock: the windows are counted in the client's own traffic.

* **Resets** are a bucket of ``max_stream_resets`` (nghttp2's stream-reset
  burst, 1000) that fills by one for each RST_STREAM on the client connection
  the client caused (its own, and ours answering a denied, refused or malformed
  stream) and empties by one for each stream that completes without a reset;
  past the brim, the connection ends. The client's reset of a stream whose
  response has begun cancels a response it no longer wants, not a request it
  never meant: it is not counted (haproxy's glitch is likewise an RST_STREAM
  that comes before the application started on the stream). nghttp2 gives its
  tokens back with the clock (33 a second); giving them back per completed
  stream needs no time and is Envoy's premature-reset rule in another form (a
  connection whose streams are mostly reset is closed): a client may reset
  half its streams for ever, and no more than the burst beyond that.
* **PING, SETTINGS and control frames owed** are counted per *round trip*: once
  a count reaches half its limit, the proxy sends the client a PING of its own,
  and when the client acknowledges it (so it has read everything sent before
  that PING) the counts start again. A client that keeps a
  connection open with a PING every few seconds never comes near a limit; one
  that sends PINGs or SETTINGS faster than it reads the answers, or does not
  read at all (so the acknowledgements it is owed pile up, as nghttp2's
  ``max_outbound_ack`` and Envoy's ``max_outbound_control_frames`` bound them),
  reaches it within one round trip. A rate in frames per second would need
  the driver's clock in every call, and would either let a flood through at
  the rate allowed or cut a legitimate burst; round trips are what the client
  controls, so they are what it is held to.

Exceeding a budget is a ``FloodError``: the
answer is GOAWAY(ENHANCE_YOUR_CALM) and a close, as nghttp2 and Envoy do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from parsers.http2.frames import ACK, PING, RST_STREAM, SETTINGS

# The client frame types ``FloodGuard.inbound`` counts: for any other it has
# nothing to say, and need not be asked.
GUARDED_FRAMES = frozenset({PING, SETTINGS, RST_STREAM})


class FloodError(Exception):
    """A flood budget ran out; ``limit`` is the name of its ``H2Limits`` field."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class ClientStream(Protocol):
    """What the guard reads of the engine's client streams."""

    status: int | None  # the response's status, once its HEADERS went to the client


class FloodGuard:
    """The budgets of one client connection (see the module docstring).

    ``streams`` is the engine's own map of client streams, read to tell the
    reset of a stream whose response has begun (a map, not a callback into the
    engine: the guard holds no reference back to it, so no cycle). The engine
    tells it about each inbound frame header (``inbound``), the RST_STREAM
    frames it has sent (``sync``), each stream that completed without a reset
    (``stream_completed``) and each PING acknowledgement (``acknowledged``); it
    says when to send a round-trip PING (``barrier_due``, ``open_barrier``).
    """

    __slots__ = (
        "max_stream_resets",
        "max_ping_frames",
        "max_settings_frames",
        "max_outbound_control_frames",
        "reset_debt",
        "_streams",
        "_pings",
        "_settings",
        "_sent",
        "_charged",
        "_window",
        "_barrier",
        "_barriers",
    )

    def __init__(
        self,
        *,
        max_stream_resets: int,
        max_ping_frames: int,
        max_settings_frames: int,
        max_outbound_control_frames: int,
        streams: Mapping[int, ClientStream],
    ) -> None:
        self.max_stream_resets = max_stream_resets
        self.max_ping_frames = max_ping_frames
        self.max_settings_frames = max_settings_frames
        self.max_outbound_control_frames = max_outbound_control_frames
        self.reset_debt = 0  # client-caused resets not yet offset by completed streams
        self._streams = streams
        # Totals since the connection began: PING and SETTINGS frames received
        # (each owed an acknowledgement), RST_STREAM frames sent (all of them),
        # and those of them the client caused.
        self._pings = 0
        self._settings = 0
        self._sent = 0
        self._charged = 0
        # The totals when the current round trip began, and the PING that will end it.
        self._window = (0, 0, 0)
        self._barrier: bytes | None = None
        self._barriers = 0

    # ------------------------------------------------------------ inbound

    def inbound(self, frame_type: int, flags: int, stream_id: int) -> FloodError | None:
        """A frame header from the client, before the engine processes the frame
        (only those of ``GUARDED_FRAMES`` types need be shown)."""
        if frame_type == PING:
            if flags & ACK:
                return None
            self._pings += 1
            pings = self._pings - self._window[0]
            if pings > self.max_ping_frames:
                return FloodError(
                    "max_ping_frames",
                    f"{pings} PING frames in one round trip (limit {self.max_ping_frames})",
                )
            return self._check_control()
        if frame_type == SETTINGS:
            if flags & ACK:
                return None
            self._settings += 1
            settings = self._settings - self._window[1]
            if settings > self.max_settings_frames:
                return FloodError(
                    "max_settings_frames",
                    f"{settings} SETTINGS frames in one round trip "
                    f"(limit {self.max_settings_frames})",
                )
            return self._check_control()
        if frame_type == RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is None or stream.status is None:  # no response begun
                self.reset_debt += 1
                return self._check_resets()
        return None

    # ------------------------------------------------------------ what the engine did

    def sync(self, sent: int, charged: int) -> FloodError | None:
        """``sent`` RST_STREAM frames toward the client so far, ``charged`` of
        them caused by the client (a denial, a refusal, a malformed stream)."""
        self.reset_debt += charged - self._charged
        self._charged = charged
        self._sent = sent
        return self._check_resets() or self._check_control()

    def stream_completed(self) -> None:
        """A client stream ended both ways without a reset."""
        if self.reset_debt:
            self.reset_debt -= 1

    # ------------------------------------------------------------ round trips

    def barrier_due(self) -> bool:
        """True when a count has reached half its limit and no round-trip PING is out."""
        if self._barrier is not None:
            return False
        pings, settings, control = self._counts()
        return (
            pings >= max(1, self.max_ping_frames // 2)
            or settings >= max(1, self.max_settings_frames // 2)
            or control >= max(1, self.max_outbound_control_frames // 2)
        )

    def open_barrier(self) -> bytes:
        """The opaque data of the round-trip PING to send now."""
        self._barriers += 1
        self._barrier = b"l7p" + self._barriers.to_bytes(5, "big")
        return self._barrier

    def acknowledged(self, opaque: bytes) -> None:
        """The client acknowledged a PING: if ours, a round trip is over."""
        if opaque == self._barrier:
            self._window = (self._pings, self._settings, self._sent)
            self._barrier = None

    # ------------------------------------------------------------ checks

    def _counts(self) -> tuple[int, int, int]:
        p0, s0, r0 = self._window
        pings, settings = self._pings - p0, self._settings - s0
        return pings, settings, pings + settings + self._sent - r0

    def _check_resets(self) -> FloodError | None:
        if self.reset_debt > self.max_stream_resets:
            return FloodError(
                "max_stream_resets",
                f"{self.reset_debt} streams reset beyond those completed "
                f"(limit {self.max_stream_resets})",
            )
        return None

    def _check_control(self) -> FloodError | None:
        control = self._counts()[2]
        if control > self.max_outbound_control_frames:
            return FloodError(
                "max_outbound_control_frames",
                f"{control} control frames (PING and SETTINGS acknowledgements, RST_STREAM) "
                f"sent and not yet read by the client (limit {self.max_outbound_control_frames})",
            )
        return None
