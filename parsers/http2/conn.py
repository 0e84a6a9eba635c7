"""The two h2 connection objects of the relay, configured for proxying.

h2 treats GOAWAY, sent or received, as the end of the connection: any frame
after it is a protocol error. RFC 9113 §6.8 wants a graceful GOAWAY (NO_ERROR)
to let in-flight streams finish, which a proxy must honour in both directions
(gRPC servers send one on every graceful shutdown). ``RelayConnection``
keeps the connection open after a NO_ERROR GOAWAY; the engine itself refuses
new streams from then on. It also turns a content-length mismatch, which h2
treats as a connection error, into the stream error RFC 9113 asks for.
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from h2.exceptions import FrameTooLargeError, InvalidBodyLengthError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)


class MalformedStream(Event):
    """A message whose body contradicts its content-length (RFC 9113 §8.1.1).

    h2 raises that as a connection error; it is a stream error. The stream has
    already been reset with PROTOCOL_ERROR when this event is delivered.
    """

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


# What h2's frame handlers return: frames to send, events to deliver.
_Received: TypeAlias = tuple[list[Frame], list[Event]]


class _Handler:
    """One entry of h2's frame dispatch table, holding its connection weakly."""

    __slots__ = ("_method", "_connection")

    def __init__(self, method: Callable[[Any, Frame], _Received], connection: H2Connection):
        self._method = method
        self._connection = weakref.ref(connection)

    def __call__(self, frame: Frame) -> _Received:
        return self._method(self._connection(), frame)


class RelayConnection(H2Connection):
    peer_going_away = False
    # Frames received whole and handled; a header block counts once, when it ends
    # (h2 holds HEADERS and CONTINUATION frames back until END_HEADERS).
    frames_received = 0

    def __init__(self, config: H2Configuration | None = None) -> None:
        super().__init__(config)
        # h2 keeps the connection's own bound methods in a table on the connection:
        # a reference cycle, which only the cyclic collector frees, long after the
        # connection ends. The same handlers, holding the connection weakly, are not.
        self._frame_dispatch_table = {
            frame_type: _Handler(getattr(type(self), handler.__name__), self)
            for frame_type, handler in self._frame_dispatch_table.items()
        }

    def _receive_frame(self, frame: Frame) -> list[Event]:
        self.frames_received += 1
        return super()._receive_frame(frame)

    # RST_STREAM frames queued toward the peer, whoever decided them (the engine,
    # or h2 answering a frame on a closed stream): the flood budgets count them.
    resets_sent = 0

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        for frame in frames:
            if type(frame) is RstStreamFrame:
                self.resets_sent += 1
        super()._prepare_for_sending(frames)

    def _receive_data_frame(self, frame: DataFrame) -> _Received:
        try:
            return super()._receive_data_frame(frame)
        except InvalidBodyLengthError as exc:
            self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
            # The bytes were counted against the connection window: give them back.
            self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return [], [MalformedStream(frame.stream_id, str(exc))]

    _admit_over_limit = False

    @property
    def open_inbound_streams(self) -> int:
        return 0 if self._admit_over_limit else super().open_inbound_streams

    def _receive_headers_frame(self, frame: HeadersFrame) -> _Received:
        try:
            return super()._receive_headers_frame(frame)
        except TooManyStreamsError:
            # RFC 9113 §5.1.2: a stream over our SETTINGS_MAX_CONCURRENT_STREAMS is
            # a stream error. h2 checks before decoding, so process the block
            # normally (HPACK state stays in step), then refuse the stream; the
            # engine never sees the request. REFUSED_STREAM is safe to retry.
            self._admit_over_limit = True
            try:
                frames, events = super()._receive_headers_frame(frame)
            finally:
                self._admit_over_limit = False
            self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
            return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]
        except InvalidBodyLengthError as exc:
            # The header block was decoded before the check: HPACK state is intact.
            self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return [], [MalformedStream(frame.stream_id, str(exc))]

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> _Received:
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        self.peer_going_away = True
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_graceful_goaway(self, last_stream_id: int) -> None:
        """GOAWAY(NO_ERROR) without giving up the streams in flight."""
        self._prepare_for_sending(
            [GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=0)]
        )


def relay_connection(*, client_side: bool) -> RelayConnection:
    # Header validation is ours (parsers.http2.headers) so that a malformed
    # section is a stream error, not a connection error; headers are
    # forwarded as received (bytes, no normalisation) and were validated on
    # the way in, so outbound checks would only cost time.
    config = H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    return RelayConnection(config=config)


def decode_settings_header(value: bytes) -> dict[int, int]:
    """The ``HTTP2-Settings`` header of an h2c upgrade (base64url SETTINGS payload)."""
    raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    frame = SettingsFrame(0)
    frame.parse_body(memoryview(raw))
    return dict(frame.settings)


def settings(client_side: bool, values: Mapping[int, int]) -> Settings:
    known = {code.value for code in SettingCodes}
    return Settings(
        client=client_side,
        initial_values={SettingCodes(k): v for k, v in values.items() if k in known},
    )


# Reset codes that say something about the stream itself travel on; codes
# that blame the sender's framing concern only the hop where they happened.
END_TO_END_CODES = {
    ErrorCodes.NO_ERROR,
    ErrorCodes.CANCEL,
    ErrorCodes.REFUSED_STREAM,
    ErrorCodes.ENHANCE_YOUR_CALM,
    ErrorCodes.INTERNAL_ERROR,
    ErrorCodes.HTTP_1_1_REQUIRED,
}


def relayed_code(code: ErrorCodes | int) -> ErrorCodes | int:
    return code if code in END_TO_END_CODES else ErrorCodes.CANCEL


def check_announced_length(conn: RelayConnection) -> None:
    """FRAME_SIZE_ERROR as soon as an oversized frame's header is in, not after its body.

    h2 validates a frame's length only once the whole frame is buffered, so a
    peer announcing 16 MiB would make us hold 16 MiB first. Reads h2's frame
    buffer (h2 is pinned); O(1) per call.
    """
    pending = conn.incoming_buffer._data
    if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > conn.max_inbound_frame_size:
        conn.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
        raise FrameTooLargeError(f"frame of {int.from_bytes(pending[:3], 'big')} bytes announced")


def code_name(code: int | None) -> str:
    if code is None:  # h2 leaves a ConnectionTerminated's code unset until it is known
        return "None"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
