"""The only place where proxied bytes meet sockets.

A ``Pipe`` joins one client transport and one server transport through a
sans-I/O engine: bytes read on either side go into the engine, and the
commands it returns are executed here, in order. Backpressure is the
transports' own: when one side's write buffer passes its high-water mark,
reading from the other side pauses until it drains, so a slow reader never
grows memory. Reading the client is also put on hold while the client does
not read what it is owed, while too many of its requests await an answer
(pipelining toward a silent server), and while bytes wait for an upstream
that is still connecting: a client can only make the proxy hold a bounded
amount for it. And while its engine has yielded: an engine that did its share
of work for one turn of the event loop ends its commands with ``Yield``, and
resumes on a later turn, after every other connection's ready I/O (fairness).
Frames held whole (Kafka and CQL requests until judged) are also bounded for all
connections together (``HeldBudget``): a client whose read takes the process over
``max_held_bytes`` is not read again until the total falls.

Public surface, used by ``l7proxy/proxy/server.py`` and the agent's drain:

- ``Pipe(...)``, ``client_data``, ``server_data``, ``server_connected``: I/O in;
  the pipe asks for its upstream through the ``connect`` callable it is given:
  at once for an engine whose server may speak first, otherwise only when the
  engine first has bytes for the server (``Engine.client_speaks_first``);
- ``close(reason)``: end now (flush, then a lingering close toward the client);
  returns whether the client connection was still open (False: it was already
  ending, or gone);
- ``close_when_idle()``: end where the protocol allows without losing a request
  (the engine's ``finish()``, docs/restarts.md); returns a future that says how
  the pipe ended;
- ``closing``: True once the pipe is ending, whichever way.

The pipe keeps the clocks (docs/limits.md): a deadline for each request head from
its first byte (``ProxyLimits.header_timeout``), a body timeout while a request body
is awaited (``body_timeout``), and the idle timeout. The engine says where the
client is (``reading_headers``, ``reading_body``, ``heads_read``) and answers a
deadline that passed in its protocol (``client_timed_out``); each one that passes
writes a flow record of type ``limit`` naming it (so does a frame refused for its
size, and a client paused for the held-bytes budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from l7proxy.observe.flowlog import FlowLog, now_fields
from parsers.base import (
    BODY_TIMEOUT,
    DEFAULT_MAX_PENDING,
    HEADER_TIMEOUT,
    Access,
    Close,
    Command,
    Decision,
    Engine,
    Finished,
    HoldsFrames,
    LimitExceeded,
    Log,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    TimeLimit,
    ToClient,
    ToServer,
    WireData,
    Yield,
)

log = logging.getLogger("l7proxy.proxy")


class PipeOwner(Protocol):
    """What a client connection needs from whoever accepted it (``server.Proxy``)."""

    def open_pipe(self, transport: asyncio.Transport) -> Pipe | None:
        """A pipe for this accepted connection, or None to refuse it."""
        ...

    def pipe_closed(self, pipe: Pipe) -> None:
        """The client connection of ``pipe`` is gone."""
        ...


WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

# Why reading the client is on hold (bits of ``Pipe._client_holds``); reading
# resumes when the last one is released.
HOLD_SERVER_FULL = 1  # the server's write buffer is full
HOLD_CLIENT_FULL = 2  # the client does not read what it is owed
HOLD_PENDING = 4  # ``max_pending_requests`` of its requests await an answer
HOLD_EARLY = 8  # bytes wait for an upstream that is still connecting
HOLD_TURN = 16  # the engine yielded: it goes on with what it holds on a later turn
HOLD_BUDGET = 32  # frames held by all connections are over ``max_held_bytes``
# While one of these holds stands, the client's clocks (head deadline, body and
# idle timeouts) stand still: we are the ones not reading. Not while HOLD_BUDGET
# alone does: a client paused for the budget holds part of it with a frame of its
# own, and its head deadline is what ends a client that hogs it.
_CLOCKS_STOP = HOLD_SERVER_FULL | HOLD_CLIENT_FULL | HOLD_PENDING | HOLD_EARLY | HOLD_TURN
# Why reading the server is on hold (bits of ``Pipe._server_holds``).
SERVER_HOLD_CLIENT_FULL = 1  # the client does not read what the server sends
SERVER_HOLD_TURN = 2  # the engine yielded with server input still to process
LINGER_SECONDS = 2.0

# Bytes held in whole-frame buffers by all connections together (``HeldBudget``):
# 16 of the largest frames an engine holds (``DEFAULT_MAX_HELD_FRAME``, 16 MiB).
DEFAULT_MAX_HELD_BYTES = 256 * 1024 * 1024
MAX_HELD_BYTES = "max_held_bytes"  # the name of that limit in flow records and metrics

# close_when_idle: a connection with no traffic for this long (counted from the
# request to finish, too) is idle, even without an answer to end behind.
QUIET_SECONDS = 0.25
# How soon to look again while a response is still in our send queue.
SEND_QUEUE_RECHECK = 0.001
# How soon to look again while a request is in flight and silent, or a quiet
# connection still has unacknowledged bytes (neither has an event to wait for).
IDLE_RECHECK = 0.05

# How a pipe asked to close when idle ended (the future's result).
ENDED_QUIET = "quiet"  # reset after QUIET_SECONDS of silence
ENDED_AFTER_REPLY = "after reply"  # reset right behind the last answer (Kafka, CQL)
ENDED_BY_CLIENT = "by client"  # told by its protocol (Connection: close, GOAWAY), it closed
ENDED_OTHERWISE = "closed"  # ended some other way first

TIOCOUTQ = 0x5411  # bytes in the send queue not yet acknowledged
SIOCOUTQNSD = 0x894B  # bytes in the send queue not yet sent


def kernel_somaxconn() -> int:
    """The kernel's cap on a listen backlog (``net.core.somaxconn``)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


@dataclass
class ProxyLimits:
    # A request head (an HTTP/2 header block, a Kafka or CQL frame) must be complete
    # this long after its first byte, however its bytes trickle in (haproxy's
    # ``timeout http-request``); then the protocol's answer (408, GOAWAY) or a close.
    header_timeout: float = 10.0
    # A request body with no byte for this long -> close (nginx's ``client_body_timeout``).
    body_timeout: float = 60.0
    idle_timeout: float = 300.0  # no bytes either way for this long -> close
    connect_timeout: float = 5.0
    # Requests judged and not yet answered on one connection (pipelined HTTP/1.1,
    # HTTP/2 streams, Kafka and CQL requests): at this many, reading the client
    # stops until half have been answered.
    max_pending_requests: int = DEFAULT_MAX_PENDING
    # Accept queue of every listening socket (haproxy's ``backlog``, nginx's
    # ``listen ... backlog=``). asyncio's default of 100 makes a burst of
    # connects wait for SYN retries, seconds each.
    backlog: int = field(default_factory=kernel_somaxconn)
    # Bytes all connections together may hold in partly received frames (Kafka and
    # CQL requests until judged); past it a client is not read until the total falls
    # (``HeldBudget``), as Cassandra does past ``native_transport_max_request_data_in_flight``
    # and a Kafka broker past ``queued.max.request.bytes``.
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES


@dataclass
class ProxyStats:
    """Counters the metrics module reads; plain ints, no locking needed in one loop."""

    connections_total: int = 0
    connections_active: int = 0
    connections_refused: int = 0
    upstream_failures: int = 0
    tls_handshake_failures: int = 0
    parse_errors: dict[str, int] = field(default_factory=dict)


class HeldBudget:
    """Bytes held in partly received frames by every connection of one proxy,
    against one limit (``ProxyLimits.max_held_bytes``): Envoy's overload manager
    watches its heap the same way (``envoy.resource_monitors.fixed_heap``).

    Engines count what they hold (``HoldsFrames.held_bytes``); each pipe adds its
    change here after every read. A pipe whose read takes the total past the limit,
    while other connections hold frames too, stops reading its client
    (``HOLD_BUDGET``): what it holds stays, but grows no more. When the total is back
    within the limit every paused client is read again, each until it alone takes
    the total over. Its head deadline still runs while it is paused, so clients
    that hold frames and never finish them are cut at their deadline, and the total
    falls. A connection is never paused to wait for its own bytes: alone, it is
    bounded by ``max_held_frame`` (Cassandra pauses reading the same way past
    ``native_transport_max_request_data_in_flight``; a Kafka broker past
    ``queued.max.request.bytes``).
    """

    __slots__ = ("limit", "total", "_paused")

    def __init__(self, limit: int = DEFAULT_MAX_HELD_BYTES) -> None:
        self.limit = limit
        self.total = 0
        self._paused: dict[Pipe, None] = {}  # in the order they were paused

    @property
    def paused(self) -> int:
        """How many clients are not read because of this budget."""
        return len(self._paused)

    def _pause(self, pipe: Pipe) -> None:
        self._paused[pipe] = None

    def _forget(self, pipe: Pipe) -> None:
        self._paused.pop(pipe, None)

    def _release(self) -> None:
        if self.total > self.limit or not self._paused:
            return
        paused, self._paused = self._paused, {}
        for pipe in paused:
            pipe._release_client(HOLD_BUDGET)


class Pipe:
    """One proxied connection. Created by the proxy for each accepted client."""

    __slots__ = (
        "closing",
        "_loop",
        "_engine",
        "_flowlog",
        "_protocol",
        "_limits",
        "_stats",
        "_client",
        "_server",
        "_source",
        "_destination",
        "_to_server_early",
        "_server_eof_early",
        "_last_activity",
        "_last_client_byte",
        "_head_deadline",
        "_head_number",
        "_body_since",
        "_last_look",
        "_client_paused_at",
        "_client_timed_out",
        "_in_flight",
        "_timer",
        "_client_holds",
        "_yields_owed",
        "_early_bytes",
        "_server_holds",
        "_linger_zero",
        "_client_eof_sent",
        "_server_eof_sent",
        "_idle_end",
        "_idle_check",
        "_finish_asked",
        "_end_behind",
        "_told",
        "_connect",
        "_connecting",
        "_server_wanted",
        "_budget",
        "_frames_held",
        "_held",
        "_budget_head",
        "_tls",
        "_linger",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: Engine,
        flowlog: FlowLog,
        protocol: str,
        limits: ProxyLimits,
        stats: ProxyStats,
        *,
        client: asyncio.Transport,
        source: dict[str, Any] | None = None,
        destination: dict[str, Any] | None = None,
        connect: Callable[[Pipe], asyncio.Future[Any]] | None = None,
        reset_if_killed: bool = False,
        budget: HeldBudget | None = None,
        tls: dict[str, Any] | None = None,
    ):
        self.closing = False
        # A terminated TLS session: what it negotiated, in every flow record.
        self._tls = tls
        self._loop = loop
        self._engine = engine
        self._flowlog = flowlog
        self._protocol = protocol
        self._limits = limits
        self._stats = stats
        self._client = client
        self._server: asyncio.Transport | None = None
        self._source = source  # flow-log descriptions of both ends
        self._destination = destination
        # What the engine sent toward the server before the upstream connected.
        self._to_server_early: list[WireData] = []
        self._early_bytes = 0
        self._server_eof_early = False
        self._last_activity = self._last_client_byte = self._last_look = loop.time()
        # The head the client is in the middle of: when it must be complete, and
        # ``engine.heads_read`` when it began (a new count is a new head).
        self._head_deadline: float | None = None
        self._head_number = 0
        # When the body the engine waits for began to be awaited (None: no body).
        self._body_since: float | None = None
        self._client_paused_at = 0.0
        # A deadline passed: the engine reads nothing more from the client.
        self._client_timed_out = False
        self._in_flight: dict[Hashable, tuple[float, Any, Decision]] = {}
        self._client_holds = 0  # HOLD_* bits
        self._yields_owed = 0  # engine turns scheduled (HOLD_TURN until they have run)
        self._server_holds = 0  # SERVER_HOLD_* bits
        self._client_eof_sent = False
        self._server_eof_sent = False
        # close_when_idle(): the future it returned, the pending re-check, when it
        # was asked, and what the engine said since: end right behind its last
        # answer (Finished, told=False), or the client was told (told=True).
        self._idle_end: asyncio.Future[str] | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._finish_asked = 0.0
        self._end_behind = False
        self._told = False
        if reset_if_killed:
            # Transparent mode: if this process dies (SIGKILL, a crash), the kernel
            # closes this socket with a reset rather than a FIN, which would leave
            # our side in FIN_WAIT2/TIME_WAIT on the client's 4-tuple for a minute,
            # where the datapath hands a later SYN reusing it to our listener and
            # the kernel drops it as a duplicate (docs/restarts.md). Every close we
            # choose turns this off first (close()) or wants the reset anyway.
            _set_linger_zero(client, True)
        self._linger_zero = reset_if_killed
        # The lingering close's deadline (``close``), cancelled when the client
        # closes first: else each closed connection wakes the event loop once more.
        self._linger: asyncio.TimerHandle | None = None
        # (``_timer_interval``, without the call.)
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            min(limits.header_timeout, limits.body_timeout, limits.idle_timeout) / 2,
            self._check_timers,
        )
        # The upstream: ``connect(pipe)`` starts it and returns what to cancel
        # if the pipe ends first. None: the caller connects it (tests, bench).
        self._connect = connect
        self._connecting: asyncio.Future[Any] | None = None
        self._server_wanted = False
        # The process-wide budget of bytes held in frames, if the engine holds any;
        # what this pipe has counted in it; the head it last wrote a record for.
        self._budget = budget
        frames_held: HoldsFrames | None = None
        if budget is not None:
            # (``_frames_held_by``, its answer known for this type, without the call.)
            holds = _HOLDS_FRAMES.get(type(engine))
            if holds is None:
                frames_held = _frames_held_by(engine)
            elif holds:
                frames_held = engine  # type: ignore[assignment]
        self._frames_held = frames_held
        self._held = 0
        self._budget_head = -1
        if not engine.client_speaks_first:
            # The server may speak first (SMTP, MySQL behind a port without L7
            # rules): waiting for the client's bytes would deadlock them.
            self._want_server()

    # ------------------------------------------------------------- input

    def client_data(self, data: bytes) -> None:
        """Bytes read from the client; ``b""`` is its EOF."""
        if self.closing or self._client_timed_out:
            # Closing: a lingering close, whose reads are discarded. Timed out: its
            # engine no longer reads it (an HTTP/1.1 408 waiting behind the
            # responses owed): these bytes must not keep the connection alive.
            return
        now = self._loop.time()
        self._last_activity = self._last_client_byte = now
        engine = self._engine
        self._execute(engine.client_data(data))
        if self._frames_held is not None:
            self._count_held()
        if engine.reading_headers:
            self._track_head(now)
        elif self._head_deadline is not None:
            self._head_deadline = None

    def server_data(self, data: bytes) -> None:
        """Bytes read from the server; ``b""`` is its EOF."""
        self._last_activity = self._loop.time()
        self._execute(self._engine.server_data(data))
        if self._frames_held is not None:
            self._count_held()

    def _count_held(self) -> None:
        """Add what the engine holds now to the budget; pause this client if that
        takes the total over while others hold frames too."""
        assert self._frames_held is not None and self._budget is not None
        held = self._frames_held.held_bytes
        change = held - self._held
        if not change or self.closing:
            return
        self._held = held
        budget = self._budget
        budget.total += change
        if change < 0:
            budget._release()
        elif budget.total > budget.limit and budget.total > held:
            if not self._client_holds & HOLD_BUDGET:
                self._hold_client(HOLD_BUDGET)
                budget._pause(self)
                heads = self._engine.heads_read
                if heads != self._budget_head:  # one record per head paused
                    self._budget_head = heads
                    self._limit_record(
                        MAX_HELD_BYTES,
                        f"{budget.total} bytes held in frames by all connections, over "
                        f"{budget.limit}: not read until that falls (this one holds {held})",
                        verdict="PAUSED",
                    )

    # ------------------------------------------------------------- backpressure

    def client_write_paused(self) -> None:
        """The client's write buffer is full: stop reading the server, and the
        client too (a client that does not read its answers gets no more)."""
        self._hold_server(SERVER_HOLD_CLIENT_FULL)
        self._hold_client(HOLD_CLIENT_FULL)

    def client_write_resumed(self) -> None:
        self._release_server(SERVER_HOLD_CLIENT_FULL)
        self._release_client(HOLD_CLIENT_FULL)

    def _hold_server(self, reason: int) -> None:
        if self._server is None:
            return
        if not self._server_holds and not self.closing:
            self._server.pause_reading()
        self._server_holds |= reason

    def _release_server(self, reason: int) -> None:
        holds = self._server_holds
        if not holds & reason:
            return
        self._server_holds = holds & ~reason
        if not self._server_holds and self._server is not None and not self.closing:
            self._server.resume_reading()

    def server_write_paused(self) -> None:
        """The server's write buffer is full: stop reading the client."""
        self._hold_client(HOLD_SERVER_FULL)

    def server_write_resumed(self) -> None:
        self._release_client(HOLD_SERVER_FULL)

    def _hold_client(self, reason: int) -> None:
        holds = self._client_holds
        if not holds and not self.closing:
            self._client.pause_reading()
        if reason & _CLOCKS_STOP and not holds & _CLOCKS_STOP:
            self._client_paused_at = self._loop.time()
        self._client_holds = holds | reason

    def _release_client(self, reason: int) -> None:
        holds = self._client_holds
        if not holds & reason:
            return
        self._client_holds = holds & ~reason
        if holds & _CLOCKS_STOP and not self._client_holds & _CLOCKS_STOP:
            # The client's clocks stood still while we did not read it.
            paused = self._loop.time() - self._client_paused_at
            self._last_client_byte += paused
            if self._head_deadline is not None:
                self._head_deadline += paused
            if self._body_since is not None:
                self._body_since += paused
        if not self._client_holds and not self.closing:
            self._client.resume_reading()

    # ------------------------------------------------------------- fairness

    def _yield(self, resume: Callable[[], list[Command]], server: bool) -> None:
        """The engine did its share for this turn: hold the client (and the server,
        if the engine holds its input too), go on later."""
        if self.closing:
            return
        self._hold_client(HOLD_TURN)
        if server:
            self._hold_server(SERVER_HOLD_TURN)
        self._yields_owed += 1
        self._loop.call_soon(self._resume, resume)

    def _resume(self, resume: Callable[[], list[Command]]) -> None:
        if self.closing:
            self._yields_owed -= 1
            return
        self._execute(resume())  # a Yield in there keeps the hold
        if self._frames_held is not None:
            self._count_held()
        self._yields_owed -= 1
        if not self._yields_owed:
            self._release_client(HOLD_TURN)
            self._release_server(SERVER_HOLD_TURN)

    # ------------------------------------------------------------- commands

    def _execute(self, commands: list[Command]) -> None:
        count = len(commands)
        first: Any
        second: Any
        if count == 2:
            # Most turns: a request judged and sent on, or its response sent back.
            first, second = commands
            kind = type(first)
            if kind is Access and type(second) is ToServer:
                if not self._server_eof_sent:
                    in_flight = self._in_flight  # (``_access``, inline: one per request)
                    in_flight[first.key] = (time.monotonic(), first.request, first.decision)
                    if len(in_flight) >= self._limits.max_pending_requests:
                        self._pending_limit(in_flight)
                    server = self._server
                    if server is not None:
                        server.write(second.data)
                    else:  # a connection's first request: its server is being connected
                        self._send_early(second.data)
                    return
            elif kind is ToClient and type(second) is Reply:
                if not self._client_eof_sent and not self._client.is_closing():
                    self._record(second.key, second.fields)  # (as below: before the write)
                    self._client.write(first.data)
                    return
        elif count == 3:
            # A last response (``Connection: close``): its write, its record, the end,
            # in the order the loop below keeps.
            first, second, third = commands
            if (
                type(first) is ToClient
                and type(second) is Reply
                and type(third) is Close
                and not self._client_eof_sent
                and not self._client.is_closing()
            ):
                self._record(second.key, second.fields)
                self._client.write(first.data)
                self.close(third.reason)
                return
        never_connected = False
        # Bytes for each side are gathered and written once (one writev), before
        # any command that must come after them: a pipelined batch of responses
        # releases as many requests, and a syscall each would be most of its cost.
        to_server: list[bytes] = []
        to_client: list[bytes] = []
        cmd: Any  # dispatched on its exact type below: faster than isinstance or match
        for cmd in commands:
            kind = type(cmd)
            if kind is ToServer:
                if self._server_eof_sent:
                    log.debug(
                        "%s engine wrote to the server after shutting it down; dropped",
                        self._protocol,
                    )
                elif self._server is not None:
                    to_server.append(cmd.data)
                else:
                    self._send_early(cmd.data)
                continue
            if kind is ToClient:
                if not self._client_eof_sent and not self._client.is_closing():
                    to_client.append(cmd.data)
                continue
            if to_server or to_client:
                if kind is not Access and kind is not Reply and kind is not Log:
                    self._write_gathered(to_server, to_client)
                    to_server, to_client = [], []
            if kind is Access:
                self._access(cmd)
            elif kind is Reply:
                self._record(cmd.key, cmd.fields)
            elif kind is ShutdownServer:
                if self._server_eof_sent:
                    continue
                self._server_eof_sent = True
                if self._server is not None:
                    if self._server.can_write_eof():
                        self._server.write_eof()
                elif self._server_wanted:
                    self._server_eof_early = True
                else:
                    never_connected = True
            elif kind is ShutdownClient:
                if not self._client_eof_sent and self._client.can_write_eof():
                    self._client_eof_sent = True
                    self._client.write_eof()
            elif kind is ParseError:
                errs = self._stats.parse_errors
                key = f"{self._protocol}:{cmd.side}"
                errs[key] = errs.get(key, 0) + 1
                log.info("%s parse error from %s: %s", self._protocol, cmd.side, cmd.error)
                if isinstance(cmd.error, LimitExceeded):
                    self._limit_record(cmd.error.limit, str(cmd.error))
                if cmd.close:
                    self.close(f"parse error: {cmd.error}")
            elif kind is Close:
                self.close(cmd.reason)
            elif kind is Yield:
                self._yield(cmd.resume, cmd.server)
            elif kind is Finished:
                if self._idle_end is not None and not self.closing:
                    if cmd.told:
                        self._told = True  # the client closes; quiet, we reset it
                    else:
                        self._end_behind = True  # nobody closes it: right behind this
                        self._recheck_idle(0)
            elif kind is Log:
                level = logging.INFO if cmd.level == "info" else logging.DEBUG
                log.log(level, "%s", cmd.message)
        if to_server or to_client:
            self._write_gathered(to_server, to_client)
        if never_connected and not self.closing:
            # The client is done and the engine never had a byte for the
            # server, so none was connected: that server has nothing to say
            # either. Its end of input lets the engine end the connection the
            # way it ends any other (after the rest of this batch, in order).
            self._execute(self._engine.server_data(b""))

    def _send_early(self, data: WireData) -> None:
        """Bytes for a server not connected yet: kept for it, and it is connected."""
        self._to_server_early.append(data)
        self._early_bytes += len(data)
        if self._early_bytes > WRITE_HIGH_WATER:
            self._hold_client(HOLD_EARLY)
        self._want_server()

    def _access(self, cmd: Access) -> None:
        """A request judged: in flight until its reply (``_record``)."""
        in_flight = self._in_flight
        in_flight[cmd.key] = (time.monotonic(), cmd.request, cmd.decision)
        if len(in_flight) >= self._limits.max_pending_requests:
            self._pending_limit(in_flight)

    def _pending_limit(self, in_flight: dict[Hashable, tuple[float, Any, Decision]]) -> None:
        """As many requests in flight as the limit: the client is not read until
        half are answered."""
        if not self._client_holds & HOLD_PENDING:
            self._hold_client(HOLD_PENDING)
            self._limit_record(
                "max_pending_requests",
                f"{len(in_flight)} requests await an answer: not read until half are",
                verdict="PAUSED",
            )

    def _write_gathered(self, to_server: list[bytes], to_client: list[bytes]) -> None:
        if to_server and self._server is not None:
            if len(to_server) == 1:
                self._server.write(to_server[0])
            else:
                self._server.writelines(to_server)
        if to_client and not self._client_eof_sent and not self._client.is_closing():
            if len(to_client) == 1:
                self._client.write(to_client[0])
            else:
                self._client.writelines(to_client)

    def _record(self, key: Hashable, reply: dict[str, Any] | None) -> None:
        started = self._in_flight.pop(key, None)
        if started is None:
            return
        if (
            self._client_holds & HOLD_PENDING
            and len(self._in_flight) <= self._limits.max_pending_requests // 2
        ):
            self._release_client(HOLD_PENDING)
        if not self._flowlog.wanted:
            return
        t0, request, decision = started
        self._flowlog.emit_request(
            request,
            reply or {},
            decision,
            # (To the microsecond: ``round(x, 3)`` costs three times as much, per record.)
            int((time.monotonic() - t0) * 1e6 + 0.5) / 1000,
            self._source,
            self._destination,
            self._tls,
        )

    # ------------------------------------------------------------- lifecycle

    def _want_server(self) -> None:
        """Start connecting the upstream, once."""
        if self._server_wanted:
            return
        self._server_wanted = True
        if self._connect is not None:
            self._connecting = self._connect(self)

    def server_connected(self, transport: asyncio.Transport) -> None:
        self._connecting = None
        if self.closing:
            # The client left while we were connecting: this upstream has no
            # one to serve, and nothing else would ever close it.
            transport.abort()
            return
        self._server = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self._to_server_early:
            transport.writelines(self._to_server_early)
            self._to_server_early = []
            self._early_bytes = 0
            self._release_client(HOLD_EARLY)  # the transport's own high water takes over
        if self._server_eof_early and transport.can_write_eof():
            transport.write_eof()

    def close(self, reason: str = "") -> bool:
        """End both sides now: the server after flushing, the client with a
        lingering close after flushing. True if this ended a client connection
        that was still open (not already ending, and not gone)."""
        if self.closing:
            return False
        self._stop(reason)
        client = self._client
        if client.is_closing():
            return False  # gone already: its connection_lost is on its way
        if self._linger_zero:
            self._linger_zero = False
            _set_linger_zero(client, False)  # our close delivers what is queued
        if client.can_write_eof() and not self._client_eof_sent:
            self._client_eof_sent = True
            # Lingering close: send our FIN after the buffered reply, then
            # read and discard until the client closes (or a short while
            # passes). Closing with unread input would send an RST that can
            # destroy the error reply before the client reads it.
            client.write_eof()
            if self._client_holds:
                self._client_holds = 0
                client.resume_reading()
            self._linger = self._loop.call_later(LINGER_SECONDS, client.close)
        else:
            client.close()
        return True

    def client_lost(self) -> None:
        """The client's transport is gone (its protocol's ``connection_lost``)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self.closing:  # (most often it is: the close was ours)
            self.close("client closed")

    def _stop(self, reason: str) -> None:
        """What every way of ending shares: the server side, timers, open records."""
        self.closing = True
        if self._server is not None and not self._server.is_closing():
            self._server.close()  # flushes what is buffered, then closes
        if self._connecting is not None:
            self._connecting.cancel()  # a connect still in flight closes its socket
            self._connecting = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        if self._in_flight:  # (most connections end with every answer out)
            for key in list(self._in_flight):
                self._record(key, {"closed": reason or "connection closed"})
        # (Only an engine that holds frames counts in the budget: ``_count_held``.)
        if self._frames_held is not None and (self._held or self._client_holds & HOLD_BUDGET):
            assert self._budget is not None
            # What it held is let go with it, and may let paused clients read again.
            self._budget.total -= self._held
            self._held = 0
            self._budget._forget(self)
            self._budget._release()
        if self._idle_end is not None and not self._idle_end.done():
            self._idle_end.set_result(ENDED_BY_CLIENT if self._told else ENDED_OTHERWISE)

    def close_when_idle(self) -> asyncio.Future[str]:
        """End the connection where its protocol allows, without losing a request.

        The engine is asked to ``finish()`` (``parsers/base.py``) and ends it in
        its protocol's way: HTTP/1.1 says ``Connection: close`` on a response and
        HTTP/2 sends GOAWAY, and then the client closes the connection (we close
        our side behind its FIN: ENDED_BY_CLIENT); Kafka and CQL have no such
        word, so the engine says when nothing is owed, and the connection is reset
        right behind that answer once it has left our send queue
        (ENDED_AFTER_REPLY). A connection with nothing in flight and no traffic for
        QUIET_SECONDS (counted from now, too, so that a client reading its GOAWAY
        has time to answer it) is reset once everything sent is acknowledged
        (ENDED_QUIET): an idle keep-alive connection, a client that was told and
        does not close, a byte tunnel. A client that checks its idle connection
        before reusing it (as HTTP client pools do) sees that end before it sends
        its next request.

        We never end it with a FIN first: that would leave our accepted socket in
        TIME_WAIT on the client's 4-tuple, and a later SYN that reuses that tuple
        is assigned to the proxy's listener by the datapath, where the kernel
        drops it as a duplicate of the TIME_WAIT entry. A reset leaves no
        TIME_WAIT and removes the conntrack entry; proxied clients are endpoints
        on this node's veths, where a sent segment is a delivered one. A client
        that closes first keeps the TIME_WAIT on its own side.

        The future's result is one of the ENDED_* above, or ENDED_OTHERWISE if
        the pipe ended some other way first. Asking again changes nothing.
        """
        if self._idle_end is None:
            self._idle_end = self._loop.create_future()
            if self.closing:
                self._idle_end.set_result(ENDED_OTHERWISE)
            else:
                self._finish_asked = self._loop.time()
                self._execute(self._engine.finish())
                if not self.closing and self._idle_check is None:
                    self._end_if_idle()
        return self._idle_end

    def _recheck_idle(self, delay: float) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()
        self._idle_check = self._loop.call_later(delay, self._end_if_idle)

    def _end_if_idle(self) -> None:
        self._idle_check = None
        if self.closing:
            return
        client = self._client
        since_activity = self._loop.time() - max(self._last_activity, self._finish_asked)
        quiet = since_activity >= QUIET_SECONDS
        behind = self._end_behind
        if self._in_flight or not (behind or (quiet and not self._engine.reading_headers)):
            self._recheck_idle(max(QUIET_SECONDS - since_activity, IDLE_RECHECK))
            return
        # Quiet: everything acknowledged. Right behind an answer: everything sent
        # (waiting for the ACK would wait for the client's delayed ACK, which
        # comes with its next request).
        queued = _send_queue(client, TIOCOUTQ if quiet else SIOCOUTQNSD)
        if client.get_write_buffer_size() or queued:
            self._recheck_idle(SEND_QUEUE_RECHECK if behind else IDLE_RECHECK)
            return
        assert self._idle_end is not None
        self._idle_end.set_result(ENDED_AFTER_REPLY if behind else ENDED_QUIET)
        self._stop("closed when idle")
        # Linger 0: close() sends RST and leaves no TIME_WAIT (abort() alone sends a FIN).
        _set_linger_zero(client, True)
        client.abort()

    def _timer_interval(self) -> float:
        limits = self._limits
        return min(limits.header_timeout, limits.body_timeout, limits.idle_timeout) / 2

    def _track_head(self, now: float) -> None:
        """The engine is in the middle of a head: a new one (none was running, or
        the engine has completed one since) gets its deadline from ``now``."""
        heads = self._engine.heads_read
        if self._head_deadline is None or heads != self._head_number:
            self._head_number = heads
            self._head_deadline = now + self._limits.header_timeout

    def _check_timers(self) -> None:
        """Every half of the shortest timeout, and at a head's deadline."""
        self._timer = None
        if self.closing:
            return
        now = self._loop.time()
        limits = self._limits
        if now - self._last_activity > limits.idle_timeout:
            self._limit_record("idle_timeout", f"no byte either way for {limits.idle_timeout:g} s")
            self.close("idle timeout")
            return
        wake = now + self._timer_interval()
        engine = self._engine
        if not self._client_holds & _CLOCKS_STOP:  # while we do not read, it is not late
            if engine.reading_headers:
                # Also a head that began on the server's word (HTTP/2 after a 101,
                # Kafka frames held for a lookup), which client_data did not see.
                self._track_head(now)
                deadline = cast(float, self._head_deadline)
                if now >= deadline:
                    self._time_out(HEADER_TIMEOUT, limits.header_timeout)
                    if self.closing:
                        return
                else:
                    wake = min(wake, deadline)
            else:
                self._head_deadline = None
            if engine.reading_body:
                if self._body_since is None:
                    # Awaited since the client's last bytes if they came at or after
                    # our last look (uvloop's clock counts milliseconds: the same
                    # reading is "after"); else it began on the server's word
                    # (100 Continue).
                    last = self._last_client_byte
                    self._body_since = last if last >= self._last_look else now
                stalled_since = max(self._last_client_byte, self._body_since)
                if now - stalled_since >= limits.body_timeout:
                    self._time_out(BODY_TIMEOUT, limits.body_timeout)
                    if self.closing:
                        return
                else:
                    wake = min(wake, stalled_since + limits.body_timeout)
            else:
                self._body_since = None
        self._last_look = now
        self._timer = self._loop.call_at(wake, self._check_timers)

    def _time_out(self, limit: TimeLimit, seconds: float) -> None:
        """The client ran out of time: a flow record naming the limit, then the
        engine's answer (a 408, a GOAWAY, a close)."""
        self._head_deadline = self._body_since = None
        self._client_timed_out = True
        if limit == HEADER_TIMEOUT:
            reason = f"request head not complete {seconds:g} s after its first byte"
        else:
            reason = f"no byte of the request body for {seconds:g} s"
        log.info("%s client cut: %s", self._protocol, reason)
        self._limit_record(limit, reason)
        self._execute(self._engine.client_timed_out(limit))

    def _limit_record(self, limit: str, reason: str, verdict: str = "DROPPED") -> None:
        """A flow record of type ``limit`` naming it (metrics count them by name):
        ``verdict`` DROPPED for a client cut, PAUSED for one not read for a while."""
        rec = now_fields()
        rec.update(
            type="limit",
            protocol=self._protocol,
            source=self._source,
            destination=self._destination,
            verdict=verdict,
            limit=limit,
            reason=reason,
        )
        self._flowlog.emit(rec)


def _set_linger_zero(transport: asyncio.Transport, on: bool) -> None:
    """SO_LINGER {1, 0} (a close sends RST), or off again (a close sends FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(on), 0))


def _send_queue(transport: asyncio.Transport, request: int) -> int:
    """Bytes in the kernel send queue of the transport's socket (an ioctl)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]
    except OSError:
        return 0
    return queued


# Whether an engine type holds frames: a runtime Protocol check inspects the
# class's members each time (tens of microseconds), once per engine type is enough.
_HOLDS_FRAMES: dict[type, bool] = {}


def _frames_held_by(engine: Engine) -> HoldsFrames | None:
    kind = type(engine)
    holds = _HOLDS_FRAMES.get(kind)
    if holds is None:
        holds = _HOLDS_FRAMES[kind] = isinstance(engine, HoldsFrames)
    # (No ``cast``: it is a Python call, per connection.)
    return engine if holds else None  # type: ignore[return-value]


# Reading straight into the pipe: each protocol's ``connection_made`` binds the pipe's
# ``client_data`` (``server_data``) as its own ``data_received`` and gives itself to the
# transport again, since uvloop keeps the ``data_received`` it found when it was first
# given the protocol. The transport then hands its reads to the pipe itself: one call
# less per read, on every connection. (Reading starts after ``connection_made``: this
# costs no system call.)


class ClientSide(asyncio.Protocol):
    """Protocol for an accepted client connection."""

    # Until ``connection_made`` (class attributes: no stores per connection).
    _pipe: Pipe | None = None
    _half_close = True  # False over TLS: its transport closes at EOF

    def __init__(self, proxy: PipeOwner):
        self._proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass). (Not
        # ``cast``: a Python call per connection.)
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        if stream.get_extra_info("ssl_object") is not None:
            self._half_close = False
        pipe = self._pipe = self._proxy.open_pipe(stream)
        if pipe is None:
            stream.abort()
            return
        # Reads go to the pipe itself (see above).
        self.data_received = pipe.client_data  # type: ignore[method-assign,assignment]
        stream.set_protocol(self)

    def eof_received(self) -> bool:
        pipe = self._pipe
        if pipe is None:
            return False
        if pipe.closing:
            return False  # lingering close is over: let the transport close
        pipe.client_data(b"")
        # Keep the write side open; the engine decides when to close. A TLS
        # transport cannot: a close_notify ends the session both ways.
        return self._half_close

    def close_when_idle(self) -> asyncio.Future[str] | None:
        """``Pipe.close_when_idle`` of this connection (None: it was refused)."""
        return self._pipe.close_when_idle() if self._pipe is not None else None

    def pause_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.client_write_paused()

    def resume_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.client_write_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._proxy.pipe_closed(pipe)
            pipe.client_lost()


class ServerSide(asyncio.Protocol):
    """Protocol for the upstream connection of one pipe."""

    _half_close = True  # False over TLS: its transport closes at EOF

    def __init__(self, pipe: Pipe):
        self._pipe = pipe

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if transport.get_extra_info("ssl_object") is not None:
            self._half_close = False
        pipe = self._pipe
        # Reads go to the pipe itself (see above).
        self.data_received = pipe.server_data  # type: ignore[method-assign,assignment]
        transport.set_protocol(self)
        pipe.server_connected(transport)  # type: ignore[arg-type]  # (as ClientSide's)

    def eof_received(self) -> bool:
        if not self._pipe.closing:
            self._pipe.server_data(b"")
        return self._half_close

    def pause_writing(self) -> None:
        self._pipe.server_write_paused()

    def resume_writing(self) -> None:
        self._pipe.server_write_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        pipe = self._pipe
        if not pipe.closing:  # (most often it is: the close was ours, or the client's)
            pipe.close("server closed")
