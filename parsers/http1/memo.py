"""Heads sent before: the parse step's memory.

Keep-alive clients repeat themselves: the same health check, the same poll,
the same head with a new id in the path. So do new connections: the same
client library's request, the same server's answer. Parsing a head is a pure
function of its bytes (and, for a response, of the method of the request it
answers), so a head seen before, byte for byte, is the same parsed
``MessageHead`` again, without parsing it again.

``RequestHeadMemo`` and ``ResponseHeadMemo`` follow the head parser contract
of ``parsers.http1.head`` and sit in front of either implementation, inside
the reader: everything after the parse step (framing, judging, forwarding,
replies, flow records) is the same code for a remembered head as for a new one.
A head that fails to parse is never remembered, so its error is raised again
by the parser itself. What the engine derives from a head (the request ``decide``
sees, the bytes forwarded) is kept with it, so it is not made again either.

What they remember is a ``RequestHeads`` and a ``ResponseHeads``: one connection's
own (at most ``MEMO_SIZE`` heads each), or, given by the proxy, those of a
``HeadMemory`` that all of its connections share (``SHARED_MEMO_SIZE`` each):
then a new connection's first request and first response, the ones every
connection has, are found too. A shared head is never changed by anyone (what is
derived from it is a pure function of it), so sharing it changes no byte on the
wire. Heads are at most ``MAX_REMEMBERED_HEAD`` bytes, and a memory that is full
is cleared, so memory stays bounded: a few MiB for a shared one at the worst.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from parsers.http1.head import FrontParser, MessageHead, RequestHeadParser, ResponseHeadParser

__all__ = [
    "MAX_REMEMBERED_HEAD",
    "SHARED_MEMO_BYTES",
    "SHARED_MEMO_SIZE",
    "HeadMemory",
    "RequestHeads",
    "ResponseHeads",
    "MEMO_REST",
    "MEMO_REST_MAX",
    "MEMO_SIZE",
    "SIMPLE_TARGET",
    "RequestHeadMemo",
    "ResponseHeadMemo",
]

MEMO_SIZE = 32  # distinct heads remembered per connection and direction
# ... and by a proxy's shared memory, per direction: room for the first heads of many
# clients and servers (a Date field makes a server's answers new heads every second),
# and at most this many bytes of heads (typical heads of a few hundred bytes never
# reach it; heads of many fields take ~10x their size parsed, so this bounds that).
SHARED_MEMO_SIZE = 256
SHARED_MEMO_BYTES = 256 * 1024
MAX_REMEMBERED_HEAD = 8192  # longer heads are parsed every time
# New heads not remembered after a memory's worth that were never found again: this
# many memories' worth (``RequestHeads.rest``).
REST_FACTOR = 4
# Each rest after another that found nothing either is twice as long, up to this many
# first rests.
REST_MAX_FACTOR = 64
# What those are for one connection's memory.
MEMO_REST = REST_FACTOR * MEMO_SIZE
MEMO_REST_MAX = REST_MAX_FACTOR * MEMO_REST
# Origin-form targets a known request shape may take without a full parse: a strict
# subset of what both head parsers accept (tests/parsers/http1/test_http1_repeat.py
# checks it), with no "://" so the target can never read as an absolute URI.
SIMPLE_TARGET = re.compile(rb"/(?:[A-Za-z0-9._~!$&'()*+,;=:/?\-]|%[0-9A-Fa-f]{2})*")


def _simple_target(raw: bytes, start: int, end: int) -> bool:
    return SIMPLE_TARGET.fullmatch(raw, start, end) is not None and raw.find(b"://", start, end) < 0


class RequestHeads:
    """What ``RequestHeadMemo`` remembers: heads by their exact bytes, request shapes,
    and how its rests go (below). Made per connection by a memo given none, or once
    per proxy in a ``HeadMemory``, for all of its connections. Each of the two is
    full at ``size`` heads or ``max_bytes`` bytes of them, and then cleared."""

    __slots__ = (
        "size",
        "max_bytes",
        "heads",
        "heads_bytes",
        "shapes",
        "shapes_bytes",
        "found",
        "resting",
        "next_rest",
        "rest",
        "rest_max",
    )

    def __init__(self, size: int = MEMO_SIZE, max_bytes: int | None = None) -> None:
        self.size = size  # distinct heads (and shapes) at the most
        self.max_bytes = size * MAX_REMEMBERED_HEAD if max_bytes is None else max_bytes
        self.heads: dict[bytes, MessageHead] = {}
        self.heads_bytes = 0  # the bytes of the heads in ``heads``
        # (method, bytes after the target) -> a head parsed in full with a simple target
        self.shapes: dict[tuple[bytes, bytes], MessageHead] = {}
        self.shapes_bytes = 0  # the bytes of the heads in ``shapes``
        self.found = 0  # heads found since the memory was last cleared
        self.resting = 0  # new heads still to go unremembered
        self.rest = REST_FACTOR * size
        self.rest_max = REST_MAX_FACTOR * self.rest
        self.next_rest = self.rest  # how long the next rest is


class ResponseHeads:
    """What ``ResponseHeadMemo`` remembers: heads by request method and exact bytes,
    ``size`` of them or ``max_bytes`` bytes at the most."""

    __slots__ = ("size", "max_bytes", "heads", "heads_bytes")

    def __init__(self, size: int = MEMO_SIZE, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = size * MAX_REMEMBERED_HEAD if max_bytes is None else max_bytes
        self.heads: dict[tuple[str, bytes], MessageHead] = {}
        self.heads_bytes = 0


class HeadMemory:
    """The heads the HTTP/1.1 connections of one proxy share: made by the proxy (never
    a module global: each proxy, and each test, has its own) and handed to each
    connection's engine through its factory (``parsers.http.HttpEngine.sharing``)."""

    __slots__ = ("requests", "responses")

    def __init__(self, size: int = SHARED_MEMO_SIZE, max_bytes: int = SHARED_MEMO_BYTES) -> None:
        self.requests = RequestHeads(size, max_bytes)
        self.responses = ResponseHeads(size, max_bytes)


class RequestHeadMemo(FrontParser[RequestHeadParser]):
    """A request head parser that remembers (in ``memory``, or in its own).

    Two memories: heads by their exact bytes, and request *shapes*: a head that
    differs from a known one only in its origin-form target (``GET /items/1``,
    ``GET /items/2``, ...) is the known head with the new target, when the new
    target is a ``SIMPLE_TARGET``.

    Heads that never repeat (a request id or a token in every head) would cost
    remembering each one for nothing: when the memory fills up without one head
    found again, the next ``rest`` new heads (``MEMO_REST`` for one connection's
    memory) are not remembered; then the memo tries again. Each time it tries in
    vain, its next rest is twice as long (up to ``rest_max``), so such traffic is
    almost never remembered; a head found again brings the rest back to ``rest``.

    ``make`` makes the parser of the heads not remembered, when the first one comes.
    ``scan``, the C head scanner that parser (a ``QuickRequestHead``) tries first, is
    tried before the shapes: it reads a plain head in one pass, in less time than a
    shape is found and its head rebuilt, so only heads it does not read (a body's
    Content-Length, fields outside its subset) are remembered as shapes. A head it
    refuses goes on to the parser's ``after_scan``, so it is not scanned twice.
    """

    side: Literal["client"] = "client"

    def __init__(
        self,
        make: Callable[[], RequestHeadParser],
        memory: RequestHeads | None = None,
        scan: Callable[[bytes], MessageHead | None] | None = None,
    ) -> None:
        # (``FrontParser.__init__`` with ``make``, inline: two readers per connection.)
        self._partial = False
        self._make = make
        memory = self._memory = memory if memory is not None else RequestHeads()
        # (The dictionaries are cleared, never replaced: held here, a lookup less.)
        self._heads = memory.heads
        self._shapes = memory.shapes
        self._scan = scan

    def complete(self, head: bytes) -> MessageHead:
        known = self._heads.get(head)
        memory = self._memory
        scan = self._scan
        if known is None:
            if scan is not None and (scanned := scan(head)) is not None:
                # What the parser behind would return, the scanner being its first
                # step: remembered by its bytes, never as a shape.
                if self._partial:
                    self.reset()
                if memory.resting:
                    memory.resting -= 1
                else:
                    self._remember_bytes(head, scanned)
                return scanned
            if self._shapes:
                known = self._with_new_target(head)
        if known is not None:
            memory.found += 1
            if self._partial:
                self.reset()  # what the parser's own ``complete`` would have done
            return known
        self._partial = False
        behind = self._parser_behind()
        parsed: MessageHead
        if scan is not None:  # behind is the quick read this scanner starts, which said no
            parsed = behind.after_scan(head)  # type: ignore[attr-defined]
        else:
            parsed = behind.complete(head)
        if memory.resting:
            memory.resting -= 1
        else:
            self._remember(head, parsed)
        return parsed

    def _with_new_target(self, raw: bytes) -> MessageHead | None:
        sp1 = raw.find(b" ", 0, 24)
        if sp1 <= 0:
            return None
        sp2 = raw.find(b" ", sp1 + 1)
        if sp2 < 0:
            return None
        shape = self._shapes.get((raw[:sp1], raw[sp2:]))
        if shape is None or not _simple_target(raw, sp1 + 1, sp2):
            return None
        # Not remembered by its bytes: a new target per request is the point of a
        # shape, and remembering each would only push out the heads that repeat.
        return shape.with_target(raw[sp1 + 1 : sp2].decode("ascii"), raw)

    def _remember(self, raw: bytes, head: MessageHead) -> None:
        if not self._remember_bytes(raw, head):
            return
        sp1 = len(head.method)
        sp2 = sp1 + 1 + len(head.target)
        if head.wire is not None:
            # Read by ``parsers.http1.quick``, whose targets are all SIMPLE_TARGETs.
            simple = True
        else:
            # Both parsers require ``method SP target SP version``: the target sits at
            # sp1 + 1.
            simple = (
                raw[sp1 : sp1 + 1] == b" "
                and raw[sp2 : sp2 + 1] == b" "
                and _simple_target(raw, sp1 + 1, sp2)
            )
        if simple:
            memory = self._memory
            size = len(raw)
            if len(self._shapes) >= memory.size or memory.shapes_bytes + size > memory.max_bytes:
                self._shapes.clear()
                memory.shapes_bytes = 0
            self._shapes[(raw[:sp1], raw[sp2:])] = head
            memory.shapes_bytes += size

    def _remember_bytes(self, raw: bytes, head: MessageHead) -> bool:
        size = len(raw)
        if size > MAX_REMEMBERED_HEAD:
            return False
        memory = self._memory
        if len(self._heads) >= memory.size or memory.heads_bytes + size > memory.max_bytes:
            self._heads.clear()
            memory.heads_bytes = 0
            if not memory.found:  # a memory full of heads, none of them seen again
                self._shapes.clear()
                memory.shapes_bytes = 0
                memory.resting = memory.next_rest
                memory.next_rest = min(2 * memory.next_rest, memory.rest_max)
                return False
            memory.found = 0
            memory.next_rest = memory.rest
        self._heads[raw] = head
        memory.heads_bytes += size
        return True


class ResponseHeadMemo(FrontParser[ResponseHeadParser]):
    """A response head parser that remembers heads by request method and exact bytes
    (in ``memory``, or in its own); ``make`` as for ``RequestHeadMemo``."""

    side: Literal["server"] = "server"

    def __init__(
        self, make: Callable[[], ResponseHeadParser], memory: ResponseHeads | None = None
    ) -> None:
        # (``FrontParser.__init__`` with ``make``, inline.)
        self._partial = False
        self._make = make
        memory = self._memory = memory if memory is not None else ResponseHeads()
        self._heads = memory.heads

    def complete(self, head: bytes, request_method: str = "GET") -> MessageHead:
        key = (request_method, head)
        known = self._heads.get(key)
        if known is not None:
            if self._partial:
                self.reset()
            return known
        self._partial = False
        parsed = self._parser_behind().complete(head, request_method)
        size = len(head)
        if size <= MAX_REMEMBERED_HEAD:
            memory = self._memory
            if len(self._heads) >= memory.size or memory.heads_bytes + size > memory.max_bytes:
                self._heads.clear()
                memory.heads_bytes = 0
            self._heads[key] = parsed
            memory.heads_bytes += size
        return parsed
