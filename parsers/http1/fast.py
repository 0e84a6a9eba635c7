"""The C head parser: llhttp (strict mode) through ``httptools``.

Same contract as ``parsers.http1.head.PyRequestHead``/``PyResponseHead``.
llhttp reads the start line and the field lines and checks every byte; the
few places where llhttp is laxer than this project's rules (double spaces
in the request line, RTSP/ICE protocols, HTTP/0.9, trailing whitespace in
values) get a cheap check on the head bytes here, and the framing rules are
the shared ``frame_request``/``frame_response``. A fresh llhttp parser per
head costs well under a microsecond, and bodies never go through it: body
framing is shared Python code that only slices.
"""

from __future__ import annotations

import re
from typing import Generic, Literal, TypeVar

import httptools
from httptools.parser import errors as ht_errors

from parsers.http1.errors import AmbiguousFraming, Http1Error, MalformedMessage
from parsers.http1.head import (
    FIELD_VALUE_CHARS,
    KNOWN_METHODS,
    STATUS_PREFIX,
    MessageHead,
    StartLineWatch,
    explain_line,
    frame_request,
    frame_response,
    new_message_head,
)

_OWS = b" \t"
REASON = re.compile(FIELD_VALUE_CHARS + rb"*")


def _translate(exc: Exception, side: str, head: bytes | bytearray) -> Http1Error:
    """Map an llhttp error onto the shared typed errors."""
    text = str(exc)
    if isinstance(exc, ht_errors.HttpParserInvalidMethodError):
        return MalformedMessage("invalid method", code="invalid_method", side=side)
    if isinstance(exc, ht_errors.HttpParserInvalidURLError):
        return MalformedMessage("invalid request target", code="invalid_target", side=side)
    if isinstance(exc, ht_errors.HttpParserInvalidStatusError):
        return MalformedMessage("invalid status line", code="invalid_status_line", side=side)
    if "Content-Length" in text or "Transfer-Encoding" in text:
        return AmbiguousFraming(text, code="framing", side=side)
    # Reuse the Python explanation of the first bad line for a precise code.
    for line in bytes(head).split(b"\r\n")[1:]:
        if line and (line[:1] in _OWS or b"\r" in line or b"\n" in line or b":" not in line):
            return explain_line(line, side)
    return MalformedMessage(text or "malformed message", code="llhttp", side=side)


LLHTTP = TypeVar("LLHTTP", httptools.HttpRequestParser, httptools.HttpResponseParser)


class _Collected:
    """What llhttp's callbacks collect of one head. A parser holds its callbacks'
    object, so that object must not hold the parser: the pair would be a
    reference cycle, freed only by the cyclic collector, long after its connection."""

    __slots__ = ("url", "headers", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.rstrip(_OWS)))

    def on_headers_complete(self) -> None:
        self.done = True


class _CHead(Generic[LLHTTP]):
    side: Literal["client", "server"] = "client"
    parser_class: type[LLHTTP]

    def __init__(self) -> None:
        self._watch = StartLineWatch()
        self._line_done = False
        self._parser: LLHTTP | None = None  # made on the first bytes of a head
        self._fed = 0
        self._got = _Collected()

    def reset(self) -> None:
        self._watch.reset()
        self._line_done = False
        self._parser = None
        self._fed = 0
        self._got = _Collected()

    def _feed(self, buf: bytes | bytearray) -> LLHTTP:
        """Give llhttp the bytes of ``buf`` it has not seen yet."""
        if buf[:1] in (b"\r", b"\n"):
            # llhttp skips stray CR/LF before a message; the reader has
            # already dropped whole empty lines, so this one is bare.
            raise MalformedMessage(
                "bare CR or LF before the start line", code="bare_cr", side=self.side
            )
        parser = self._parser
        if parser is None:
            parser = self._parser = self.parser_class(self._got)
        if len(buf) > self._fed:
            chunk = bytes(buf[self._fed :])
            self._fed = len(buf)
            try:
                parser.feed_data(chunk)
            except ht_errors.HttpParserUpgrade:
                pass  # llhttp pauses after an Upgrade/CONNECT head: the head is fine
            except ht_errors.HttpParserError as exc:
                # The response parser reports the same pause as an error.
                if not (self._got.done and str(exc).startswith("Pause on CONNECT/Upgrade")):
                    raise _translate(exc, self.side, buf) from None
        return parser

    def partial(self, buf: bytes | bytearray) -> None:
        self._feed(buf)
        if self.side == "client" and not self._line_done:
            eol = buf.find(b"\r\n", max(0, self._watch.checked - 1))
            self._line_done = eol >= 0
            self._watch.check(buf, eol if eol >= 0 else len(buf))

    def _finish(self, head: bytes) -> LLHTTP:
        parser = self._feed(head)
        if not self._got.done:  # pragma: no cover - llhttp always completes a CRLFCRLF head
            raise MalformedMessage("incomplete head", side=self.side)
        return parser


class CRequestHead(_CHead[httptools.HttpRequestParser]):
    side: Literal["client"] = "client"
    parser_class = httptools.HttpRequestParser

    def complete(self, head: bytes) -> MessageHead:
        parser = self._finish(head)
        line = head[: head.find(b"\r\n")]
        method = parser.get_method()
        # llhttp tolerates repeated spaces, RTSP/ICE and HTTP/0.9 request lines.
        if line.count(b" ") != 2 or not line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
            raise MalformedMessage("invalid request line", code="invalid_request_line")
        if method not in KNOWN_METHODS:
            raise MalformedMessage("unknown method", code="invalid_method")
        msg = new_message_head(
            method=method.decode("ascii"),
            target=self._got.url.decode("ascii"),
            version=parser.get_http_version(),
            headers=self._got.headers,
            size=len(head),
        )
        self.reset()
        return frame_request(msg)


class CResponseHead(_CHead[httptools.HttpResponseParser]):
    side: Literal["server"] = "server"
    parser_class = httptools.HttpResponseParser

    def partial(self, buf: bytes | bytearray) -> None:
        self._feed(buf)
        if not self._line_done:
            # llhttp waits for more bytes where the status line can no longer
            # become valid; refuse at the same byte as the Python parser.
            eol = buf.find(b"\r\n")
            self._line_done = eol >= 0
            end = eol if eol >= 0 else len(buf)
            if end <= 1024 and STATUS_PREFIX.fullmatch(buf, 0, end) is None and eol < 0:
                raise MalformedMessage(
                    "invalid status line", code="invalid_status_line", side="server"
                )

    def complete(self, head: bytes, request_method: str = "GET") -> MessageHead:
        parser = self._finish(head)
        line = head[: head.find(b"\r\n")]
        if not line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
            raise MalformedMessage("invalid status line", code="invalid_status_line", side="server")
        reason = line[13:]
        if REASON.fullmatch(reason) is None:  # llhttp lets CTLs through in a reason phrase
            raise MalformedMessage("control character in reason phrase", code="ctl", side="server")
        msg = new_message_head(
            status=parser.get_status_code(),
            reason=reason.decode("latin-1"),
            version=parser.get_http_version(),
            headers=self._got.headers,
            size=len(head),
        )
        self.reset()
        return frame_response(msg, request_method)
