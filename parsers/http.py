"""The ``http`` parser family: HTTP/1.1 and HTTP/2 (h2c) on the same port.

``HttpEngine`` looks at the client's first bytes. The HTTP/2 connection
preface (prior knowledge, RFC 9113 §3.3) selects ``H2Engine``; anything else
is HTTP/1.x for ``Http1Engine``, which hands an accepted ``Upgrade: h2c``
(RFC 7540 §3.2) back to us so the rest of the connection is HTTP/2 too,
judged stream by stream like any other.
"""

from __future__ import annotations

from functools import partial

from parsers.base import DEFAULT_MAX_PENDING, Close, Command, Decide, EngineFactory, TimeLimit
from parsers.http1.engine import Http1Engine
from parsers.http1.memo import HeadMemory
from parsers.http2.engine import PREFACE, H2Engine
from parsers.requests import HttpRequest

__all__ = ["HttpEngine"]

MAX_EARLY_SERVER_BYTES = 16 * 1024


class HttpEngine:
    protocol = "http"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    # Until the client's first bytes choose the engine (class attributes: read once
    # or twice per connection before that, and not stored for each one).
    _inner: H2Engine | Http1Engine | None = None
    _head = b""  # a possible preface prefix, until it is decided
    # An HTTP/2 server may send its SETTINGS as soon as it accepts, before
    # the client has said anything: those bytes are kept for the chosen engine.
    _server_early = b""
    _finishing = False  # finish() came before the version was known

    def __init__(
        self,
        decide: Decide,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        heads: HeadMemory | None = None,
    ) -> None:
        self._decide = decide
        self._max_pending = max_pending
        self._heads = heads  # HTTP/1.1 heads shared with other connections (``sharing``)

    @classmethod
    def sharing(cls) -> EngineFactory:
        """A factory of engines whose HTTP/1.1 heads are remembered together: one
        ``HeadMemory`` for all the connections of the proxy that calls this, so a new
        connection's first request and response heads are most often known already."""
        return partial(cls, heads=HeadMemory())

    @property
    def reading_headers(self) -> bool:
        if self._inner is None:
            return bool(self._head)
        return self._inner.reading_headers

    @property
    def reading_body(self) -> bool:
        return self._inner is not None and self._inner.reading_body

    @property
    def heads_read(self) -> int:
        return 0 if self._inner is None else self._inner.heads_read

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        inner = self._inner
        out: list[Command] = []
        if inner is None:
            # The first bytes are a prefix of the HTTP/2 preface. From "PRI" on no
            # HTTP/1.1 method fits ("P" and "PR" could still be POST or PROPFIND):
            # answer in the protocol the client is most likely speaking.
            head, self._head = self._head, b""
            inner = H2Engine(self._decide) if head.startswith(PREFACE[:3]) else self._http1()
            out += self._chosen(inner)
            if head:
                out += inner.client_data(head)
        return out + inner.client_timed_out(limit)

    def finish(self) -> list[Command]:
        """The chosen engine's ``finish``; before the client's first bytes have chosen
        one, the engine chosen later finishes as soon as it exists."""
        if self._inner is not None:
            return self._inner.finish()
        self._finishing = True
        return []

    def _chosen(self, inner: H2Engine | Http1Engine) -> list[Command]:
        self._inner = inner
        # From here on every read goes to ``inner``: its own methods, bound here,
        # shadow the class's, which would only pass each read on (a call per read).
        self.client_data = inner.client_data  # type: ignore[method-assign]
        self.server_data = inner.server_data  # type: ignore[method-assign]
        return inner.finish() if self._finishing else []

    @property
    def version(self) -> str:
        """Either "2" or "1.1" once the client's first bytes have decided it ("" before)."""
        if self._inner is None:
            return ""
        return "2" if isinstance(self._inner, H2Engine) else "1.1"

    def client_data(self, data: bytes) -> list[Command]:
        inner = self._inner
        if inner is not None:
            return inner.client_data(data)
        if not data and not self._head and not self._server_early:
            # Gone before a byte (a port scan, a TCP health check): no version to
            # choose, nothing owed either way.
            return [Close("client left before its first request")]
        head = self._head + data if self._head else data
        if data and len(head) < len(PREFACE) and PREFACE.startswith(head):
            self._head = head
            return []
        self._head = b""
        inner = H2Engine(self._decide) if head.startswith(PREFACE) else self._http1()
        out = self._chosen(inner)
        if head:
            out += inner.client_data(head)
        if not data:
            out += inner.client_data(b"")
        if self._server_early:
            early, self._server_early = self._server_early, b""
            out += inner.server_data(early)
        return out

    def server_data(self, data: bytes) -> list[Command]:
        inner = self._inner
        if inner is not None:
            return inner.server_data(data)
        if data and len(self._server_early) + len(data) <= MAX_EARLY_SERVER_BYTES:
            self._server_early += data
            return []
        # EOF, or far more than a SETTINGS frame: HTTP/1.1 judges (and rejects) it.
        inner = self._http1()
        out = self._chosen(inner)
        early, self._server_early = self._server_early + data, b""
        if early:
            out += inner.server_data(early)
        if not data:
            out += inner.server_data(b"")
        if self._head:
            head, self._head = self._head, b""
            out += inner.client_data(head)
        return out

    def _http1(self) -> Http1Engine:
        # The handler holds the decide function, not this engine: an engine that
        # held its own holder would be a reference cycle, freed late.
        return Http1Engine(
            self._decide,
            upgrade_handler=partial(upgrade_to_h2c, self._decide),
            max_pending=self._max_pending,
            heads=self._heads,
        )


def upgrade_to_h2c(decide: Decide, request: HttpRequest) -> H2Engine | None:
    """Called by Http1Engine after the server's 101 to an allowed Upgrade request."""
    tokens = {t.strip().lower() for v in request.header_values("upgrade") for t in v.split(",")}
    settings = request.header_values("http2-settings")
    if "h2c" not in tokens or len(settings) != 1:
        return None  # another protocol (websocket, ...): a byte tunnel
    return H2Engine(decide, upgrade_settings=settings[0].strip().encode("latin-1"))
