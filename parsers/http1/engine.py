"""HTTP/1.1 engine: one client connection, judged request by request.

    engine = Http1Engine(decide)
    engine.client_data(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    # -> [Access(HttpRequest(...), Decision(...), key=0),
    #     ToServer(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")]

Requests are forwarded re-serialised in one canonical framing (one
Content-Length or ``Transfer-Encoding: chunked``), so the server can never
read a different message boundary than the one that was judged. A denied
request gets ``403 Access denied`` in its turn (replies leave in request
order) and not one of its bytes reaches the server.

The parser has two implementations (``parsers.http1.fast`` on llhttp, and
``parsers.http1.head`` in pure Python) behind one contract; which one runs
is ``ACTIVE_IMPLEMENTATION``, forced with ``L7PROXY_HTTP1_PARSER=c|python``.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, replace

from parsers.base import (
    Access,
    Close,
    Decide,
    Decision,
    Engine,
    Log,
    ParseError,
    ProtocolError,
    Reply,
    ShutdownServer,
    ToClient,
    ToServer,
)
from parsers.http1.errors import (
    AmbiguousFraming,
    DataAfterClose,
    HeadersTooLarge,
    Http1Error,
    IncompleteMessage,
    InvalidChunk,
    MalformedMessage,
    simple_response,
)
from parsers.http1.head import MessageHead, PyRequestHead, PyResponseHead
from parsers.http1.reader import Data, End, Head, MessageReader
from parsers.requests import HttpRequest

__all__ = [
    "ACTIVE_IMPLEMENTATION",
    "AmbiguousFraming",
    "DataAfterClose",
    "HeadersTooLarge",
    "Http1Engine",
    "Http1Error",
    "Http1Limits",
    "IncompleteMessage",
    "InvalidChunk",
    "MalformedMessage",
    "active_implementation",
    "request_reader",
    "response_reader",
]

try:
    from parsers.http1.fast import CRequestHead, CResponseHead

    C_AVAILABLE = True
except ImportError:  # httptools missing: the pure-Python parser serves alone
    C_AVAILABLE = False


def _choose(requested: str) -> str:
    if requested == "auto":
        requested = os.environ.get("L7PROXY_HTTP1_PARSER", "auto").strip().lower() or "auto"
    if requested == "auto":
        return "c" if C_AVAILABLE else "python"
    if requested not in ("c", "python"):
        raise ValueError(f"unknown HTTP/1 parser {requested!r} (want c, python or auto)")
    if requested == "c" and not C_AVAILABLE:
        raise ImportError("the C HTTP/1 parser needs httptools")
    return requested


# Which parser ``parser="auto"`` runs, decided once at import.
ACTIVE_IMPLEMENTATION = _choose("auto")


def active_implementation() -> str:
    """``"c"`` (llhttp via httptools) or ``"python"``."""
    return ACTIVE_IMPLEMENTATION


@dataclass(frozen=True, slots=True)
class Http1Limits:
    max_head: int = 65536  # request/response head (and trailer section), bytes
    max_chunk_line: int = 4096  # chunk-size line including extensions


def request_reader(impl: str = "auto", limits: Http1Limits = Http1Limits()) -> MessageReader:
    """A reader of requests (client side) with the chosen head parser."""
    impl = ACTIVE_IMPLEMENTATION if impl == "auto" else _choose(impl)
    heads = CRequestHead() if impl == "c" else PyRequestHead()
    return MessageReader(
        "client", heads, max_head=limits.max_head, max_chunk_line=limits.max_chunk_line
    )


def response_reader(impl: str = "auto", limits: Http1Limits = Http1Limits()) -> MessageReader:
    impl = ACTIVE_IMPLEMENTATION if impl == "auto" else _choose(impl)
    heads = CResponseHead() if impl == "c" else PyResponseHead()
    return MessageReader(
        "server", heads, max_head=limits.max_head, max_chunk_line=limits.max_chunk_line
    )


# --------------------------------------------------------------------------
# Serialisation (canonical framing)

FRAMING_FIELDS = (b"content-length", b"transfer-encoding")
DENIED = simple_response(403, b"Access denied", close=False)
DENIED_CLOSE = simple_response(403, b"Access denied", close=True)
BAD_GATEWAY = simple_response(502, b"Bad Gateway", close=True)


def _apply_edits(headers: list[tuple[bytes, bytes]], edits) -> list[tuple[bytes, bytes]]:
    for action, name, value in edits:
        key = name.lower().encode("latin-1")
        if key in FRAMING_FIELDS:
            continue  # policy never changes how a body is framed
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        if action == "add":
            headers.append((raw_name, raw_value))
        elif action == "delete":
            headers = [(k, v) for k, v in headers if k.lower() != key]
        elif action == "replace":
            kept = [(k, v) for k, v in headers if k.lower() != key]
            headers = kept + [(raw_name, raw_value)]
    return headers


def _field_block(headers, head: MessageHead) -> list[bytes]:
    parts = []
    for name, value in headers:
        if name.lower() in FRAMING_FIELDS:
            continue
        parts.append(name + b": " + value + b"\r\n")
    if head.framing == "chunked":
        codings = ", ".join((*head.codings, "chunked"))
        parts.append(b"Transfer-Encoding: " + codings.encode("ascii") + b"\r\n")
    elif head.framing == "length":
        parts.append(b"Content-Length: %d\r\n" % head.length)
    return parts


def serialise_request(head: MessageHead, edits=()) -> bytes:
    headers = _apply_edits(list(head.headers), edits) if edits else head.headers
    line = f"{head.method} {head.target} HTTP/{head.version}\r\n".encode("ascii")
    return b"".join([line, *_field_block(headers, head), b"\r\n"])


def serialise_response(head: MessageHead) -> bytes:
    line = (
        f"HTTP/{head.version} {head.status} ".encode("ascii")
        + head.reason.encode("latin-1")
        + b"\r\n"
    )
    if head.framing in ("none", "close"):
        # HEAD/204/304 answers keep the length they announce; close-delimited
        # bodies keep their (non-chunked) codings.
        fields = [name + b": " + value + b"\r\n" for name, value in head.headers]
    else:
        fields = _field_block(head.headers, head)
    return b"".join([line, *fields, b"\r\n"])


def serialise_end(head: MessageHead, trailers) -> bytes:
    if head.framing != "chunked":
        return b""
    return b"".join([b"0\r\n", *(n + b": " + v + b"\r\n" for n, v in trailers), b"\r\n"])


def http_request(head: MessageHead) -> HttpRequest:
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers)
    host = next((v for k, v in headers if k == "host"), "")
    path = head.target
    if "://" in path:  # absolute-form: the target's authority is the host (RFC 9112 3.2.2)
        rest = path.split("://", 1)[1]
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        host, path = rest[:slash], rest[slash:] or "/"
        if path.startswith("?"):
            path = "/" + path
    return HttpRequest(
        method=head.method, path=path, host=host, headers=headers, version=head.version
    )


def _coalesce(out: list) -> list:
    """Merge neighbouring writes in the same direction into one command."""
    if len(out) < 2:
        return out
    merged: list = []
    run: list[bytes] = []
    kind = None
    for cmd in out:
        t = type(cmd)
        if t is kind:
            run.append(cmd.data)
            continue
        if run:
            merged.append(kind(b"".join(run)))
            run = []
        if t is ToServer or t is ToClient:
            kind = t
            run.append(cmd.data)
        else:
            kind = None
            merged.append(cmd)
    if run:
        merged.append(kind(b"".join(run)))
    return merged


# --------------------------------------------------------------------------
# The engine

_MEMO_SIZE = 32  # distinct repeated heads remembered per connection
# Origin-form targets the repeat path may take without a full parse: a strict
# subset of what both head parsers accept (tests/parsers/http1/test_http1_repeat.py checks it).
SIMPLE_TARGET = re.compile(rb"/(?:[A-Za-z0-9._~!$&'()*+,;=:/?\-]|%[0-9A-Fa-f]{2})*")


@dataclass(slots=True)
class _Exchange:
    """One request and what the client is owed for it, in request order."""

    key: int
    request: HttpRequest | None
    head: MessageHead | None
    allowed: bool
    reply: bytes = b""  # synthesized answer (403/400/431) for a request not forwarded
    close: bool = False  # close the connection once this answer is out
    error: ProtocolError | None = None
    started: bool = False  # response bytes already sent to the client


class Http1Engine:
    """Implements ``parsers.base.Engine`` for HTTP/1.x."""

    protocol = "http"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    def __init__(
        self,
        decide: Decide,
        *,
        limits: Http1Limits = Http1Limits(),
        parser: str = "auto",
        upgrade_handler=None,
    ):
        self.decide = decide
        self.limits = limits
        self.implementation = ACTIVE_IMPLEMENTATION if parser == "auto" else _choose(parser)
        self._requests = request_reader(self.implementation, limits)
        self._responses = response_reader(self.implementation, limits)
        self._upgrade_handler = upgrade_handler
        self._seq = 0
        self._queue: deque[_Exchange] = deque()  # every request, in order
        self._awaiting: deque[_Exchange] = deque()  # forwarded, response not complete
        self._current: _Exchange | None = None  # request whose body is arriving
        self._response_head: MessageHead | None = None
        self._client_dead = False  # an error or a close: ignore further client bytes
        self._closed = False
        self._tunnel = False
        self._inner: Engine | None = None
        # Keep-alive clients repeat themselves: a head seen before on this
        # connection, byte for byte, in the same reader state, parses to the
        # same result. These small per-connection memos skip re-parsing it.
        self._seen_requests: dict[bytes, tuple[MessageHead, HttpRequest, bytes]] = {}
        self._seen_responses: dict[tuple[str, bytes], tuple[MessageHead, bytes | None]] = {}
        # The same, for requests that differ only in an origin-form target
        # (GET /items/1, GET /items/2, ...): keyed by method and the bytes after the target.
        self._seen_shapes: dict[tuple[bytes, bytes], tuple[MessageHead, HttpRequest, bool]] = {}

    @property
    def reading_headers(self) -> bool:
        if self._inner is not None:
            return self._inner.reading_headers
        return not self._tunnel and self._requests.reading_head

    # ------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> list:
        if self._inner is not None:
            return self._inner.client_data(data)
        if self._tunnel:
            return [ToServer(data)] if data else [Close("client closed the tunnel")]
        if self._closed or self._client_dead:
            return []
        clean = data and self._current is None and self._requests.at_message_start
        if clean:
            seen = self._seen_requests.get(data)
            if seen is not None:
                fast = self._repeat_request(*seen)
                if fast is not None:
                    return fast
            elif self._seen_shapes:
                fast = self._repeat_shape(data)
                if fast is not None:
                    return fast
        out: list = []
        if not self._read_client(self._requests.feed, data, out):
            return _coalesce(out)
        if clean:
            self._remember_request(data)
        if not data and not self._closed:
            # Client EOF between requests: let owed answers finish first.
            if self._queue:
                out.append(ShutdownServer())
            else:
                self._closed = True
                out.append(Close("client closed"))
        return _coalesce(out)

    def _repeat_request(self, head: MessageHead, request: HttpRequest, wire: bytes) -> list | None:
        decision: Decision = self.decide(request)
        if not decision.allowed or decision.edits:
            return None  # the general path answers denials and applies edits
        key = self._seq
        self._seq += 1
        ex = _Exchange(key, request, head, True)
        self._queue.append(ex)
        self._awaiting.append(ex)
        self._requests.repeat(head)
        self._responses.expect(head.method, False)
        return [Access(request, decision, key), ToServer(wire)]

    def _repeat_shape(self, data: bytes) -> list | None:
        """A request whose only difference from one seen before is its target."""
        sp1 = data.find(b" ", 0, 24)
        sp2 = data.find(b" ", sp1 + 1, sp1 + 8192)
        if sp1 <= 0 or sp2 < 0:
            return None
        seen = self._seen_shapes.get((data[:sp1], data[sp2:]))
        if seen is None or SIMPLE_TARGET.fullmatch(data, sp1 + 1, sp2) is None:
            return None
        head, request, wire_is_data = seen
        target = data[sp1 + 1 : sp2].decode("ascii")
        head = replace(head, target=target, size=len(data))
        request = replace(request, path=target)
        return self._repeat_request(
            head, request, data if wire_is_data else serialise_request(head)
        )

    def _remember_request(self, data: bytes) -> None:
        """Memo ``data`` if it was exactly one bodiless keep-alive request, now forwarded."""
        if (
            len(self._queue) == 0
            or self._current is not None
            or not self._requests.at_message_start
        ):
            return
        ex = self._queue[-1]
        head = ex.head
        if (
            ex.allowed
            and head is not None
            and head.framing == "none"
            and head.keep_alive
            and not head.upgrade
            and not head.expect_continue
            and head.size == len(data)
        ):
            if len(self._seen_requests) >= _MEMO_SIZE:
                self._seen_requests.clear()
            wire = serialise_request(head)
            self._seen_requests[data] = (head, ex.request, wire)
            target = head.target.encode("ascii")
            line_start = head.method.encode("ascii") + b" " + target + b" "
            if (
                data.startswith(line_start)
                and SIMPLE_TARGET.fullmatch(target)
                and ex.request.path == head.target
            ):
                if len(self._seen_shapes) >= _MEMO_SIZE:
                    self._seen_shapes.clear()
                self._seen_shapes[(head.method.encode("ascii"), data[len(line_start) - 1 :])] = (
                    head,
                    ex.request,
                    wire == data,
                )

    def _read_client(self, read, data, out: list) -> bool:
        """Parse client bytes and act on them; False after a client error."""
        try:
            events = read(data) if data is not None else read()
        except Http1Error as exc:
            events = getattr(exc, "events", [])
            error: Http1Error | None = exc
        else:
            error = None
        try:
            self._on_client_events(events, out)
        except Http1Error as exc:  # a rule the engine adds on top of the parser
            error = exc
        if error is not None:
            self._on_client_error(error, out)
            return False
        return True

    def _on_client_events(self, events, out: list) -> None:
        for event in events:
            if type(event) is Data:
                ex = self._current
                if ex is not None and ex.allowed:
                    if ex.head.framing == "chunked":
                        out.append(ToServer(b"%x\r\n" % len(event.data) + event.data + b"\r\n"))
                    else:
                        out.append(ToServer(event.data))
            elif type(event) is Head:
                self._on_request_head(event.head, out)
            elif type(event) is End:
                ex = self._current
                self._current = None
                if ex is not None and ex.allowed:
                    tail = serialise_end(ex.head, event.trailers)
                    if tail:
                        out.append(ToServer(tail))
                elif ex is not None and ex.head.upgrade:
                    # A refused Upgrade/CONNECT: the client stays on HTTP/1.1.
                    self._on_client_events(self._requests.resume(), out)

    def _on_request_head(self, head: MessageHead, out: list) -> None:
        if head.version == "1.1" and not head.values(b"host"):
            # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request
            # without Host. (The parser library accepts it; the proxy does not.)
            raise MalformedMessage("HTTP/1.1 request without Host", code="missing_host")
        request = http_request(head)
        decision: Decision = self.decide(request)
        key = self._seq
        self._seq += 1
        out.append(Access(request, decision, key))
        ex = _Exchange(key, request, head, decision.allowed)
        self._current = ex
        self._queue.append(ex)
        if decision.allowed:
            self._awaiting.append(ex)
            self._responses.expect(head.method, head.upgrade)
            out.append(ToServer(serialise_request(head, decision.edits)))
        else:
            # A client waiting for 100-continue may never send the body it
            # announced, so the connection cannot be reused after refusing it.
            body_unsent = head.expect_continue and head.framing != "none"
            ex.close = not head.keep_alive or body_unsent
            ex.reply = DENIED_CLOSE if ex.close else DENIED
            if ex.close:
                self._client_dead = True
            self._flush(out)

    def _on_client_error(self, exc: Http1Error, out: list) -> None:
        self._client_dead = True
        if isinstance(exc, DataAfterClose):
            out.append(Log(f"ignored client bytes after Connection: close ({exc})"))
            return
        if isinstance(exc, IncompleteMessage):
            # The client went away mid-request: nobody is left to answer.
            out.append(Close("client closed mid-request"))
            self._closed = True
            return
        ex = self._current
        if ex is not None and ex.allowed:
            # Its head is already at the server, the bad bytes never will be:
            # answer the client if it is owed nothing before this, then close.
            if self._queue and self._queue[0] is ex and not ex.started:
                out.append(ToClient(exc.wire_reply))
                out.append(Reply(ex.key, {"status": exc.status}))
            out.append(ParseError("client", exc, close=True))
            self._closed = True
            return
        err = _Exchange(-1, None, None, False, reply=exc.wire_reply, close=True, error=exc)
        self._queue.append(err)
        self._flush(out)

    # ------------------------------------------------------------ server side

    def server_data(self, data: bytes) -> list:
        if self._inner is not None:
            return self._inner.server_data(data)
        if self._tunnel:
            return [ToClient(data)] if data else [Close("server closed the tunnel")]
        if self._closed:
            return []
        memo_key = None
        if (
            data
            and len(self._queue) == 1
            and len(self._awaiting) == 1
            and self._responses.at_message_start
        ):
            end = data.find(b"\r\n\r\n")
            if end > 0:
                memo_key = (self._awaiting[0].head.method, data[: end + 4])
                seen = self._seen_responses.get(memo_key)
                if seen is not None and len(data) == end + 4 + seen[0].length:
                    return self._repeat_response(data, end + 4, *seen)
        out: list = []
        try:
            events = self._responses.feed(data)
        except Http1Error as exc:
            self._on_server_events(getattr(exc, "events", []), out)
            self._on_server_error(exc, out)
            return _coalesce(out)
        self._on_server_events(events, out)
        if memo_key is not None:
            self._remember_response(memo_key, len(data))
        if not data and not self._closed:
            if self._awaiting:
                self._on_server_error(
                    IncompleteMessage("server closed before answering", side="server"), out
                )
            else:
                self._closed = True
                out.append(Close("server closed"))
        return _coalesce(out)

    def _on_server_events(self, events, out: list) -> None:
        for event in events:
            if type(event) is Data:
                head = self._response_head
                if head.framing == "chunked":
                    out.append(ToClient(b"%x\r\n" % len(event.data) + event.data + b"\r\n"))
                else:
                    out.append(ToClient(event.data))
            elif type(event) is Head:
                head = event.head
                if not self._awaiting:
                    self._on_server_error(
                        MalformedMessage("response without a request", side="server"), out
                    )
                    return
                self._response_head = head
                self._awaiting[0].started = True
                out.append(ToClient(serialise_response(head)))
            elif type(event) is End:
                head = self._response_head
                tail = serialise_end(head, event.trailers)
                if tail:
                    out.append(ToClient(tail))
                if head.status < 200 and not self._responses.switched:
                    continue  # 1xx: the final response is still to come
                ex = self._awaiting.popleft()
                self._queue.popleft()
                out.append(Reply(ex.key, {"status": head.status}))
                if self._responses.switched:
                    self._switch(ex, out)
                    return
                if ex.head.upgrade and not self._client_dead:
                    self._read_client(self._requests.resume, None, out)
                self._flush(out)
                if not head.keep_alive:
                    self._closed = True
                    out.append(Close("server ended the connection"))
                    return

    def _repeat_response(
        self, data: bytes, head_end: int, head: MessageHead, wire: bytes | None
    ) -> list:
        ex = self._awaiting.popleft()
        self._queue.popleft()
        self._responses.repeat(head)
        self._response_head = head
        # The canonical head is usually the head as received: forward the bytes as they are.
        body = data if wire is None else wire + data[head_end:]
        return [ToClient(body), Reply(ex.key, {"status": head.status})]

    def _remember_response(self, memo_key: tuple[str, bytes], size: int) -> None:
        """Memo a head that arrived with exactly its Content-Length body and completed
        the only outstanding exchange on a connection that stays open."""
        head = self._response_head
        if (
            self._closed
            or self._queue
            or head is None
            or head.framing != "length"
            or not head.keep_alive
            or not 200 <= head.status < 300
            or self._responses.switched
            or not self._responses.at_message_start
            or head.size != len(memo_key[1])
            or size != head.size + head.length
        ):
            return
        wire = serialise_response(head)
        if len(self._seen_responses) >= _MEMO_SIZE:
            self._seen_responses.clear()
        self._seen_responses[memo_key] = (head, None if wire == memo_key[1] else wire)

    def _on_server_error(self, exc: Http1Error, out: list) -> None:
        out.append(ParseError("server", exc, close=True))
        ex = self._awaiting[0] if self._awaiting else None
        if ex is not None and not ex.started:
            out.append(ToClient(BAD_GATEWAY))
            out.append(Reply(ex.key, {"status": 502}))
        self._closed = True
        out.append(Close("bad response from server"))

    def _switch(self, ex: _Exchange, out: list) -> None:
        """The server accepted an Upgrade/CONNECT: from here on, not HTTP."""
        client_left = self._requests.take_leftover()
        server_left = self._responses.take_leftover()
        inner = self._upgrade_handler(ex.request) if self._upgrade_handler else None
        if inner is not None:
            self._inner = inner
            if client_left:
                out.extend(inner.client_data(client_left))
            if server_left:
                out.extend(inner.server_data(server_left))
            return
        self._tunnel = True
        if client_left:
            out.append(ToServer(client_left))
        if server_left:
            out.append(ToClient(server_left))

    # ------------------------------------------------------------ ordering

    def _flush(self, out: list) -> None:
        """Answer, in order, the refused requests now at the head of the line."""
        queue = self._queue
        while queue and not queue[0].allowed:
            ex = queue.popleft()
            out.append(ToClient(ex.reply))
            if ex.error is not None:
                out.append(ParseError("client", ex.error, close=True))
                self._closed = True
                return
            out.append(Reply(ex.key, {"status": 403}))
            if ex.close:
                self._closed = True
                out.append(Close("denied request ends the connection"))
                return
