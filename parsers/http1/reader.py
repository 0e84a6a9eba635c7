"""Incremental HTTP/1.x message reader: one direction of one connection.

``MessageReader.feed(data)`` returns events in wire order:

    Head(head)      a request or response head (``MessageHead``)
    Data(data)      body bytes, de-chunked
    End(trailers)   the message is complete

``feed(b"")`` is end of input. Errors are typed (``parsers.http1.errors``).
The head parser is pluggable (C or pure Python, with or without the memo of
``parsers.http1.memo`` in front); which side the reader reads is the head
parser's. Body framing is this one piece of code for all, and moves slices of
the input: no per-byte loop, and nothing is buffered except an unfinished
head, chunk-size line or trailer.

After a request that asks to switch protocols (Upgrade, CONNECT) the reader
pauses: further bytes are kept, unparsed, until ``resume()`` (the server
said no) or ``take_leftover()`` (the connection became a tunnel). It also
pauses before a message it has no ``budget`` for (the engine's bound on
pipelined requests awaiting an answer), until ``resume()``. A
response reader is told, per response, which request it answers
(``expect``), because HEAD and CONNECT change how a response is framed.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from parsers.http1.errors import (
    AmbiguousFraming,
    DataAfterClose,
    HeadersTooLarge,
    Http1Error,
    IncompleteMessage,
    InvalidChunk,
    MalformedMessage,
)
from parsers.http1.head import (
    FIELD_LINE,
    MessageHead,
    RequestHeadParser,
    ResponseHeadParser,
    explain_line,
    has_bare_cr_or_lf,
)

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:;" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + QUOTED + rb"))?)*)"
)
MAX_CHUNK_SIZE = 2**63 - 1
# Fields that frame or route a message may not arrive late, in a trailer.
FORBIDDEN_TRAILERS = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"trailer", b"connection"}
)


@dataclass(slots=True)
class Head:
    head: MessageHead


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class End:
    trailers: tuple[tuple[bytes, bytes], ...] = ()


Event = Head | Data | End

# The end of a message without trailers, nearly every message's: one shared object.
END = End()


# Reader states (LENGTH to TRAILERS, in this order, are a body: ``reading_body``)
HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, UNTIL_CLOSE, PAUSED, CLOSED, DONE = (
    range(10)
)


class MessageReader:
    """Reads requests (a ``RequestHeadParser``, ``side == "client"``) or responses
    (a ``ResponseHeadParser``, ``side == "server"``)."""

    # Fields a message sets before they are read, or read on rare paths only: class
    # attributes, not stored for each of the two readers of every connection.
    _remaining = 0  # body bytes still to come (LENGTH, CHUNK_DATA)
    _head: MessageHead | None = None  # the message being read (its head)
    standalone = True  # response reader with no request context (corpus runs)

    def __init__(
        self,
        head_parser: RequestHeadParser | ResponseHeadParser,
        *,
        max_head: int = 65536,
        max_chunk_line: int = 4096,
    ) -> None:
        side = self.side = head_parser.side
        self._heads = head_parser
        self._reads_requests = side == "client"
        if self._reads_requests:
            # A request's head is parsed from its bytes alone: the head parser's own
            # ``complete``, with no call of ours around it (one per request).
            # (No ``cast``: a call per reader, and two readers per connection.)
            self._parse_head = head_parser.complete  # type: ignore[method-assign]
        self.max_head = max_head
        self.max_chunk_line = max_chunk_line
        self._state = HEAD
        self._buf = bytearray()  # unfinished head / chunk line / trailers
        # A head ``read_whole`` parsed in bytes that were not one whole message:
        # (those bytes, the head's, the head or its error), for the ``feed`` of the
        # same bytes.
        self._parsed: tuple[bytes, bytes, MessageHead | Http1Error] | None = None
        self._pending = bytearray()  # bytes held while paused
        # For responses: the requests still owed an answer (method, upgrade asked).
        self._requests: deque[tuple[str, bool]] = deque()
        # Messages the reader may still begin before it holds further bytes; None: no bound.
        self.budget: int | None = None
        # Paused before a message for want of ``budget`` (not for an Upgrade), its
        # bytes kept for ``resume()``. (An attribute: the engine reads it per read.)
        self.held = False
        self.switched = False  # a 101 / CONNECT 2xx: the rest is not HTTP

    # ---------------------------------------------------------------- API

    @property
    def reading_head(self) -> bool:
        if not self._buf:  # (most reads end where a message does: one test)
            return False
        return self._state == HEAD

    @property
    def reading_body(self) -> bool:
        """Inside a message body: Content-Length or chunked (chunk lines and
        trailers included), not a body that runs until the connection closes."""
        return LENGTH <= self._state <= TRAILERS

    @property
    def idle(self) -> bool:
        """Between messages (nothing partial buffered)."""
        return self._state in (HEAD, CLOSED, DONE) and not self._buf

    def expect(self, method: str, upgrade: bool) -> None:
        """A response reader: the next unanswered request was ``method``."""
        self.standalone = False
        self._requests.append((method, upgrade))

    def resume(self) -> list[Event]:
        """Continue parsing after a paused Upgrade request was refused, or with new budget."""
        if self._state != PAUSED:
            return []
        self.held = False
        self._state = HEAD if self._head is None or self._head.keep_alive else CLOSED
        pending, self._pending = bytes(self._pending), bytearray()
        return self.feed(pending) if pending else []

    def take_leftover(self) -> bytes:
        """Bytes received after the message that switched protocols."""
        data = bytes(self._pending)
        self._pending = bytearray()
        self._state = DONE
        return data

    def feed(self, data: bytes) -> list[Event]:
        if not data:
            return self._eof()
        state = self._state
        if state == PAUSED:
            self._pending += data
            return []
        if state == DONE:
            return []
        if self._parsed is not None and self._parsed[0] is not data:
            self._parsed = None  # parsed in other bytes: not this head
        events: list[Event] = []
        pos = 0
        end = len(data)
        try:
            while pos < end:
                state = self._state
                if state == LENGTH:
                    n = min(self._remaining, end - pos)
                    events.append(Data(data if n == end else data[pos : pos + n]))
                    pos += n
                    self._remaining -= n
                    if not self._remaining:
                        self._finish(events)
                elif state == HEAD:
                    if self.budget == 0 and not self._buf:
                        self.held = True
                        self._state = PAUSED
                        continue
                    pos = self._read_head(data, pos, events)
                elif state == CHUNK_DATA:
                    n = min(self._remaining, end - pos)
                    events.append(Data(data if n == end else data[pos : pos + n]))
                    pos += n
                    self._remaining -= n
                    if not self._remaining:
                        self._state = CHUNK_CRLF
                elif state == CHUNK_SIZE:
                    pos = self._read_chunk_size(data, pos)
                elif state == CHUNK_CRLF:
                    pos = self._read_chunk_crlf(data, pos)
                elif state == TRAILERS:
                    pos = self._read_trailers(data, pos, events)
                elif state == UNTIL_CLOSE:
                    events.append(Data(data if pos == 0 else data[pos:]))
                    pos = end
                elif state == PAUSED:
                    self._pending += data[pos:]
                    pos = end
                elif state == CLOSED:
                    raise DataAfterClose(
                        "data after the message that closed the connection", side=self.side
                    )
                else:  # DONE
                    pos = end
        except Http1Error as exc:
            exc.events = events  # read before the error
            self._state = DONE
            raise
        except Exception:
            self._state = DONE
            raise
        return events

    # --------------------------------------------------------- internals

    def _eof(self) -> list[Event]:
        state = self._state
        if state == UNTIL_CLOSE:
            self._state = DONE
            return [End()]
        if state in (HEAD, CLOSED, PAUSED, DONE) and not self._buf:
            self._state = DONE
            return []
        self._state = DONE
        raise IncompleteMessage("connection ended inside a message", side=self.side)

    def _read_head(self, data: bytes, pos: int, events: list[Event]) -> int:
        buf = self._buf
        if not buf:
            # Empty lines before a request line are ignored (RFC 9112 2.2).
            while data.startswith(b"\r\n", pos):
                pos += 2
            if pos == len(data):
                return pos
            idx = data.find(b"\r\n\r\n", pos)
            if idx >= 0 and idx + 4 - pos <= self.max_head:
                head = data[pos : idx + 4]
                self._on_head(head, events)
                return idx + 4
            start = 0
            buf += data[pos:]
        else:
            start = len(buf)
            buf += data[pos:]
            if buf.startswith(b"\r\n"):  # a lone CR ended the last input: empty lines
                while buf.startswith(b"\r\n"):
                    del buf[:2]
                    start -= 2
                pos -= start  # ``start`` may now be negative: bytes of data dropped
                start = 0
            idx = buf.find(b"\r\n\r\n", max(0, start - 3))
            if idx >= 0:
                head = bytes(buf[: idx + 4])
                used = idx + 4 - start
                buf.clear()
                if len(head) > self.max_head:
                    raise HeadersTooLarge("header section too large", side=self.side)
                self._on_head(head, events)
                return pos + used
        if len(buf) > self.max_head:
            raise HeadersTooLarge("header section too large", side=self.side)
        if buf == b"\r":
            return len(data)
        self._heads.partial(buf)
        return len(data)

    def read_whole(self, data: bytes) -> MessageHead | None:
        """``data`` read at once when it is one whole message: the reader waits for
        a head and may begin one, and ``data`` is a head and all of the body its
        Content-Length announces (or a head without a body), nothing more. The
        reader then stands where ``feed(data)`` would leave it, and the message's
        head is returned: its events would be ``Head``, its body as one ``Data``
        when it has one, and ``END``. None when ``data`` is anything else, with
        nothing read (``feed`` reads it then, without parsing its head again)."""
        if self._state != HEAD or self._buf or self.budget == 0:
            return None
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or end > self.max_head or data.startswith(b"\r\n"):
            return None
        raw = data if end == len(data) else data[:end]
        try:
            if self._reads_requests:
                msg = self._parse_head(raw)
            else:  # (``_parse_head`` of a response, inline: one per response)
                requests = self._requests
                msg = self._heads.complete(raw, requests[0][0] if requests else "GET")  # type: ignore[call-arg]
        except Http1Error as exc:
            # ``feed`` raises it, as it raises errors. (Not parsed again: after an
            # error, llhttp answers the same bytes with another.)
            self._parsed = (data, raw, exc)
            return None
        framing = msg.framing
        if not (
            (framing == "none" and end == len(data))
            or (framing == "length" and msg.length == len(data) - end)
        ):
            self._parsed = (data, raw, msg)
            return None
        # Most messages: what ``_begin`` and ``_finish_state`` do, inline (one each per
        # message). A request raises nothing there and never switches the reader; a
        # final response to a request other than CONNECT neither.
        if self._reads_requests:
            self._head = msg
            if self.budget is not None:
                self.budget -= 1
            self._state = PAUSED if msg.upgrade else HEAD if msg.keep_alive else CLOSED
            return msg
        requests = self._requests
        if msg.status >= 200 and requests and requests[0][0] != "CONNECT":
            requests.popleft()
            self._head = msg
            if self.budget is not None:
                self.budget -= 1
            self._state = HEAD if msg.keep_alive else CLOSED
            return msg
        try:
            self._begin(msg)
        except Http1Error:
            self._parsed = (data, raw, msg)  # ``feed`` raises it again, as it raises errors
            return None
        self._finish_state(msg)
        return msg

    def _on_head(self, head: bytes, events: list[Event]) -> None:
        parsed = self._parsed
        if parsed is not None:
            self._parsed = None
            if parsed[1] != head:
                msg = self._parse_head(head)
            elif isinstance(parsed[2], Http1Error):
                raise parsed[2]
            else:
                msg = parsed[2]
        else:
            msg = self._parse_head(head)
        self._begin(msg)
        events.append(Head(msg))
        framing = msg.framing
        if framing == "none":
            self._finish(events)
        elif framing == "length":
            self._remaining = msg.length
            self._state = LENGTH
        elif framing == "chunked":
            self._state = CHUNK_SIZE
        else:
            self._state = UNTIL_CLOSE

    def _parse_head(self, head: bytes) -> MessageHead:
        """A response head, with the method of the request it answers (a request
        reader has its head parser's ``complete`` here instead)."""
        method = self._requests[0][0] if self._requests else "GET"
        return self._heads.complete(head, method)  # type: ignore[call-arg]

    def _begin(self, msg: MessageHead) -> None:
        """The bookkeeping of a head read, before its body."""
        if not self._reads_requests:
            method, upgrade = self._requests[0] if self._requests else ("GET", True)
            if msg.status == 101 or (method == "CONNECT" and 200 <= msg.status < 300):
                if not upgrade and not self.standalone:
                    raise MalformedMessage(
                        "101 without an Upgrade request", code="unexpected_101", side="server"
                    )
                self.switched = True
            elif msg.status >= 200 and self._requests:
                self._requests.popleft()
        self._head = msg
        if self.budget is not None:
            self.budget -= 1

    def _finish(self, events: list[Event], trailers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        events.append(End(trailers) if trailers else END)
        msg = self._head
        assert msg is not None  # a message ends after its head
        self._finish_state(msg)

    def _finish_state(self, msg: MessageHead) -> None:
        if self.switched:
            self._state = PAUSED
        elif self._reads_requests:
            self._state = PAUSED if msg.upgrade else HEAD if msg.keep_alive else CLOSED
        elif msg.status < 200:
            self._state = HEAD
        else:
            self._state = HEAD if msg.keep_alive else CLOSED

    def _line(self, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int]:
        """One CRLF-terminated line from the buffer plus ``data``, or None."""
        buf = self._buf
        if buf:
            start = len(buf)
            buf += data[pos:]
            idx = buf.find(b"\r\n", max(0, start - 1))
            if idx < 0:
                self._check_partial_line(buf, limit)
                return None, len(data)
            line = bytes(buf[:idx])
            buf.clear()
            return line, pos + idx + 2 - start
        idx = data.find(b"\r\n", pos)
        if idx < 0:
            buf += data[pos:]
            self._check_partial_line(buf, limit)
            return None, len(data)
        return data[pos:idx], idx + 2

    def _check_partial_line(self, buf: bytearray, limit: int) -> None:
        if len(buf) - buf.endswith(b"\r") > limit:  # a last CR may be half the CRLF
            raise InvalidChunk("chunk line too long", side=self.side)
        if b"\n" in buf or has_bare_cr_or_lf(buf):
            raise InvalidChunk("bare CR or LF in chunk line", side=self.side)

    def _read_chunk_size(self, data: bytes, pos: int) -> int:
        line, pos = self._line(data, pos, self.max_chunk_line)
        if line is None:
            return pos
        if len(line) > self.max_chunk_line:  # also when the line came whole
            raise InvalidChunk("chunk line too long", side=self.side)
        match = CHUNK_LINE.fullmatch(line)
        if match is None:
            raise InvalidChunk("invalid chunk size line", side=self.side)
        digits = match.group(1)
        if len(digits) > 16 and int(digits, 16) > MAX_CHUNK_SIZE:
            raise InvalidChunk("chunk size overflows", code="chunk_overflow", side=self.side)
        size = int(digits, 16)
        if size > MAX_CHUNK_SIZE:
            raise InvalidChunk("chunk size overflows", code="chunk_overflow", side=self.side)
        if size:
            self._remaining = size
            self._state = CHUNK_DATA
        else:
            self._state = TRAILERS
        return pos

    def _read_chunk_crlf(self, data: bytes, pos: int) -> int:
        need = 2 - len(self._buf)
        got = data[pos : pos + need]
        self._buf += got
        if len(self._buf) < 2:
            if self._buf != b"\r":
                raise InvalidChunk("chunk data not followed by CRLF", side=self.side)
            return pos + len(got)
        if self._buf != b"\r\n":
            raise InvalidChunk("chunk data not followed by CRLF", side=self.side)
        self._buf.clear()
        self._state = CHUNK_SIZE
        return pos + len(got)

    def _read_trailers(self, data: bytes, pos: int, events: list[Event]) -> int:
        buf = self._buf
        start = len(buf)
        buf += data[pos:]
        if buf.startswith(b"\r\n"):
            buf.clear()
            self._finish(events)
            return pos + 2 - start
        idx = buf.find(b"\r\n\r\n", max(0, start - 3))
        if idx < 0:
            if len(buf) > self.max_head:
                raise HeadersTooLarge("trailer section too large", side=self.side)
            if has_bare_cr_or_lf(buf):
                raise InvalidChunk("bare CR or LF in trailer section", side=self.side)
            return len(data)
        if idx + 4 > self.max_head:
            raise HeadersTooLarge("trailer section too large", side=self.side)
        block = bytes(buf[:idx])
        buf.clear()
        trailers = []
        for line in block.split(b"\r\n"):
            match = FIELD_LINE.fullmatch(line)
            if match is None:
                err = explain_line(line, self.side, "trailer")
                raise InvalidChunk(
                    f"invalid trailer: {err}", code="invalid_trailer", side=self.side
                )
            name, value = match.groups()
            if name.lower() in FORBIDDEN_TRAILERS:
                raise AmbiguousFraming(
                    f"{name.decode()} in a trailer", code="forbidden_trailer", side=self.side
                )
            trailers.append((name, value))
        self._finish(events, tuple(trailers))
        return pos + idx + 4 - start
