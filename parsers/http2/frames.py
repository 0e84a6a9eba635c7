"""HTTP/2 framing (RFC 9113 §4 and §6): frame headers, the frames the relay
writes itself, and SETTINGS payloads.

The relay forwards most frames as they arrived; these are the few it builds:
its own SETTINGS, acknowledgements, WINDOW_UPDATE, RST_STREAM, GOAWAY, and the
HEADERS and DATA of an answer it gives itself (a denial, a 431).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from h2.errors import ErrorCodes

FRAME_HEADER_LENGTH = 9
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Setting identifiers (RFC 9113 §6.5.2)
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE_LIMIT = 2**24 - 1
UNLIMITED = 2**31 - 1  # SETTINGS_MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE unset


class ConnectionError_(Exception):  # noqa: N801 - not the builtin OSError subclass
    """A connection error (RFC 9113 §5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((frame_type, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


# A whole header block's HEADERS frame: its type and flags, with and without END_STREAM.
_HEADERS_WHOLE = bytes((HEADERS, END_HEADERS))
_HEADERS_ENDING = bytes((HEADERS, END_HEADERS | END_STREAM))


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame_size: int) -> bytes:
    """A header block as HEADERS and, past ``max_frame_size``, CONTINUATION frames."""
    size = len(block)
    if size <= max_frame_size:  # one frame (every request the relay passes on, nearly)
        return (
            size.to_bytes(3, "big")
            + (_HEADERS_ENDING if end_stream else _HEADERS_WHOLE)
            + stream_id.to_bytes(4, "big")
            + block
        )
    first, rest = block[:max_frame_size], block[max_frame_size:]
    flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
    out = [frame(HEADERS, flags, stream_id, first)]
    while rest:
        piece, rest = rest[:max_frame_size], rest[max_frame_size:]
        out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece))
    return b"".join(out)


def settings_frame(values: Mapping[int, int]) -> bytes:
    payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())
    return frame(SETTINGS, 0, 0, payload)


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, int(code).to_bytes(4, "big"))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    payload = last_stream_id.to_bytes(4, "big") + int(code).to_bytes(4, "big") + debug
    return frame(GOAWAY, 0, 0, payload)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS payload, each value checked
    as RFC 9113 §6.5.2 asks (``ConnectionError_`` otherwise)."""
    if len(payload) % 6:
        raise ConnectionError_(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = []
    for pos in range(0, len(payload), 6):
        key = int.from_bytes(payload[pos : pos + 2], "big")
        value = int.from_bytes(payload[pos + 2 : pos + 6], "big")
        if key == ENABLE_PUSH and value > 1:
            raise ConnectionError_(ErrorCodes.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        if key == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionError_(ErrorCodes.FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
        if key == MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
            raise ConnectionError_(ErrorCodes.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
        pairs.append((key, value))
    return pairs


def decode_settings_header(value: bytes) -> list[tuple[int, int]]:
    """The ``HTTP2-Settings`` header of an h2c upgrade (base64url SETTINGS payload)."""
    try:
        raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    except ValueError as exc:
        raise ConnectionError_(ErrorCodes.PROTOCOL_ERROR, f"HTTP2-Settings: {exc}") from exc
    return parse_settings(raw)


# Reset codes that say something about the stream itself travel on; codes
# that blame the sender's framing concern only the hop where they happened.
END_TO_END_CODES = frozenset(
    {
        ErrorCodes.NO_ERROR,
        ErrorCodes.CANCEL,
        ErrorCodes.REFUSED_STREAM,
        ErrorCodes.ENHANCE_YOUR_CALM,
        ErrorCodes.INTERNAL_ERROR,
        ErrorCodes.HTTP_1_1_REQUIRED,
    }
)


def relayed_code(code: int) -> int:
    return code if code in END_TO_END_CODES else ErrorCodes.CANCEL


def code_name(code: int | None) -> str:
    if code is None:
        return "None"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
