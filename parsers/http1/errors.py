"""Typed HTTP/1.x errors, shared by the C and the pure-Python parser.

Every error names what was wrong (``code``) and carries the answer due to
the peer that sent the bad bytes: a 400/431 to a client. A server that sends
garbage gets no answer; the engine tells the client with a 502 instead, so
errors raised while reading responses carry an empty ``wire_reply``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from parsers.base import ProtocolError

if TYPE_CHECKING:  # the reader raises these errors: import its events for types only
    from parsers.http1.reader import Event

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}


def simple_response(status: int, body: bytes, *, close: bool) -> bytes:
    """A small complete text/plain response (our own answers: 400, 403, 408, 431, 502)."""
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return head.encode("ascii") + b"\r\n" + body


class Http1Error(ProtocolError):
    """Base of every HTTP/1.x parse error. ``status`` is the reply status
    owed to a client (``None`` for errors in a server's response)."""

    default_status = 400
    default_code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, side: str = "client"):
        status = self.default_status if side == "client" else None
        reply = b""
        if status is not None:
            reply = simple_response(status, REASONS[status].encode("ascii"), close=True)
        super().__init__(message, code=code or self.default_code, wire_reply=reply)
        self.status = status
        self.side = side
        # Events a reader produced from the same input before the error
        # (earlier pipelined messages); set by ``MessageReader.feed``.
        self.events: list[Event] = []


class MalformedMessage(Http1Error):
    """Bytes that do not follow the message grammar (start line, fields, CTLs)."""

    default_code = "malformed"


class AmbiguousFraming(Http1Error):
    """Framing headers that two parsers could read differently (smuggling)."""

    default_code = "ambiguous_framing"


class InvalidChunk(Http1Error):
    """Bad chunk size, extension, line ending or trailer section."""

    default_code = "invalid_chunk"


class HeadersTooLarge(Http1Error):
    default_status = 431
    default_code = "headers_too_large"


class DataAfterClose(Http1Error):
    """Bytes after a message that ended the connection (``Connection: close``)."""

    default_code = "data_after_close"


class IncompleteMessage(Http1Error):
    """End of input in the middle of a message."""

    default_code = "incomplete"
