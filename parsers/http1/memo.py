"""Heads a connection has sent before: the parse step's memory.

Keep-alive clients repeat themselves: the same health check, the same poll,
the same head with a new id in the path. Parsing a head is a pure function of
its bytes (and, for a response, of the method of the request it answers), so
a head seen before on this connection, byte for byte, is the same parsed
``MessageHead`` again, without parsing it again.

``RequestHeadMemo`` and ``ResponseHeadMemo`` follow the head parser contract
of ``parsers.http1.head`` and sit in front of either implementation, inside
the reader: everything after the parse step (framing, judging, forwarding,
replies, flow records) is the same code for a remembered head as for a new one.
A head that fails to parse is never remembered, so its error is raised again
by the parser itself.

Each memo holds at most ``MEMO_SIZE`` heads of at most ``MAX_REMEMBERED_HEAD``
bytes (cleared when full), so a connection's memory stays bounded.
"""

from __future__ import annotations

import re
from typing import Literal

from parsers.http1.head import FrontParser, MessageHead, RequestHeadParser, ResponseHeadParser

__all__ = [
    "MAX_REMEMBERED_HEAD",
    "MEMO_REST",
    "MEMO_REST_MAX",
    "MEMO_SIZE",
    "SIMPLE_TARGET",
    "RequestHeadMemo",
    "ResponseHeadMemo",
]

MEMO_SIZE = 32  # distinct heads remembered per connection and direction
MAX_REMEMBERED_HEAD = 8192  # longer heads are parsed every time
# New heads not remembered after MEMO_SIZE that were never found again.
MEMO_REST = 4 * MEMO_SIZE
# Each rest after another that found nothing either is twice as long, up to this.
MEMO_REST_MAX = 64 * MEMO_REST
# Origin-form targets a known request shape may take without a full parse: a strict
# subset of what both head parsers accept (tests/parsers/http1/test_http1_repeat.py
# checks it), with no "://" so the target can never read as an absolute URI.
SIMPLE_TARGET = re.compile(rb"/(?:[A-Za-z0-9._~!$&'()*+,;=:/?\-]|%[0-9A-Fa-f]{2})*")


def _simple_target(raw: bytes, start: int, end: int) -> bool:
    return SIMPLE_TARGET.fullmatch(raw, start, end) is not None and raw.find(b"://", start, end) < 0


class RequestHeadMemo(FrontParser):
    """A request head parser that remembers.

    Two memories: heads by their exact bytes, and request *shapes*: a head that
    differs from a known one only in its origin-form target (``GET /items/1``,
    ``GET /items/2``, ...) is the known head with the new target, when the new
    target is a ``SIMPLE_TARGET``.

    A connection whose heads never repeat (a request id or a token in every head)
    would pay for remembering each one for nothing: when the memory fills up without
    one head found again, the next ``MEMO_REST`` new heads are not remembered; then
    the memo tries again. Each time it tries in vain, its next rest is twice as long
    (up to ``MEMO_REST_MAX``), so such a connection remembers almost nothing; a head
    found again brings the rest back to ``MEMO_REST``.
    """

    side: Literal["client"] = "client"

    def __init__(self, parser: RequestHeadParser) -> None:
        super().__init__(parser)
        self._parser = parser
        self._heads: dict[bytes, MessageHead] = {}
        # (method, bytes after the target) -> a head parsed in full with a simple target
        self._shapes: dict[tuple[bytes, bytes], MessageHead] = {}
        self._found = 0  # heads found since the memory was last cleared
        self._resting = 0  # new heads still to go unremembered
        self._next_rest = MEMO_REST  # how long the next rest is

    def complete(self, head: bytes) -> MessageHead:
        known = self._heads.get(head)
        if known is None and self._shapes:
            known = self._with_new_target(head)
        if known is not None:
            self._found += 1
            if self._partial:
                self.reset()  # what the parser's own ``complete`` would have done
            return known
        self._partial = False
        parsed = self._parser.complete(head)
        if self._resting:
            self._resting -= 1
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
            if len(self._shapes) >= MEMO_SIZE:
                self._shapes.clear()
            self._shapes[(raw[:sp1], raw[sp2:])] = head

    def _remember_bytes(self, raw: bytes, head: MessageHead) -> bool:
        if len(raw) > MAX_REMEMBERED_HEAD:
            return False
        if len(self._heads) >= MEMO_SIZE:
            self._heads.clear()
            if not self._found:  # MEMO_SIZE heads, none of them seen again
                self._shapes.clear()
                self._resting = self._next_rest
                self._next_rest = min(2 * self._next_rest, MEMO_REST_MAX)
                return False
            self._found = 0
            self._next_rest = MEMO_REST
        self._heads[raw] = head
        return True


class ResponseHeadMemo(FrontParser):
    """A response head parser that remembers heads by request method and exact bytes."""

    side: Literal["server"] = "server"

    def __init__(self, parser: ResponseHeadParser) -> None:
        super().__init__(parser)
        self._parser = parser
        self._heads: dict[tuple[str, bytes], MessageHead] = {}

    def complete(self, head: bytes, request_method: str = "GET") -> MessageHead:
        key = (request_method, head)
        known = self._heads.get(key)
        if known is not None:
            if self._partial:
                self.reset()
            return known
        self._partial = False
        parsed = self._parser.complete(head, request_method)
        if len(head) <= MAX_REMEMBERED_HEAD:
            if len(self._heads) >= MEMO_SIZE:
                self._heads.clear()
            self._heads[key] = parsed
        return parsed
