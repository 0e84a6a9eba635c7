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
The engine's readers put ``parsers.http1.memo`` in front of it, so a head the
connection sent before (or any connection sharing its ``HeadMemory``) is not
parsed again; it is judged and forwarded by the same code as any other (one
state machine, one ``decide`` call per request).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from parsers.base import (
    DEFAULT_MAX_PENDING,
    HEADER_TIMEOUT,
    Close,
    Command,
    Decide,
    Decision,
    Engine,
    Finished,
    Log,
    ParseError,
    Reply,
    ShutdownServer,
    TimeLimit,
    ToClient,
    ToServer,
    WireData,
    Yield,
    new_access,
    new_reply,
    new_to_client,
    new_to_server,
)
from parsers.fastnew import fast_new
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
from parsers.http1.head import (
    MessageHead,
    PyRequestHead,
    PyResponseHead,
    RequestFields,
    RequestHeadParser,
    ResponseHeadParser,
)
from parsers.http1.memo import (
    HeadMemory,
    RequestHeadMemo,
    RequestHeads,
    ResponseHeadMemo,
    ResponseHeads,
)
from parsers.http1.quick import (
    C_SCANNER,
    QuickRequestHead,
    derive_forms,
    quick_implementation,
)
from parsers.http1.reader import END, Data, End, Event, Head, MessageReader
from parsers.requests import HttpRequest, new_http_request

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
    # Responses handled per turn of the event loop (fairness): the answers to a
    # client pipelining hundreds of requests come in several turns, with every
    # other connection served in between, not in one turn of milliseconds.
    responses_per_turn: int = 32


# The C head scanner the quick read in front of each head parser starts with, if any.
_SCANNERS = {impl: C_SCANNER for impl in ("c", "python") if quick_implementation(impl) == "c"}


def _request_heads(impl: str, quick: bool) -> RequestHeadParser:
    heads: RequestHeadParser = CRequestHead() if impl == "c" else PyRequestHead()
    return QuickRequestHead(heads, quick_implementation(impl)) if quick else heads


def _response_heads(impl: str) -> ResponseHeadParser:
    return CResponseHead() if impl == "c" else PyResponseHead()


# What makes the parser behind a memo (when its first unknown head comes), by
# implementation: made once, not per connection.
_QUICK_REQUEST_HEADS = {impl: partial(_request_heads, impl, True) for impl in ("c", "python")}
_RESPONSE_HEADS = {impl: partial(_response_heads, impl) for impl in ("c", "python")}


def request_reader(
    impl: str = "auto",
    limits: Http1Limits = Http1Limits(),
    *,
    memo: bool = False,
    quick: bool = False,
    memory: RequestHeads | None = None,
) -> MessageReader:
    """A reader of requests (client side) with the chosen head parser; with ``quick``,
    plain heads are read by ``parsers.http1.quick`` (its C scanner in front of the C
    parser, unless ``L7PROXY_HTTP1_QUICK`` says otherwise) and only the others by that
    parser; with ``memo``, heads seen before are not read again: on this connection,
    or, with ``memory`` (a ``HeadMemory``'s), on any that shares it. A memo makes its
    parser only for the first head it does not know."""
    if impl != ACTIVE_IMPLEMENTATION:  # (most often it is: no call then)
        impl = ACTIVE_IMPLEMENTATION if impl == "auto" else _choose(impl)
    heads: RequestHeadParser = (
        RequestHeadMemo(
            partial(_request_heads, impl, quick),
            memory,
            _SCANNERS.get(impl) if quick else None,
        )
        if memo
        else _request_heads(impl, quick)
    )
    return MessageReader(heads, max_head=limits.max_head, max_chunk_line=limits.max_chunk_line)


def response_reader(
    impl: str = "auto",
    limits: Http1Limits = Http1Limits(),
    *,
    memo: bool = False,
    memory: ResponseHeads | None = None,
) -> MessageReader:
    """A reader of responses (server side); ``memo`` and ``memory`` as for
    ``request_reader``."""
    if impl != ACTIVE_IMPLEMENTATION:
        impl = ACTIVE_IMPLEMENTATION if impl == "auto" else _choose(impl)
    heads: ResponseHeadParser = (
        ResponseHeadMemo(partial(_response_heads, impl), memory) if memo else _response_heads(impl)
    )
    return MessageReader(heads, max_head=limits.max_head, max_chunk_line=limits.max_chunk_line)


# --------------------------------------------------------------------------
# Serialisation (canonical framing)

FRAMING_FIELDS = (b"content-length", b"transfer-encoding")
DENIED = simple_response(403, b"Access denied", close=False)
DENIED_CLOSE = simple_response(403, b"Access denied", close=True)
BAD_GATEWAY = simple_response(502, b"Bad Gateway", close=True)
REQUEST_TIMEOUT = simple_response(408, b"Request Timeout", close=True)


Fields = list[tuple[bytes, bytes]]
Edits = tuple[tuple[str, str, str], ...]


def _apply_edits(headers: Fields, edits: Edits) -> Fields:
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


def _field_block(headers: Fields, head: MessageHead) -> list[bytes]:
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


def request_line(head: MessageHead) -> bytes:
    return f"{head.method} {head.target} HTTP/{head.version}\r\n".encode("ascii")


def request_fields(head: MessageHead, edits: Edits = ()) -> bytes:
    """The field section a request is forwarded with (one framing field), and the empty line."""
    headers = _apply_edits(list(head.headers), edits) if edits else head.headers
    return b"".join([*_field_block(headers, head), b"\r\n"])


def serialise_request(head: MessageHead, edits: Edits = ()) -> bytes:
    return request_line(head) + request_fields(head, edits)


def serialise_response(head: MessageHead, *, close: bool = False) -> bytes:
    """A response head as forwarded; with ``close``, it says ``Connection: close``."""
    line = (
        f"HTTP/{head.version} {head.status} ".encode("ascii")
        + head.reason.encode("latin-1")
        + b"\r\n"
    )
    headers = _closing(head.headers) if close else head.headers
    if head.framing in ("none", "close"):
        # HEAD/204/304 answers keep the length they announce; close-delimited
        # bodies keep their (non-chunked) codings.
        fields = [name + b": " + value + b"\r\n" for name, value in headers]
    else:
        fields = _field_block(headers, head)
    return b"".join([line, *fields, b"\r\n"])


def _closing(headers: Fields) -> Fields:
    """The response fields with ``Connection: close`` (RFC 9112 9.6): one Connection
    field where the first one was, keeping the other options it names but not
    ``keep-alive``, and no ``Keep-Alive`` field. One field, because clients read
    the first one only (Python's http.client does): ``keep-alive`` then ``close``
    in two fields would keep the connection."""
    options: list[bytes] = []
    at: int | None = None
    kept: Fields = []
    for name, value in headers:
        key = name.lower()
        if key == b"connection":
            if at is None:
                at = len(kept)
            options += [t.strip(b" \t") for t in value.split(b",")]
        elif key != b"keep-alive":
            kept.append((name, value))
    others = [t for t in options if t and t.lower() not in (b"close", b"keep-alive")]
    kept.insert(len(kept) if at is None else at, (b"Connection", b", ".join([b"close", *others])))
    return kept


def serialise_end(head: MessageHead, trailers: Sequence[tuple[bytes, bytes]]) -> bytes:
    if head.framing != "chunked":
        return b""
    return b"".join([b"0\r\n", *(n + b": " + v + b"\r\n" for n, v in trailers), b"\r\n"])


def request_field_facts(head: MessageHead) -> RequestFields:
    headers = tuple([(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers])
    host = None
    for name, value in headers:
        if name == "host":
            host = value
            break
    section = request_fields(head) if head.wire is None else None
    return RequestFields(headers, host or "", host is not None, section)


@dataclass(frozen=True, slots=True)
class RequestForm:
    """A request head as the engine uses it: what ``decide`` sees, and the bytes
    forwarded when the decision asks for no edits."""

    request: HttpRequest
    wire: bytes


def http_request(head: MessageHead, fields: RequestFields | None = None) -> HttpRequest:
    """The typed request ``decide`` sees (``fields``: ``request_field_facts(head)``, if known)."""
    if fields is None:
        fields = request_field_facts(head)
    host, path = fields.host, head.target
    # Absolute-form (RFC 9112 3.2.2): the target's authority is the host. Only a
    # target that does not start with "/" is one: "://" in an origin-form query
    # (/admin?x=://h/public) must not be read as a URL, or policy would judge a
    # path the server never sees.
    if not path.startswith("/") and "://" in path:
        rest = path.split("://", 1)[1]
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        host, path = rest[:slash], rest[slash:] or "/"
        if path.startswith("?"):
            path = "/" + path
    # (method, path, host, headers, version): positional, as it is built per new head.
    return new_http_request(head.method, path, host, fields.headers, head.version)


def _whole_events(head: MessageHead, data: bytes) -> tuple[Event, ...]:
    """The events of a message ``MessageReader.read_whole`` read whole from ``data``."""
    if head.framing == "length":
        return (Head(head), Data(data[len(data) - head.length :]), END)
    return (Head(head), END)


def _coalesce(out: list[Command]) -> list[Command]:
    """Merge neighbouring writes in the same direction into one command."""
    if len(out) < 2 or (len(out) == 2 and type(out[0]) is not type(out[1])):
        return out
    previous: type | None = None
    for cmd in out:
        this = type(cmd)
        if this is previous and (this is ToServer or this is ToClient):
            break
        previous = this
    else:
        return out  # no two writes side by side (most turns)
    merged: list[Command] = []
    run: list[WireData] = []
    kind: type[ToServer] | type[ToClient] | None = None
    for cmd in out:
        if type(cmd) is ToServer or type(cmd) is ToClient:
            if type(cmd) is kind:
                run.append(cmd.data)
                continue
            if kind is not None:
                merged.append(kind(b"".join(run)))
            kind, run = type(cmd), [cmd.data]
        else:
            if kind is not None:
                merged.append(kind(b"".join(run)))
                kind = None
            merged.append(cmd)
    if kind is not None:
        merged.append(kind(b"".join(run)))
    return merged


# --------------------------------------------------------------------------
# The engine

UpgradeHandler = Callable[[HttpRequest], Engine | None]


@dataclass(slots=True)
class _Exchange:
    """One judged request and what the client is owed for it, in request order."""

    key: int
    request: HttpRequest
    head: MessageHead
    allowed: bool
    reply: bytes = b""  # the 403 for a request not forwarded
    close: bool = False  # close the connection once this answer is out
    started: bool = False  # response bytes already sent to the client
    last: bool = False  # finish(): its response says Connection: close, and is the last


@dataclass(slots=True)
class _BadRequest:
    """Bytes that could not be read as a request: a 400 (431) in its turn, then the end."""

    error: Http1Error
    allowed: ClassVar[bool] = False


@dataclass(slots=True)
class _TimedOut:
    """A head that was not complete by its deadline: 408 in its turn, then the end."""

    allowed: ClassVar[bool] = False


# Built for every request (``parsers.fastnew``).
new_exchange = fast_new(_Exchange)
new_form = fast_new(RequestForm)
# A head the C scanner reads comes with its form, made in the same pass.
derive_forms(new_http_request, new_form)


class Http1Engine:
    """Implements ``parsers.base.Engine`` for HTTP/1.x. ``heads``: the memory of heads
    this connection shares with others (a proxy's); without it, its own."""

    protocol = "http"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    # Set only by an end of input, read only then (class attributes: not stored per
    # connection).
    _client_eof_held = False  # the client's EOF came behind held requests
    _server_eof_held = False  # the server's EOF came behind held responses
    _client_eof = False  # finish(): the client has sent its EOF

    def __init__(
        self,
        decide: Decide,
        *,
        limits: Http1Limits = Http1Limits(),
        parser: str = "auto",
        upgrade_handler: UpgradeHandler | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        heads: HeadMemory | None = None,
    ) -> None:
        self.decide = decide
        self.limits = limits
        # Pipelined requests judged before their answers: at this many, the
        # reader holds further bytes until half have been answered.
        self._max_pending = max_pending
        impl = ACTIVE_IMPLEMENTATION if parser == "auto" else _choose(parser)
        self.implementation = impl
        # Keep-alive clients repeat themselves, and new connections their first heads:
        # both readers remember the heads of this connection, or of all that share
        # ``heads`` (``parsers.http1.memo``), and nothing else differs.
        # (``request_reader(impl, limits, memo=True, quick=True, memory=...)`` and
        # ``response_reader(impl, limits, memo=True, memory=...)``, inline, with the
        # makers of their memos' parsers made once: two readers per connection.)
        self._requests = MessageReader(
            RequestHeadMemo(
                _QUICK_REQUEST_HEADS[impl], heads.requests if heads else None, _SCANNERS.get(impl)
            ),
            max_head=limits.max_head,
            max_chunk_line=limits.max_chunk_line,
        )
        self._responses = MessageReader(
            ResponseHeadMemo(_RESPONSE_HEADS[impl], heads.responses if heads else None),
            max_head=limits.max_head,
            max_chunk_line=limits.max_chunk_line,
        )
        self._upgrade_handler = upgrade_handler
        self._seq = 0
        self._queue: deque[_Exchange | _BadRequest | _TimedOut] = deque()  # every request, in order
        self._awaiting: deque[_Exchange] = deque()  # forwarded, response not complete
        self._current: _Exchange | None = None  # request whose body is arriving
        self._response_head: MessageHead | None = None
        self._client_dead = False  # an error or a close: ignore further client bytes
        self._closed = False
        self._tunnel = False
        self._inner: Engine | None = None
        # finish(): asked; the request whose response is the last (None: the next
        # one read); that response is out.
        self._finishing = False
        self._last: _Exchange | None = None
        self._finished = False

    @property
    def reading_headers(self) -> bool:
        if self._inner is not None:
            return self._inner.reading_headers
        return not self._tunnel and not self._client_dead and self._requests.reading_head

    @property
    def reading_body(self) -> bool:
        if self._inner is not None:
            return self._inner.reading_body
        if self._client_dead or not self._requests.reading_body:
            return False
        ex = self._current
        # A client that sent "Expect: 100-continue" may wait for the server's
        # word before it sends the body: its silence until then is not a stall.
        return ex is None or not ex.head.expect_continue or ex.started

    @property
    def heads_read(self) -> int:
        inner = self._inner
        return self._seq + (inner.heads_read if inner is not None else 0)

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """A head past its deadline gets 408 and ``Connection: close``, after every
        response the client is owed for its earlier (pipelined) requests, in order;
        nothing more is read from the client meanwhile. A stalled body gets a close
        only: its head is at the server already, or was answered 403."""
        if self._inner is not None:
            return self._inner.client_timed_out(limit)
        if self._closed or self._client_dead or self._tunnel:
            return []
        self._client_dead = True
        out: list[Command] = []
        if limit == HEADER_TIMEOUT:
            self._queue.append(_TimedOut())
            self._flush(out)
        else:
            self._closed = True
            out.append(Close(limit))
        return out

    def finish(self) -> list[Command]:
        """``Connection: close`` on the response to the last request read: the newest
        one judged, unless its final response has begun already (a download under
        way), in which case the next request read is the last. Requests behind it
        are never read, so never forwarded: the client, told by that response that
        the connection ends, sends them again on a new one (RFC 9112 9.3.2 on
        unanswered pipelined requests), and no server has seen them twice. Every
        request already forwarded is answered, in order. The client closes first,
        after reading the last response (9.6), which keeps TIME_WAIT on its side;
        its EOF is answered with ``Close``. A byte tunnel has no such word: nothing
        is done (the driver ends it once quiet); a connection already ending
        (an error answer, a 408) ends as it does."""
        if self._inner is not None:
            return self._inner.finish()
        if self._finishing:
            return []
        self._finishing = True
        if self._tunnel or self._closed or self._client_dead:
            return []
        tail = self._queue[-1] if self._queue else None
        # (A denied request waiting in the queue is behind a forwarded one: its 403
        # goes out in turn, now with Connection: close.)
        if type(tail) is _Exchange and not self._final_response_begun(tail):
            self._make_last(tail)
        else:
            self._requests.budget = self._budget()
        return []

    def _final_response_begun(self, ex: _Exchange) -> bool:
        head = self._response_head
        return ex.started and head is not None and head.status >= 200

    def _make_last(self, ex: _Exchange) -> None:
        """``ex``'s response is the last one, with ``Connection: close``; nothing
        after ``ex`` is read."""
        ex.last = True
        self._last = ex
        self._requests.budget = 0
        if not ex.allowed:
            ex.reply = DENIED_CLOSE

    def _budget(self) -> int:
        """How many more requests the reader may begin: none past the last one."""
        if self._last is not None:
            return 0
        room = max(0, self._max_pending - len(self._queue))
        return min(room, 1) if self._finishing else room

    def _end_after_last(self, out: list[Command]) -> None:
        """The last response is out: the client, told, closes (its EOF gets Close)."""
        self._finished = True
        self._client_dead = True  # what it sends now was sent after it was told
        if self._client_eof:
            self._closed = True
            out.append(Close("client closed before its last response"))
        else:
            out.append(Finished(told=True))

    # ------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> list[Command]:
        if self._inner is not None:
            return self._inner.client_data(data)
        if self._tunnel:
            return [ToServer(data)] if data else [Close("client closed the tunnel")]
        if not data:
            self._client_eof = True
        if self._closed:
            return []
        if self._client_dead:
            if self._finished and not data:
                self._closed = True
                return [Close("client closed after Connection: close")]
            return []
        out: list[Command] = []
        if self._requests.held:
            if not data:
                self._client_eof_held = True  # after the held requests, in order
                return out
            if self._last is not None:
                return out  # sent behind the last request: never read, so not kept
        requests = self._requests
        if self._last is None and not self._finishing:  # (``_budget()``, inline: per read)
            room = self._max_pending - len(self._queue)
            requests.budget = room if room > 0 else 0
        else:
            requests.budget = self._budget()
        whole = requests.read_whole(data)
        if whole is None:
            read = self._read_client(data, out)
        elif whole.framing == "none" and not whole.upgrade:
            # Most reads: one request without a body. What ``_on_client_events``
            # does for its Head and END, without making them.
            try:
                self._on_request_head(whole, out)
            except Http1Error as exc:
                self._on_client_error(exc.detach(), out)
                return _coalesce(out)
            self._current = None
            return out
        else:
            read = self._on_client_read(_whole_events(whole, data), None, out)
        if not read:
            return _coalesce(out)
        if self._requests.held:
            self._resume_held(out)
        elif not data and not self._closed:
            # Client EOF between requests: let owed answers finish first.
            if self._queue:
                out.append(ShutdownServer())
            else:
                self._closed = True
                out.append(Close("client closed"))
        return _coalesce(out)

    def _read_client(self, data: bytes | None, out: list[Command]) -> bool:
        """Parse client bytes (``None``: resume after a refused Upgrade) and act on
        them; False after a client error."""
        error: Http1Error | None = None
        try:
            events = self._requests.feed(data) if data is not None else self._requests.resume()
        except Http1Error as exc:
            events, error = exc.events, exc.detach()  # kept as data: a queued 400 may hold it
        return self._on_client_read(events, error, out)

    def _on_client_read(
        self, events: Iterable[Event], error: Http1Error | None, out: list[Command]
    ) -> bool:
        try:
            self._on_client_events(events, out)
        except Http1Error as exc:  # a rule the engine adds on top of the parser
            error = exc.detach()
        if error is not None:
            self._on_client_error(error, out)
            return False
        return True

    def _resume_held(self, out: list[Command]) -> None:
        """Read on through held requests while there is room for half the depth at
        least (so held bytes are not re-read once per answer); then the client's
        EOF, if it came behind them."""
        requests = self._requests
        while requests.held and not self._client_dead and not self._closed:
            room = self._max_pending - len(self._queue)
            if room < max(1, self._max_pending // 2) or not self._budget():
                return
            requests.budget = self._budget()
            if not self._read_client(None, out):
                return
        if self._client_eof_held and not requests.held and not self._closed:
            self._client_eof_held = False
            out.extend(self.client_data(b""))

    def _on_client_events(self, events: Iterable[Event], out: list[Command]) -> None:
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
                    if ex.head.framing == "chunked":
                        out.append(ToServer(serialise_end(ex.head, event.trailers)))
                elif ex is not None and ex.head.upgrade:
                    # A refused Upgrade/CONNECT: the client stays on HTTP/1.1.
                    self._on_client_events(self._requests.resume(), out)

    def _on_request_head(self, head: MessageHead, out: list[Command]) -> None:
        """Judge one request: the only place ``decide`` is called, once per request."""
        # (A head seen before carries its form: no call for it.)
        form: RequestForm = head.derived or self._request_form(head)
        request = form.request
        decision: Decision = self.decide(request)
        key = self._seq
        self._seq += 1
        out.append(new_access(request, decision, key))
        ex = new_exchange(key, request, head, decision.allowed)
        self._current = ex
        self._queue.append(ex)
        if self._finishing and self._last is None:
            self._make_last(ex)
        if decision.allowed:
            self._awaiting.append(ex)
            self._responses.expect(head.method, head.upgrade)
            edits = decision.edits
            out.append(new_to_server(serialise_request(head, edits) if edits else form.wire))
        else:
            # A client waiting for 100-continue may never send the body it
            # announced, so the connection cannot be reused after refusing it.
            body_unsent = head.expect_continue and head.framing != "none"
            ex.close = not head.keep_alive or body_unsent
            ex.reply = DENIED_CLOSE if ex.close or ex.last else DENIED
            if ex.close:
                self._client_dead = True
            self._flush(out)

    def _request_form(self, head: MessageHead) -> RequestForm:
        form: RequestForm | None = head.derived
        if form is not None:
            return form  # the same head as before: it passed the checks below then
        fields: RequestFields | None = head.derived_fields
        if fields is None:
            fields = head.derived_fields = request_field_facts(head)
        if head.version == "1.1" and not fields.has_host:
            # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request
            # without Host. (The parser library accepts it; the proxy does not.)
            raise MalformedMessage("HTTP/1.1 request without Host", code="missing_host")
        wire = head.wire  # the client's own bytes, when they are what we would write
        if wire is None:
            section = fields.section
            wire = request_line(head) + (section if section is not None else request_fields(head))
        target = head.target
        if target.startswith("/"):  # origin-form, the path as it came (``http_request``, inline)
            request = new_http_request(
                head.method, target, fields.host, fields.headers, head.version
            )
        else:
            request = http_request(head, fields)
        form = head.derived = new_form(request, wire)
        return form

    def _on_client_error(self, exc: Http1Error, out: list[Command]) -> None:
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
        self._queue.append(_BadRequest(exc))
        self._flush(out)

    # ------------------------------------------------------------ server side

    def server_data(self, data: bytes) -> list[Command]:
        if self._inner is not None:
            return self._inner.server_data(data)
        if self._tunnel:
            return [ToClient(data)] if data else [Close("server closed the tunnel")]
        if self._closed or self._finished:
            # Finished: the client owes the close, even if the server leaves first.
            return []
        responses = self._responses
        if responses.held:
            # The driver does not read the server until our turn is over; an engine
            # driven directly may: the bytes join those held, in order.
            if data:
                responses.feed(data)
            else:
                self._server_eof_held = True
            return []
        out: list[Command] = []
        whole = None
        if data and self._awaiting:
            responses.budget = self.limits.responses_per_turn
            whole = responses.read_whole(data)
            if whole is not None and self._whole_response(whole, data, out):
                # Its write and its Reply first, so a third command (the Close of a last
                # response) has no write beside it to merge with.
                return out if len(out) <= 3 else _coalesce(out)
        if self._read_responses(data, out, whole):
            return _coalesce(out)
        if not data and not self._closed:
            if self._awaiting:
                self._on_server_error(
                    IncompleteMessage("server closed before answering", side="server"), out
                )
            else:
                self._closed = True
                out.append(Close("server closed"))
        return _coalesce(out)

    def _next_responses(self) -> list[Command]:
        """A later turn: the responses the last one had no budget for."""
        if not self._responses.held or self._closed or self._finished or self._inner is not None:
            return []
        out: list[Command] = []
        if not self._read_responses(None, out) and self._server_eof_held and not self._closed:
            self._server_eof_held = False
            out.extend(self.server_data(b""))
        return _coalesce(out)

    def _read_responses(
        self, data: bytes | None, out: list[Command], whole: MessageHead | None = None
    ) -> bool:
        """Relay the responses in ``data`` (None: those held), at most
        ``responses_per_turn`` of them; ``whole``: the head of the one whole
        message ``data`` is, read already. True when this turn ends here: a bad
        response, or a ``Yield`` for the rest."""
        responses = self._responses
        if whole is not None:
            events: Iterable[Event] = _whole_events(whole, data)  # type: ignore[arg-type]
        else:
            responses.budget = self.limits.responses_per_turn
            try:
                events = responses.feed(data) if data is not None else responses.resume()
            except Http1Error as exc:
                self._on_server_events(exc.events, out)
                self._on_server_error(exc, out)
                return True
        self._on_server_events(events, out)
        if responses.held and not self._closed and self._inner is None:
            out.append(Yield(self._next_responses, server=True))
            return True
        return False

    def _on_server_events(self, events: Iterable[Event], out: list[Command]) -> None:
        for event in events:
            if type(event) is Data:
                head = self._response_head
                assert head is not None  # the reader reads a head before its body
                if head.framing == "chunked":
                    out.append(ToClient(b"%x\r\n" % len(event.data) + event.data + b"\r\n"))
                elif out and type(out[-1]) is ToClient:
                    # The head just written: one write for head and body (what
                    # ``_coalesce`` would do; a message has one such body piece per read).
                    # That head is bytes this engine built, never a memoryview.
                    out[-1] = ToClient(out[-1].data + event.data)  # type: ignore[operator]
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
                ex = self._awaiting[0]
                ex.started = True
                if ex.last and head.status >= 200 and not self._responses.switched:
                    out.append(ToClient(serialise_response(head, close=True)))
                    continue
                wire: bytes | None = head.derived
                if wire is None:
                    wire = head.derived = serialise_response(head)
                out.append(ToClient(wire))
            elif type(event) is End:
                head = self._response_head
                assert head is not None  # the reader reads a head before its end
                if head.framing == "chunked":
                    out.append(ToClient(serialise_end(head, event.trailers)))
                if head.status < 200 and not self._responses.switched:
                    continue  # 1xx: the final response is still to come
                ex = self._awaiting.popleft()
                self._queue.popleft()
                out.append(Reply(ex.key, {"status": head.status}))
                if self._responses.switched:
                    self._switch(ex, out)
                    return
                if ex.last and head.framing != "close":
                    # (A body delimited by the server's EOF ends only with our close:
                    # the close below, as for any such response.)
                    self._end_after_last(out)
                    return
                if ex.head.upgrade and not self._client_dead:
                    self._read_client(None, out)
                if self._queue and not self._queue[0].allowed:
                    self._flush(out)
                if self._requests.held:
                    self._resume_held(out)
                if not head.keep_alive:
                    self._closed = True
                    out.append(Close("server ended the connection"))
                    return

    def _whole_response(self, head: MessageHead, data: bytes, out: list[Command]) -> bool:
        """Most reads: one whole final response to a plain request. What
        ``_on_server_events`` does for its Head, Data and END, without making them;
        when the head is forwarded as it came, so is ``data``, whole. False, with
        nothing done, for any other response."""
        ex = self._awaiting[0]
        if head.status < 200 or ex.last or ex.head.upgrade or self._responses.switched:
            return False
        self._response_head = head
        ex.started = True
        wire: bytes | None = head.derived
        if wire is None:
            wire = head.derived = serialise_response(head)
        if head.framing == "length":
            body_at = len(data) - head.length
            same = len(wire) == body_at and data.startswith(wire)
            out.append(new_to_client(data if same else wire + data[body_at:]))
        else:
            out.append(new_to_client(wire))
        self._awaiting.popleft()
        self._queue.popleft()
        out.append(new_reply(ex.key, {"status": head.status}))
        if self._queue and not self._queue[0].allowed:
            self._flush(out)
        if self._requests.held:
            self._resume_held(out)
        if not head.keep_alive:
            self._closed = True
            out.append(Close("server ended the connection"))
        return True

    def _on_server_error(self, exc: Http1Error, out: list[Command]) -> None:
        out.append(ParseError("server", exc, close=True))
        ex = self._awaiting[0] if self._awaiting else None
        if ex is not None and not ex.started:
            out.append(ToClient(BAD_GATEWAY))
            out.append(Reply(ex.key, {"status": 502}))
        self._closed = True
        out.append(Close("bad response from server"))

    def _switch(self, ex: _Exchange, out: list[Command]) -> None:
        """The server accepted an Upgrade/CONNECT: from here on, not HTTP."""
        client_left = self._requests.take_leftover()
        server_left = self._responses.take_leftover()
        inner = self._upgrade_handler(ex.request) if self._upgrade_handler else None
        if inner is not None:
            self._inner = inner
            if self._finishing:
                out.extend(inner.finish())
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

    def _flush(self, out: list[Command]) -> None:
        """Answer, in order, the refused requests now at the head of the line."""
        queue = self._queue
        while queue and not queue[0].allowed:
            ex = queue.popleft()
            if isinstance(ex, _BadRequest):
                out.append(ToClient(ex.error.wire_reply))
                out.append(ParseError("client", ex.error, close=True))
                self._closed = True
                return
            if isinstance(ex, _TimedOut):
                out.append(ToClient(REQUEST_TIMEOUT))
                out.append(Close(HEADER_TIMEOUT))
                self._closed = True
                return
            out.append(ToClient(ex.reply))
            out.append(Reply(ex.key, {"status": 403}))
            if ex.last:
                self._end_after_last(out)
                return
            if ex.close:
                self._closed = True
                out.append(Close("denied request ends the connection"))
                return
