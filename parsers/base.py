"""The one contract every protocol engine in ``parsers`` follows.

An engine is sans-I/O: bytes in, commands out. It never touches a socket, a
clock or a global. One engine object handles one proxied connection:

    engine = Http1Engine(decide)
    cmds = engine.client_data(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    # -> [Access(request=HttpRequest(...), decision=Decision(...), key=0),
    #     ToServer(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")]

``client_data(b"")`` / ``server_data(b"")`` signal end of input on that side.

Engines never read policy. They build a typed request (``HttpRequest``,
``GrpcCall``, ``KafkaRequest``, ``CqlRequest``, ``TlsClientHello``) and ask the ``decide``
function they were given, exactly once per request (``decide`` is pure: see
``Decide``). A denial is answered on the wire by the engine
itself (``ToClient`` with a protocol-native error), so the driver that does
the I/O stays protocol-agnostic.

Time is the driver's too. An engine says where the client is (``reading_headers``,
``reading_body``, ``heads_read``); the driver keeps the clock, and when a deadline
passes asks the engine for its protocol's answer (``client_timed_out``: an HTTP
408, an HTTP/2 GOAWAY, or a plain close for Kafka and CQL).

The whole proxy is one event loop, so an engine may bound the work one call
does: it then keeps the client's input it has not processed and ends its
commands with ``Yield``, and the driver stops reading that client and calls
``Yield.resume`` on a later turn of the loop, after the other connections have
had theirs.

So is the decision to end a healthy connection (a restart's drain): the driver
asks the engine to ``finish()``, and the engine ends it where its protocol allows
without losing a request, saying so with ``Finished`` (docs/restarts.md).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, Self, TypeAlias, runtime_checkable

from parsers.fastnew import fast_new
from parsers.requests import L7Request

# --------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy engine's answer for one request.

    ``allowed`` is what the engine must do. ``audit`` marks a request that
    policy would deny but audit mode lets through (``allowed`` is then True).
    ``policy``/``rule`` name what decided, ``reason`` says why in words.
    """

    allowed: bool
    policy: str = ""
    rule: str = ""
    reason: str = ""
    audit: bool = False
    # Header edits an allowed HTTP request must get before it is forwarded
    # (Cilium's headerMatches mismatch actions): ("add"|"delete"|"replace", name, value).
    edits: tuple[tuple[str, str, str], ...] = ()
    # What the flow log says of it: set once here, as every request's record reads it.
    verdict: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        verdict = "AUDIT" if self.audit else "FORWARDED" if self.allowed else "DENIED"
        object.__setattr__(self, "verdict", verdict)


ALLOW_ALL = Decision(True, reason="no L7 policy")

# Requests of one connection judged and not yet answered that an engine (and the
# driver, ``ProxyLimits.max_pending_requests``) lets build up before it reads no
# further: pipelined HTTP/1.1 requests toward a slow server, say.
DEFAULT_MAX_PENDING = 256

# The largest Kafka or CQL frame an engine holds whole before judging it (one that
# cannot be judged on its first bytes and streamed): Cassandra 4.x's
# ``native_transport_max_frame_size`` (16 MiB); for Kafka, 16 times what clients send
# by default (``max.request.size`` 1 MiB in Java, ``message.max.bytes`` 1 MB in
# librdkafka), so clients with raised limits still pass. Past it the engine answers
# the protocol's error and closes (``FrameTooLarge``, limit ``max_held_frame``).
DEFAULT_MAX_HELD_FRAME = 16 * 1024 * 1024


def allow_all(_request: object) -> Decision:
    return ALLOW_ALL


Decide = Callable[[L7Request], Decision]
"""How an engine asks policy about one request: ``decide(request) -> Decision``.

``decide`` is pure: for the life of a policy revision its answer is a function
of the typed request alone. It has no side effects an engine could observe,
and may be called from any engine, on any connection, in any order. A new
policy revision may change the answer for the same request, and the same
``decide`` object follows the revision in force.

So engines call ``decide`` exactly once per request, when the request is
judged, and never cache a ``Decision`` across requests: not even for a request
identical to an earlier one on the same connection (a keep-alive repeat must be
judged by the revision in force when it arrives). What an engine may cache is
its own parsing work (``parsers.http1.memo``), never the verdict.
``tests/parsers/http1/test_http1_repeat.py`` counts the calls.
"""


# --------------------------------------------------------------------------
# Commands an engine emits. The driver executes them in order.

Data: TypeAlias = bytes | bytearray
"""Bytes an engine builds or holds. A ``bytearray`` in a command is handed over:
the engine keeps no reference to it and never changes it again, so a large frame
assembled in one buffer goes to the transport without a copy."""

WireData: TypeAlias = Data | memoryview
"""What ``ToServer`` and ``ToClient`` carry: ``Data``, or a ``memoryview`` slice of
bytes the engine was given (a relayed read, which nobody changes), so relayed
bytes reach the transport without a copy; the transport may hold it until it
is written."""


@dataclass(slots=True)
class ToServer:
    """Bytes to write to the upstream server."""

    data: WireData


@dataclass(slots=True)
class ToClient:
    """Bytes to write to the client (forwarded replies or synthesized errors)."""

    data: WireData


@dataclass(slots=True)
class Access:
    """A request was judged. ``key`` pairs it with a later ``Reply``."""

    request: Any
    decision: Decision
    key: Hashable = None


@dataclass(slots=True)
class Reply:
    """The reply to the request with this ``key`` completed (or was synthesized).

    ``fields`` carries protocol reply data for the flow log, e.g.
    ``{"status": 200}`` or ``{"grpc_status": 7}`` or ``{"error_code": 29}``.
    """

    key: Hashable
    fields: dict[str, Any] = field(default_factory=dict)


# Built for every message: the engines' hot paths call these constructors, which
# build what the classes build in a third of the time (``parsers.fastnew``).
new_to_server = fast_new(ToServer)
new_to_client = fast_new(ToClient)
new_access = fast_new(Access)
new_reply = fast_new(Reply)


@dataclass(slots=True)
class ParseError:
    """A protocol error was seen. The engine has already emitted whatever
    protocol-native answer is due; ``close`` tells whether it gave up on the
    connection (the driver then closes both sides after flushing)."""

    side: str  # "client" or "server"
    error: ProtocolError
    close: bool = True

    def __post_init__(self) -> None:
        self.error.detach()


@dataclass(slots=True)
class ShutdownServer:
    """Half-close toward the server (client sent EOF and everything is flushed)."""


@dataclass(slots=True)
class ShutdownClient:
    """Half-close toward the client."""


@dataclass(slots=True)
class Close:
    """Close both sides once pending writes are flushed."""

    reason: str = ""


@dataclass(slots=True)
class Yield:
    """The engine did its share of work for now and holds client input it has not
    processed yet (fairness: one connection's large read must not hold the event
    loop). The driver pauses reading the client and, on a later turn of the loop,
    calls ``resume()`` and executes what it returns like any other commands: more
    of the same, maybe another ``Yield``. Once every ``Yield`` has been resumed,
    the driver reads the client again. It is usually the last command of its
    batch, but need not be (an engine that wraps another may append the inner
    engine's answer to server bytes after it)."""

    resume: Callable[[], list[Command]]
    # The engine holds server input too (responses not processed yet): the driver
    # stops reading the server as well until then.
    server: bool = False


@dataclass(slots=True)
class Finished:
    """After ``Engine.finish()``: the engine has answered every request it will
    answer on this connection and reads no further one (bytes the client sends
    from now on are never judged or forwarded).

    ``told``: the protocol told the client that the connection ends (HTTP/1.1
    ``Connection: close`` on that last response, HTTP/2 GOAWAY), so the client
    closes it; the engine answers its EOF with ``Close``. Otherwise (Kafka, CQL:
    no such word) nobody will close it: the driver ends it right behind the
    answer just written."""

    told: bool


@dataclass(slots=True)
class Log:
    """A diagnostic message (logging is a command so tests can assert on it)."""

    message: str
    level: str = "debug"


Command = (
    ToServer
    | ToClient
    | Access
    | Reply
    | ParseError
    | ShutdownServer
    | ShutdownClient
    | Close
    | Yield
    | Finished
    | Log
)


# --------------------------------------------------------------------------
# Errors: typed, and carrying what is needed to answer on the wire.


class ProtocolError(Exception):
    """Malformed or disallowed traffic.

    ``wire_reply`` is the protocol-native answer to send to the peer that
    sent the bad bytes (e.g. an HTTP 400 response), or ``b""`` if the only
    answer is a close. ``code`` is a short machine-readable name.
    """

    def __init__(self, message: str, *, code: str = "protocol_error", wire_reply: bytes = b""):
        super().__init__(message)
        self.code = code
        self.wire_reply = wire_reply

    def detach(self) -> Self:
        """This error, kept as data (in a command, or queued for its answer), without
        the traceback and chained errors that hold the frames that raised it: those
        frames hold the engine, so the error and its connection would be a reference
        cycle, freed by the cyclic collector only, long after the connection ends."""
        self.__traceback__ = None
        self.__context__ = None
        self.__cause__ = None
        return self


class LimitExceeded(ProtocolError):
    """A per-connection budget ran out: a flood rather than a malformed message.

    ``limit`` is the name of the limits field that was exceeded (for example
    ``max_stream_resets`` of ``H2Limits``), as the driver's own limits are named
    (``HEADER_TIMEOUT``); the driver writes a flow-log record of type ``limit``
    naming it, which metrics count.
    """

    def __init__(self, message: str, *, limit: str, code: str, wire_reply: bytes = b""):
        super().__init__(message, code=code, wire_reply=wire_reply)
        self.limit = limit


MAX_FRAME: Final = "max_frame"
"""A frame longer than the protocol (or the engine's ``max_frame``) allows."""
MAX_HELD_FRAME: Final = "max_held_frame"
"""A frame that must be held whole to be judged, longer than ``DEFAULT_MAX_HELD_FRAME``."""


class FrameTooLarge(LimitExceeded):
    """A frame over a size limit: ``limit`` is ``MAX_FRAME``, or ``MAX_HELD_FRAME`` for
    one that would have to be held whole (or held until judged) past its limit."""

    def __init__(self, message: str, *, wire_reply: bytes = b"", limit: str = MAX_FRAME):
        super().__init__(message, limit=limit, code="frame_too_large", wire_reply=wire_reply)


# --------------------------------------------------------------------------
# Limits the driver times and the engine answers.

HEADER_TIMEOUT: Final = "header_timeout"
"""A head (request head, header block, Kafka or CQL frame) not complete by its deadline."""
BODY_TIMEOUT: Final = "body_timeout"
"""A request body with no byte for the body timeout."""
TimeLimit = Literal["header_timeout", "body_timeout"]


# --------------------------------------------------------------------------
# The engine contract.


class Engine(Protocol):
    """One proxied connection, sans-I/O."""

    protocol: str

    client_speaks_first: bool
    """True when the protocol has the client speak first (HTTP/1.1, h2c and
    gRPC, Kafka, CQL). The driver then opens the upstream connection only when
    the engine first has bytes for the server, as haproxy does: a client that
    connects and says nothing, or leaves before its first request is judged,
    costs no upstream connection. False when the server may speak first (the
    passthrough engine, for ports without L7 rules): the upstream is connected
    at once."""

    def client_data(self, data: bytes) -> list[Command]:
        """Bytes read from the client; ``b""`` means the client sent EOF."""
        ...

    def server_data(self, data: bytes) -> list[Command]:
        """Bytes read from the server; ``b""`` means the server sent EOF."""
        ...

    @property
    def reading_headers(self) -> bool:
        """True while the client is in the middle of a request head: from its
        first byte until it is complete. A head is an HTTP/1.1 request head, an
        HTTP/2 header block (or any other partly received frame but DATA, and
        the connection preface), or a whole Kafka or CQL frame, unless the
        engine judges the frame on its first bytes and streams the rest (then
        the rest is a body). The driver's header deadline runs only then."""
        ...

    @property
    def reading_body(self) -> bool:
        """True while the client is in the middle of sending a request body the
        engine is waiting for: an HTTP/1.1 Content-Length or chunked body, a
        partly received HTTP/2 DATA frame, the rest of a Kafka frame judged on
        its first bytes. The driver's body timeout (no byte for that long) runs
        only then."""
        ...

    @property
    def heads_read(self) -> int:
        """How many heads the client has completed on this connection (any count
        that moves when one completes will do). A head that completes in the same
        read as the next one begins leaves ``reading_headers`` true throughout:
        this count tells the driver a new head, with a deadline of its own, began."""
        ...

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """The driver's clock ran out on the client: ``limit`` is HEADER_TIMEOUT
        (a head was not complete by its deadline) or BODY_TIMEOUT (a body stalled).

        Returns the protocol's answer, ending in ``Close`` (or, for HTTP/1.1 owing
        earlier responses, with the answer queued behind them). From then on the
        engine reads nothing more from the client: ``reading_headers`` and
        ``reading_body`` are false."""
        ...

    def finish(self) -> list[Command]:
        """End this healthy connection at the protocol's next safe point, losing no
        request: the proxy is going away (a takeover's drain, docs/restarts.md).

        Returns what to send at once (HTTP/2: GOAWAY and a PING). From then on the
        engine answers what it has read, judges at most the one request that must
        carry the protocol's word (HTTP/1.1: the next one, if none is waiting for
        its response), reads nothing beyond, and emits ``Finished`` right behind
        its last answer:

        - HTTP/1.1: ``Connection: close`` on the response to the last request read
          (RFC 9112 9.6): the client closes after reading it, and retries on a new
          connection whatever it sent behind it (9.3.2), which was never read;
        - HTTP/2: GOAWAY(NO_ERROR, 2^31-1) and a PING, then, once the PING comes
          back, GOAWAY(NO_ERROR, last stream id); ``Finished`` when the streams up
          to it are done (RFC 9113 6.8);
        - Kafka, CQL: ``Finished(told=False)`` the first time nothing is owed and
          no request is partly read, right behind an answer;
        - a byte tunnel (no L7 rules, an accepted Upgrade): never; the driver ends
          it once it is quiet.

        A connection that stays silent never reaches a safe point the engine can
        see: the driver ends it once it has been quiet for a while. Asking again
        changes nothing."""
        ...


@runtime_checkable
class HoldsFrames(Protocol):
    """An engine that holds partly received frames (Kafka, CQL) says how many
    bytes it holds, so the driver can keep them within one budget for the whole
    process (``ProxyLimits.max_held_bytes``)."""

    @property
    def held_bytes(self) -> int:
        """Client bytes held right now: partly received frames (or their heads,
        until judged) and whole ones waiting their turn."""
        ...


class EngineFactory(Protocol):
    """Makes the engine of one connection. ``max_pending`` bounds the requests it
    judges ahead of their answers (``DEFAULT_MAX_PENDING``): past it, an engine
    keeps further client bytes unparsed until answers come back."""

    def __call__(self, decide: Decide, *, max_pending: int = DEFAULT_MAX_PENDING) -> Engine: ...
