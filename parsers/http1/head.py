"""HTTP/1.x message heads: the parsed form, the pure-Python parser, and the
framing rules both parsers share.

A head parser turns the bytes of one head (start line, field lines, the
empty line) into a ``MessageHead``. Two implementations follow one contract
(``parsers.http1.fast`` is the llhttp one):

    parser = PyRequestHead()            # one object per reader, reused
    parser.partial(buf)                 # optional: check an incomplete head early
    head = parser.complete(head_bytes)  # -> MessageHead, or a typed Http1Error

``complete`` ends with ``frame_request``/``frame_response`` here, so how a
body is delimited (and every smuggling rule) is decided in one place for
both implementations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from parsers.fastnew import fast_new
from parsers.http1.errors import AmbiguousFraming, Http1Error, MalformedMessage

# llhttp's list of HTTP (not RTSP/ICE) methods. A proxy judging requests by
# method must not forward one it cannot name; llhttp refuses the rest, so
# the pure-Python parser refuses them too and both agree.
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND "
    b"PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE "
    b"M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE "
    b"QUERY".split()
)

METHOD_PREFIXES = frozenset(m[:i] for m in KNOWN_METHODS for i in range(len(m) + 1))

# Content codings a request may carry before ``chunked``; anything else is
# refused rather than forwarded to a server that might read it differently.
KNOWN_CODINGS = frozenset({"chunked", "gzip", "x-gzip", "deflate", "compress", "x-compress"})

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
FIELD_VALUE_CHARS = rb"[\t\x20-\x7e\x80-\xff]"
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (" + FIELD_VALUE_CHARS + rb"*))?")
FIELD_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(" + FIELD_VALUE_CHARS + rb"*?)[ \t]*")
# What an unfinished line may look like and still become valid.
_VERSION_PREFIX = rb"(?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?"
REQUEST_PREFIX = re.compile(
    rb"(" + TOKEN + rb")?(?:( )(?:([\x21-\x7e]+)( " + _VERSION_PREFIX + rb")?)?)?"
)
STATUS_PREFIX = re.compile(
    _VERSION_PREFIX + rb"|HTTP/1\.[01](?: [0-9]{0,3}(?: " + FIELD_VALUE_CHARS + rb"*)?)?\r?"
)
CONNECTION_OPTION = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]*")  # lower-cased token, or empty
TOKEN_RUN = re.compile(TOKEN.replace(b"]+", b"]*"))
VALUE_RUN = re.compile(FIELD_VALUE_CHARS + rb"*")
TARGET_RUN = re.compile(rb"[\x21-\x7e]*")


def _run_end(run: re.Pattern[bytes], buf: bytes | bytearray, start: int, stop: int) -> int:
    """Where a ``*`` pattern's match from ``start`` ends (it always matches)."""
    match = run.match(buf, start, stop)
    return start if match is None else match.end()


CONTENT_LENGTH = re.compile(rb"[ \t]*([0-9]+)[ \t]*")

# Request-target forms (RFC 9112 section 3.2). A fragment is never part of
# a target; a userinfo in an http(s) URI is treated as an error (RFC 9110 4.2.4).
ORIGIN_FORM = re.compile(r"/[!$&'()*+,;=:@%/?A-Za-z0-9._~\-\"\\|\[\]{}^`<>]*")
ABSOLUTE_FORM = re.compile(
    r"(?i:https?)://(?:[A-Za-z0-9._~\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"(?:[/?][!$&'()*+,;=:@%/?A-Za-z0-9._~\-\"\\|\[\]{}^`<>]*)?"
)
AUTHORITY_FORM = re.compile(r"(?:[A-Za-z0-9._~\-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")

# uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2); empty is allowed.
HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%\-]+|\[[0-9A-Fa-f:.]+\])?(?::[0-9]{0,5})?")

MAX_CONTENT_LENGTH = 2**63 - 1


class RequestFields(NamedTuple):
    """What a request head's field lines give the engine (``MessageHead.derived_fields``,
    made by ``parsers.http1.engine.request_field_facts``, or by the C quick scanner
    with the head): pure functions of the fields and the framing (heads that share a
    field list share the framing too). (A named tuple, as the engine's ``RequestForm``:
    one is made per new head, and a frozen dataclass costs a call per field to build.)"""

    headers: tuple[tuple[str, str], ...]  # ``HttpRequest.headers``: names lower-cased
    host: str  # the first Host value, "" without one
    has_host: bool
    # ``request_fields(head)``: forwarded when no edits are asked for; None when the
    # head's own bytes are forwarded (``MessageHead.wire``: then so are those of every
    # head that shares its field list).
    section: bytes | None


@dataclass(slots=True)
class MessageHead:
    """One parsed request or response head.

    ``headers`` keeps wire order and the sender's spelling of names; values
    have surrounding whitespace removed. ``framing`` is how the body is
    delimited: ``"none"``, ``"length"`` (``length`` bytes), ``"chunked"`` or
    ``"close"`` (a response read until the server closes).
    """

    method: str = ""
    target: str = ""
    status: int = 0
    reason: str = ""
    version: str = "1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 0
    framing: str = "none"
    length: int = 0
    codings: tuple[str, ...] = ()  # transfer codings before "chunked"
    keep_alive: bool = True
    upgrade: bool = False  # request asks to switch protocols (Upgrade or CONNECT)
    expect_continue: bool = False
    # What the engine derives from this head, kept with it: a head the memo hands
    # out again is this same object, so the work is done once per distinct head.
    # ``derived``: the forwarded form (a request's ``RequestForm``, a response's
    # bytes); ``derived_fields``: what the field lines give (``RequestFields``),
    # shared with heads made by ``with_target`` (they share the field list).
    derived: Any = field(default=None, compare=False, repr=False)
    derived_fields: Any = field(default=None, compare=False, repr=False)
    # A request head's own bytes when they are exactly what the engine would write
    # for it (``parsers.http1.quick``): forwarded as they are. None: re-serialised.
    wire: bytes | None = field(default=None, compare=False, repr=False)

    def values(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def with_target(self, target: str, raw: bytes) -> MessageHead:
        """This request head with another target, read from ``raw``: a known request
        shape with a new target (``parsers.http1.memo``). Written out field by field
        (in order) because ``dataclasses.replace`` costs more than the rest of a repeat;
        the field list (the same object) and what was derived from it are shared.
        ``raw`` differs from this head's bytes only in the target, so it is canonical
        (``wire``) if they were. Tests compare it with ``replace``."""
        return new_message_head(
            self.method,
            target,
            self.status,
            self.reason,
            self.version,
            self.headers,
            len(raw),
            self.framing,
            self.length,
            self.codings,
            self.keep_alive,
            self.upgrade,
            self.expect_continue,
            None,
            self.derived_fields,
            None if self.wire is None else raw,
        )


# Built for every new head (``parsers.fastnew``: a fifth of the time of the call).
new_message_head = fast_new(MessageHead)


class RequestHeadParser(Protocol):
    """The request side of the contract above (``PyRequestHead``, ``CRequestHead``)."""

    @property
    def side(self) -> Literal["client"]: ...

    def partial(self, buf: bytes | bytearray) -> None: ...

    def reset(self) -> None: ...

    def complete(self, head: bytes) -> MessageHead: ...


class ResponseHeadParser(Protocol):
    """The response side: how a response is framed depends on the request's method."""

    @property
    def side(self) -> Literal["server"]: ...

    def partial(self, buf: bytes | bytearray) -> None: ...

    def reset(self) -> None: ...

    def complete(self, head: bytes, request_method: str = "GET") -> MessageHead: ...


class _Unfinished(Protocol):
    def partial(self, buf: bytes | bytearray) -> None: ...
    def reset(self) -> None: ...


P = TypeVar("P", bound=_Unfinished)


class FrontParser(Generic[P]):
    """A head parser in front of another (a memo, the quick read): an unfinished head
    goes to the other one, which keeps its state until the head is complete.

    The other one is ``parser``, or made by ``make`` when it is first needed: a memo
    that knows every head of a connection never makes one (a parser costs dozens of
    Python steps to make, and a connection its first head)."""

    def __init__(self, parser: P | None = None, *, make: Callable[[], P] | None = None) -> None:
        self._partial = False  # the parser has state from an unfinished head
        self._behind = parser
        self._make = make

    # (What ``__init__`` sets, for a subclass made per connection that sets only
    # ``_partial`` and ``_make`` itself, without the call: its parser is made later.)
    _behind: P | None = None

    def _parser_behind(self) -> P:
        parser = self._behind
        if parser is None:
            assert self._make is not None  # one of the two is given
            parser = self._behind = self._make()
        return parser

    def partial(self, buf: bytes | bytearray) -> None:
        self._partial = True
        self._parser_behind().partial(buf)

    def reset(self) -> None:
        self._partial = False
        if self._behind is not None:  # (none made: no state to drop)
            self._behind.reset()


# --------------------------------------------------------------------------
# Shared framing semantics (RFC 9112 section 6).


FRAMING_NAMES = frozenset(
    {b"connection", b"content-length", b"transfer-encoding", b"host", b"upgrade", b"expect"}
)


def framing_fields(head: MessageHead) -> dict[bytes, list[bytes]]:
    """The few fields that frame or route a message, in one pass."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in head.headers:
        key = name.lower()
        if key in FRAMING_NAMES:
            found.setdefault(key, []).append(value)
    return found


_NO_TOKENS: frozenset[str] = frozenset()


def _connection_tokens(values: list[bytes], side: str = "server") -> set[str]:
    tokens: set[str] = set()
    for value in values:
        tokens.update(t.strip(" \t").lower() for t in value.decode("latin-1").split(","))
    if side == "client" and not all(CONNECTION_OPTION.fullmatch(t) for t in tokens):
        # Connection is a list of tokens; servers that search it for "close"
        # as a substring would keep a different connection than we do.
        raise MalformedMessage("invalid Connection option", code="invalid_connection", side=side)
    return tokens


def _content_length(values: list[bytes] | None, side: str) -> int | None:
    if not values:
        return None
    if len(values) > 1:
        raise AmbiguousFraming(
            "more than one Content-Length", code="duplicate_content_length", side=side
        )
    match = CONTENT_LENGTH.fullmatch(values[0])
    if match is None:
        raise AmbiguousFraming("invalid Content-Length", code="invalid_content_length", side=side)
    length = int(match.group(1))
    if length > MAX_CONTENT_LENGTH:
        raise AmbiguousFraming("Content-Length overflows", code="invalid_content_length", side=side)
    return length


def _transfer_codings(values: list[bytes] | None, side: str) -> list[str] | None:
    if not values:
        return None
    codings: list[str] = []
    for value in values:
        codings.extend(p.strip(" \t").lower() for p in value.decode("latin-1").split(","))
    if side == "client" and "" in codings:
        # Empty list elements are legal (RFC 9110 5.6.1) but parsers differ
        # on them (h11 refuses): a request that has them is refused.
        raise AmbiguousFraming("empty element in Transfer-Encoding", code="te_empty", side=side)
    return [c for c in codings if c]


def frame_request(
    head: MessageHead,
    fields: dict[bytes, list[bytes]] | None = None,
    *,
    target_checked: bool = False,
) -> MessageHead:
    """Decide how the request body is delimited, refusing anything ambiguous.
    ``fields``: what ``framing_fields(head)`` gives, if the caller has it already;
    ``target_checked``: the caller has read the target with a stricter rule than
    ``_check_target``'s (``parsers.http1.quick``)."""
    side = "client"
    if fields is None:
        fields = framing_fields(head)
    connection = fields.get(b"connection")
    tokens = _connection_tokens(connection, side) if connection is not None else _NO_TOKENS
    if head.version == "1.1":
        head.keep_alive = "close" not in tokens
    else:
        head.keep_alive = "keep-alive" in tokens and "close" not in tokens
    hosts = fields.get(b"host")
    if hosts:
        if len(hosts) > 1:
            raise AmbiguousFraming("more than one Host", code="duplicate_host", side=side)
        if HOST_VALUE.fullmatch(hosts[0]) is None:
            # Host-based rules must see one well-formed authority (RFC 9110 7.2).
            raise MalformedMessage("invalid Host", code="invalid_host", side=side)
    # (Each helper is called only when its field is there: most requests have neither.)
    length_values = fields.get(b"content-length")
    length = _content_length(length_values, side) if length_values is not None else None
    te_values = fields.get(b"transfer-encoding")
    codings = _transfer_codings(te_values, side) if te_values is not None else None
    if head.method == "CONNECT":
        # A CONNECT request has no content (RFC 9110 9.3.6); as llhttp does,
        # what follows the head belongs to the tunnel, whatever it announces.
        codings = length = None
    if codings is not None:
        if length is not None:
            raise AmbiguousFraming(
                "both Content-Length and Transfer-Encoding", code="cl_and_te", side=side
            )
        if head.version != "1.1":
            raise AmbiguousFraming(
                "Transfer-Encoding in an HTTP/1.0 request", code="te_http10", side=side
            )
        if not codings or codings[-1] != "chunked":
            raise AmbiguousFraming(
                "final transfer coding is not chunked", code="te_not_chunked", side=side
            )
        if codings.count("chunked") != 1:
            raise AmbiguousFraming(
                "chunked applied more than once", code="te_chunked_twice", side=side
            )
        unknown = [c for c in codings if c not in KNOWN_CODINGS]
        if unknown:
            raise AmbiguousFraming(
                f"unknown transfer coding {unknown[0]!r}", code="te_unknown", side=side
            )
        if len(codings) > 1:
            # Known but not supported by common servers (nginx answers 501, h11
            # refuses): a request body is only ever forwarded as plain chunked.
            raise AmbiguousFraming(
                f"transfer coding {codings[0]!r} in a request", code="te_unsupported", side=side
            )
        head.framing, head.codings = "chunked", tuple(codings[:-1])
    elif length:
        head.framing, head.length = "length", length
    if not target_checked:
        _check_target(head)
    head.upgrade = head.method == "CONNECT" or ("upgrade" in tokens and b"upgrade" in fields)
    expect = fields.get(b"expect")
    head.expect_continue = expect is not None and any(v.lower() == b"100-continue" for v in expect)
    return head


def _check_target(head: MessageHead) -> None:
    target, method = head.target, head.method
    if method == "CONNECT":
        ok = AUTHORITY_FORM.fullmatch(target) is not None
    elif target == "*":
        ok = method == "OPTIONS"
    elif target.startswith("/"):
        ok = ORIGIN_FORM.fullmatch(target) is not None
    else:
        ok = ABSOLUTE_FORM.fullmatch(target) is not None
    if not ok:
        raise MalformedMessage(
            f"request target not allowed: {target[:80]!r}", code="invalid_target"
        )


def frame_response(head: MessageHead, request_method: str = "GET") -> MessageHead:
    """Decide how a response body is delimited, given the request it answers."""
    side = "server"
    fields = framing_fields(head)
    tokens = _connection_tokens(fields[b"connection"]) if b"connection" in fields else set()
    if head.version == "1.1":
        head.keep_alive = "close" not in tokens
    else:
        head.keep_alive = "keep-alive" in tokens and "close" not in tokens
    status = head.status
    length = _content_length(fields.get(b"content-length"), side)
    codings = _transfer_codings(fields.get(b"transfer-encoding"), side)
    te_values = fields.get(b"transfer-encoding", ())
    if any(
        not v.strip(b" \t") for v in te_values
    ):  # an empty "Transfer-Encoding:" (llhttp refuses it too)
        raise AmbiguousFraming("empty Transfer-Encoding", code="te_empty", side=side)
    if length is not None and codings is not None:
        raise AmbiguousFraming(
            "both Content-Length and Transfer-Encoding", code="cl_and_te", side=side
        )
    if status < 200 or status in (204, 304) or request_method == "HEAD":
        head.framing = "none"
    elif request_method == "CONNECT" and status < 300:
        head.framing = "none"
    elif codings is not None:
        if codings and codings[-1] == "chunked":
            if codings.count("chunked") != 1:
                raise AmbiguousFraming(
                    "chunked applied more than once", code="te_chunked_twice", side=side
                )
            head.framing, head.codings = "chunked", tuple(codings[:-1])
        else:
            # RFC 9112 6.3: a response whose final coding is not chunked
            # runs until the connection closes.
            head.framing, head.keep_alive = "close", False
    elif length is not None:
        head.framing, head.length = ("length", length) if length else ("none", 0)
    else:
        head.framing, head.keep_alive = "close", False
    return head


# --------------------------------------------------------------------------
# The pure-Python head parser.


def has_bare_cr_or_lf(buf: bytes | bytearray) -> bool:
    """A CR not followed by LF (except a last byte that may be half a CRLF),
    or an LF not preceded by CR. Counting keeps it in C."""
    pairs = buf.count(b"\r\n")
    cr = buf.count(b"\r") - buf.endswith(b"\r")
    return cr != pairs or buf.count(b"\n") != pairs


def explain_line(line: bytes, side: str, what: str = "header") -> Http1Error:
    """Name the rule a rejected line broke (only run on the error path)."""
    if line[:1] in (b" ", b"\t"):
        return MalformedMessage("obsolete line folding", code="obs_fold", side=side)
    if b"\r" in line:
        return MalformedMessage("bare CR", code="bare_cr", side=side)
    if b"\n" in line:
        return MalformedMessage("bare LF", code="bare_lf", side=side)
    name, colon, _ = line.partition(b":")
    if colon and name[-1:] in (b" ", b"\t"):
        return MalformedMessage(
            "whitespace between field name and colon", code="space_before_colon", side=side
        )
    if any(b < 0x20 and b != 9 or b == 0x7F for b in line):
        return MalformedMessage(f"control character in {what}", code="ctl", side=side)
    return MalformedMessage(f"invalid {what} line", code=f"invalid_{what}", side=side)


class _PyHead:
    """Shared line handling for the request and response head parsers."""

    side: Literal["client", "server"] = "client"
    max_lines = 1000

    def __init__(self) -> None:
        self._watch = StartLineWatch()
        self.reset()

    def reset(self) -> None:
        self._checked = 0
        self._lengths = 0
        self._scan = 0  # bytes of the unfinished line already checked
        self._in_value = False  # the unfinished field line is past its colon
        self._watch.reset()

    def partial(self, buf: bytes | bytearray) -> None:
        """Validate the complete lines of an unfinished head, so an error
        shows up as soon as its line has arrived (as llhttp does). Each byte
        is looked at a bounded number of times, however the head is split."""
        pos = self._checked
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = bytes(buf[pos:eol])
            if pos == 0:
                self._start_line(line)
            else:
                self._field_line(line)
            pos = eol + 2
        if pos != self._checked:
            self._checked = pos
            self._scan = 0
            self._in_value = False
        end = len(buf)
        back = pos + max(0, self._scan - 1)  # one byte back: a CR may now have a follower
        if buf.find(b"\n", back) >= 0 or has_bare_cr_or_lf(buf[back:]):
            raise explain_line(bytes(buf[pos:]), self.side, "start" if pos == 0 else "header")
        # The unfinished line must still be able to become a valid line.
        if pos == 0:
            self._start_prefix(buf, end)
        elif end > pos:
            self._field_prefix(buf, pos, pos + self._scan, end)
        self._scan = end - pos

    def _field_prefix(self, buf: bytes | bytearray, line_start: int, start: int, end: int) -> None:
        stop = end - 1 if buf[end - 1] == 13 else end  # a last CR may be half a CRLF
        i = start
        if not self._in_value:
            i = _run_end(TOKEN_RUN, buf, i, stop)
            if i < stop:
                if buf[i] != 58 or i == line_start:  # ":" after a non-empty name
                    raise explain_line(bytes(buf[line_start:end]), self.side)
                self._in_value = True
                i += 1
        if self._in_value and i < stop and _run_end(VALUE_RUN, buf, i, stop) != stop:
            raise explain_line(bytes(buf[line_start:end]), self.side)

    def _start_prefix(self, buf: bytes | bytearray, end: int) -> None:
        pass

    def _field_line(self, line: bytes) -> tuple[bytes, bytes]:
        match = FIELD_LINE.fullmatch(line)
        if match is None:
            raise explain_line(line, self.side)
        name, value = match.groups()
        if self.side == "client" and len(name) == 17 and b"\t" in line[len(line.rstrip(b" \t")) :]:
            if name.lower() == b"transfer-encoding":
                # llhttp refuses HTAB in the trailing whitespace of a request's
                # Transfer-Encoding; so do we, so both parsers agree.
                raise AmbiguousFraming(
                    "HTAB after Transfer-Encoding", code="te_trailing_tab", side=self.side
                )
        if len(name) == 14 and name.lower() == b"content-length":
            self._lengths += 1
            if self._lengths > 1:
                raise AmbiguousFraming(
                    "more than one Content-Length", code="duplicate_content_length", side=self.side
                )
            if not value.isdigit():
                raise AmbiguousFraming(
                    "invalid Content-Length", code="invalid_content_length", side=self.side
                )
            if len(value) > 19 and int(value) > MAX_CONTENT_LENGTH:
                raise AmbiguousFraming(
                    "Content-Length overflows", code="invalid_content_length", side=self.side
                )
        return name, value

    def _fields(self, lines: list[bytes]) -> list[tuple[bytes, bytes]]:
        if len(lines) > self.max_lines:
            raise MalformedMessage("too many header lines", side=self.side)
        self._lengths = 0
        return [self._field_line(line) for line in lines[1:]]

    def _start_line(self, line: bytes) -> object:  # pragma: no cover - overridden
        raise NotImplementedError


def check_request_line_prefix(rest: bytes) -> None:
    """Refuse an unfinished request line as soon as it cannot become valid:
    an unknown method once its space arrived, a target of the wrong form once
    it is complete. Both parsers run it, so they fail at the same point."""
    match = REQUEST_PREFIX.fullmatch(rest)
    if match is None:
        raise MalformedMessage("invalid request line", code="invalid_request_line")
    method = match.group(1) or b""
    if method not in (KNOWN_METHODS if match.group(2) is not None else METHOD_PREFIXES):
        raise MalformedMessage("unknown method", code="invalid_method")
    if match.group(4) is not None:
        _check_target(
            MessageHead(method=method.decode("ascii"), target=match.group(3).decode("ascii"))
        )


class StartLineWatch:
    """Runs ``check_request_line_prefix`` on an unfinished request line in
    time linear in its length, however it is split: while a long target
    streams in, only its new bytes are checked (the rest is unchanged)."""

    __slots__ = ("checked", "spaces")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.checked = 0
        self.spaces = 0

    def check(self, buf: bytes | bytearray, end: int) -> None:
        start = self.checked
        if end <= start:
            return
        spaces = self.spaces + buf.count(b" ", start, end)
        if end > 1024 and self.spaces == 1 and spaces == 1:
            if TARGET_RUN.fullmatch(buf, start, end) is None:
                check_request_line_prefix(bytes(buf[:end]))  # raises, naming the problem
        else:
            check_request_line_prefix(bytes(buf[:end]))
        self.checked, self.spaces = end, spaces


class PyRequestHead(_PyHead):
    side: Literal["client"] = "client"

    def _start_prefix(self, buf: bytes | bytearray, end: int) -> None:
        self._watch.check(buf, end)

    def _start_line(self, line: bytes) -> re.Match[bytes]:
        match = REQUEST_LINE.fullmatch(line)
        if match is not None and match.group(1) in KNOWN_METHODS:
            _check_target(
                MessageHead(
                    method=match.group(1).decode("ascii"), target=match.group(2).decode("ascii")
                )
            )
        if match is None:
            if line.startswith(b" ") or line.count(b" ") != 2:
                raise MalformedMessage("invalid request line", code="invalid_request_line")
            method, _, rest = line.partition(b" ")
            if re.fullmatch(TOKEN, method) is None:
                raise MalformedMessage("invalid method", code="invalid_method")
            raise (
                explain_line(line, "client", "request")
                if not rest.endswith((b"HTTP/1.0", b"HTTP/1.1"))
                else MalformedMessage("invalid request target", code="invalid_target")
            )
        if match.group(1) not in KNOWN_METHODS:
            raise MalformedMessage("unknown method", code="invalid_method")
        return match

    def complete(self, head: bytes) -> MessageHead:
        lines = head[:-4].split(b"\r\n")
        match = self._start_line(lines[0])
        method, target, minor = match.groups()
        msg = new_message_head(
            method=method.decode("ascii"),
            target=target.decode("ascii"),
            version="1.1" if minor == b"1" else "1.0",
            headers=self._fields(lines),
            size=len(head),
        )
        self.reset()
        return frame_request(msg)


class PyResponseHead(_PyHead):
    side: Literal["server"] = "server"

    def _start_prefix(self, buf: bytes | bytearray, end: int) -> None:
        start = self._scan
        if end > 1024 and start > 0:
            # Deep in the reason phrase: only the new bytes can be wrong.
            stop = end - 1 if buf[end - 1] == 13 else end
            ok = _run_end(VALUE_RUN, buf, start, stop) == stop
        else:
            ok = STATUS_PREFIX.fullmatch(buf, 0, end) is not None
        if not ok:
            raise MalformedMessage("invalid status line", code="invalid_status_line", side="server")

    def _start_line(self, line: bytes) -> re.Match[bytes]:
        match = STATUS_LINE.fullmatch(line)
        if match is None:
            raise MalformedMessage("invalid status line", code="invalid_status_line", side="server")
        return match

    def complete(self, head: bytes, request_method: str = "GET") -> MessageHead:
        lines = head[:-4].split(b"\r\n")
        match = self._start_line(lines[0])
        minor, status, reason = match.groups()
        msg = new_message_head(
            status=int(status),
            reason=(reason or b"").decode("latin-1"),
            version="1.1" if minor == b"1" else "1.0",
            headers=self._fields(lines),
            size=len(head),
        )
        self.reset()
        return frame_response(msg, request_method)
