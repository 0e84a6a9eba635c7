"""Accepting proxied connections: transparent (kernel redirect) or firewall mode.

Transparent mode: the datapath assigns redirected flows to our IP_TRANSPARENT
listener, so the accepted socket's local address *is* the original
destination. Upstream connections are bound to the client's address (source
preservation) and carry the proxy's mark so the datapath lets them through
instead of redirecting them again.

Firewall mode: one service behind one listener; the destination is the
configured upstream, and the service is the endpoint named by ``--labels``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from l7proxy.observe.flowlog import FlowLog, now_fields
from l7proxy.policy.engine import Endpoint
from l7proxy.policy.state import ConnectionPolicy, PolicyState
from l7proxy.proxy.driver import (
    ENDED_OTHERWISE,
    ENDED_QUIET,
    LINGER_SECONDS,
    QUIET_SECONDS,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    ClientSide,
    HeldBudget,
    Pipe,
    ProxyLimits,
    ProxyStats,
    ServerSide,
    kernel_somaxconn,
)
from l7proxy.proxy.heap import give_memory_back
from l7proxy.proxy.passthrough import PassthroughEngine
from l7proxy.proxy.silent import Silent, SilentSockets
from l7proxy.proxy.tls import HELLO_HEADERS, TlsStore, refuse_client_hello, session_fields
from parsers.base import Decision, Engine, EngineFactory, ProtocolError
from parsers.registry import engine_factory, proxy_engine_factory
from parsers.requests import TlsClientHello
from parsers.tls.hello import ClientHelloReader, opens_client_hello
from parsers.tls.wire import ACCESS_DENIED

log = logging.getLogger("l7proxy.proxy")


# Memory is given back to the kernel this long after this many connections
# have ended since the last time (at most once per GIVE_BACK_DELAY).
GIVE_BACK_AFTER_CLOSED = 256
GIVE_BACK_DELAY = 1.0


# Connections accepted per turn of the event loop, at most (haproxy's
# tune.maxaccept is 64 per listener; each of ours costs more). A burst waits in
# the kernel's accept queue instead of holding the loop: the event loop accepts
# until the queue is empty otherwise, and the connections already open wait for
# all of it (10k connects: a 100 ms stall for everyone).
ACCEPT_BATCH = 16
# After EMFILE/ENFILE/ENOBUFS: wait before accepting again, instead of spinning
# on a listener that stays readable (asyncio waits 1 s).
ACCEPT_RETRY_DELAY = 0.1
# A socket address as the socket module returns it: (ip, port) for IPv4.
Address = tuple[Any, ...]
# What a ClientHello judged before the handshake may take, peeked whole: the 16 KiB
# bound, its records' headers, and what a client sends behind it at once.
PEEK_LIMIT = 64 * 1024
# The name of the handshake's deadline in flow records and metrics.
TLS_HANDSHAKE_TIMEOUT = "tls_handshake_timeout"
# A terminated connection's TLS context, the policy that judges its ClientHello, and its
# addresses (read at accept: once a handshake fails, the socket is gone).
_Chosen = tuple[ssl.SSLContext, ConnectionPolicy | None, Address, Address]
# What ``Proxy.tls_context`` answers: the context, and the policy judging the ClientHello.
_Terminated = tuple[ssl.SSLContext, ConnectionPolicy | None]
# A socket's first bytes, left in it, without waiting for them.
_PEEK_NOW = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _Accepted(socket.socket):
    """An accepted connection's socket, whose ``family`` and ``type`` read as the plain
    numbers the C socket holds: ``socket.socket`` makes an enum of each in Python on
    every read (about 50 opcodes), and the event loop reads them three times when it is
    given the socket. (Made by ``Acceptor._accept_some`` without a Python ``__init__``.)"""

    __slots__ = ()
    # (socket.SocketType is the C type: its members read the numbers.)
    family = socket.SocketType.family  # type: ignore[assignment]
    type = socket.SocketType.type  # type: ignore[assignment]


_new_accepted = socket.SocketType.__new__
_init_socket = socket.SocketType.__init__


class TlsTermination(Protocol):
    """Whether an accepted connection is TLS the proxy terminates (``Proxy``)."""

    def tls_context(self, peer: Address, local: Address) -> _Terminated | None:
        """The context to terminate this connection with, and the policy that judges its
        ClientHello first (its port has ``serverNames``), if any; None: it is read as it
        is (also whenever no connection is terminated at all)."""
        ...

    def hello_judged(
        self, peer: Address, local: Address, request: TlsClientHello, decision: Decision
    ) -> None:
        """The ClientHello of a terminated connection was judged (``serverNames``)."""
        ...

    def tls_failed(self, peer: Address, local: Address, exc: BaseException) -> None:
        """The handshake of this connection failed or timed out."""
        ...

    handshake_timeout: float


class Admission(Protocol):
    """Which accepted connections wait for their first byte as bare sockets, without
    a transport (``Proxy``), and what is written of one that never speaks."""

    def silent_wait(self, peer: Address, local: Address) -> float | None:
        """How many seconds a connection from ``peer`` to ``local`` may stay silent,
        held bare; None: open it at once (its server may speak first, or it is refused)."""
        ...

    def hold_silent(self, conn: socket.socket) -> None:
        """``conn`` is held bare from now, until it speaks or leaves: it counts as an
        open connection."""
        ...

    def silent_ended(self, spoke: bool) -> None:
        """A connection admitted silent is held no longer: it spoke (and is opened,
        where it counts again), or it left, or it was closed."""
        ...

    def never_spoke(self, conn: socket.socket) -> None:
        """Its deadline passed without a byte: the record that deadline writes."""
        ...


class Acceptor:
    """Accepts the connections of one listening socket, ``ACCEPT_BATCH`` per turn.

    A connection ``admission`` lets wait (a client-first protocol), and one ``tls``
    terminates, is held as a bare socket until its first byte (``SilentSockets``):
    only then does it get its transport, its pipe and its engine. One that leaves
    first is closed there, and one silent until its deadline gets the record of that
    deadline. With ``tls``, a connection it says is TLS is handed to its protocol
    after the event loop's TLS handshake (the protocol then reads and writes cleartext)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[], asyncio.Protocol],
        tls: TlsTermination | None = None,
        admission: Admission | None = None,
        local: Address | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._family = int(sock.family)
        # The local address of every connection accepted here, when the caller knows it
        # is one (a listener bound to one address, reached without a redirect): no
        # getsockname() per connection then. None: each connection's is asked for.
        self._local = local
        self._protocol = protocol
        self._tls = tls
        self._admission = admission
        self._retry: asyncio.TimerHandle | None = None
        # Made with the first silent socket (one epoll descriptor per listener).
        self._silent: SilentSockets | None = None
        # Whether more connections wait in the accept queue: an accept() that finds
        # none costs the kernel a socket made and freed again (several microseconds),
        # and Python an exception; a poll() costs a fraction of that.
        self._queue = select.poll()
        self._queue.register(self._fd, select.POLLIN)
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._accept_some)

    def _accept_some(self) -> None:
        loop = self._loop
        for taken in range(ACCEPT_BATCH):
            # The first is there: the event loop says the listener is readable.
            if taken and not self._queue.poll(0):
                return
            try:
                # As socket.accept(), without making enums of the listener's family
                # and type in Python for the new socket (_Accepted).
                fd, peer = self._sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of descriptors or buffers: the connections wait in the queue.
                log.warning("accept: %s; retrying in %g s", exc, ACCEPT_RETRY_DELAY)
                loop.remove_reader(self._fd)
                self._retry = loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            # As ``_Accepted(family, SOCK_STREAM, 0, fd)``, without the Python frame of
            # ``socket.socket.__init__``: the C socket's own, and the two fields it sets.
            conn = _new_accepted(_Accepted)
            _init_socket(conn, self._family, socket.SOCK_STREAM, 0, fd)
            conn._io_refs = 0  # type: ignore[attr-defined]
            conn._closed = False  # type: ignore[attr-defined]
            self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer: Address) -> None:
        """Open ``conn`` now, or hold it until its first byte.

        Most clients send their first bytes (a request, a ClientHello) as they
        connect: when they are in already, the connection opens now, without the
        round through the silent sockets' watch (a registration, a turn of the event
        loop, a peek and a removal)."""
        started = self._loop.time()
        tls, admission = self._tls, self._admission
        chosen: _Chosen | None = None
        wait: float | None = None
        if tls is not None or admission is not None:
            local = self._local
            if local is None:
                try:
                    local = conn.getsockname()
                except OSError:  # reset already
                    conn.close()
                    return
            if tls is not None:
                # (None while nothing is terminated: asked without a question first.)
                terminated = tls.tls_context(peer, local)
                if terminated is not None:
                    chosen = (terminated[0], terminated[1], peer, local)
                    head = _peek_now(conn, HELLO_HEADERS)
                    if head == b"":  # closed or reset before a byte: a port check, as ``left``
                        conn.close()
                        return
                    if head is not None:  # the handshake starts now
                        self._open_now(conn, started, chosen, head)
                        return
                    wait = tls.handshake_timeout  # the handshake's deadline, from now
            if chosen is None and admission is not None:
                wait = admission.silent_wait(peer, local)
                if wait is not None:
                    first = _peek_now(conn, 1)
                    if first:
                        wait = None  # it spoke already: opened now
                    else:
                        admission.hold_silent(conn)
                        if first == b"":  # closed or reset before a byte: as ``left``
                            admission.silent_ended(spoke=False)
                            conn.close()
                            return
        if wait is None:
            self._open_now(conn, started, chosen)
            return
        try:
            if self._silent is None:
                self._silent = SilentSockets(self._loop, self)
            self._silent.add(conn, started, wait, chosen)
        except OSError as exc:  # no descriptor for the epoll, no memory for a watch
            log.warning("cannot hold a silent connection bare (%s): opening it", exc)
            self._silent_ended(chosen, spoke=True)
            self._loop.create_task(self._open_transport(conn, started, chosen))

    # ------------------------------------------------------------ silent sockets

    def _silent_ended(self, chosen: _Chosen | None, spoke: bool) -> None:
        # Only cleartext ones were counted (a TLS one counts once its handshake is done).
        if chosen is None and self._admission is not None:
            self._admission.silent_ended(spoke)

    def spoke(self, silent: Silent) -> None:
        """Its first bytes came: now it gets its transport (and TLS handshake)."""
        self._silent_ended(silent.info, spoke=True)
        self._loop.create_task(self._open(silent.sock, silent.since, silent.info, silent.ending))

    def left(self, silent: Silent) -> None:
        """Closed or reset by its client before a byte: a port check, not a client."""
        self._silent_ended(silent.info, spoke=False)
        if silent.ending is not None and not silent.ending.done():
            silent.ending.set_result(ENDED_OTHERWISE)

    def expired(self, silent: Silent) -> None:
        """Silent until its deadline: the idle timeout, or a TLS handshake's deadline."""
        conn = silent.sock
        if silent.info is not None and self._tls is not None:
            try:
                peer, local = conn.getpeername(), conn.getsockname()
            except OSError:
                conn.close()  # reset meanwhile: nothing to answer
            else:
                self._tls.tls_failed(peer, local, TimeoutError("no ClientHello"))
                self._linger_close(conn)
        else:
            if self._admission is not None:
                self._admission.never_spoke(conn)
            self._silent_ended(silent.info, spoke=False)
            _close_silent(conn, reset=False)
        if silent.ending is not None and not silent.ending.done():
            silent.ending.set_result(ENDED_OTHERWISE)

    @property
    def silent(self) -> int:
        """Connections accepted here that have not spoken yet."""
        return len(self._silent) if self._silent is not None else 0

    async def none_silent(self) -> None:
        """Return once no connection accepted here is waiting for its first byte."""
        if self._silent is not None:
            await self._silent.none_left()

    def end_silent_when_quiet(self) -> list[asyncio.Future[str]]:
        """A drain: each silent connection is reset if it is still silent
        ``QUIET_SECONDS`` from now, as ``Pipe.close_when_idle`` resets a quiet one
        (ENDED_QUIET); one that speaks first is opened and asked to end in its
        protocol's way, and its future says how it ended."""
        if self._silent is None:
            return []
        asked = []
        for silent in self._silent.all():
            if silent.ending is None:
                silent.ending = self._loop.create_future()
                asked.append(silent.ending)
        if asked:
            self._loop.call_later(QUIET_SECONDS, self._reset_quiet)
        return asked

    def _reset_quiet(self) -> None:
        if self._silent is None:
            return
        for silent in self._silent.all():
            if silent.ending is None:
                continue
            self._silent.take(silent)
            self._silent_ended(silent.info, spoke=False)
            _close_silent(silent.sock, reset=True)
            if not silent.ending.done():
                silent.ending.set_result(ENDED_QUIET)

    def close_silent(self) -> int:
        """Close every connection still silent (a shutdown); returns how many."""
        silent_sockets, self._silent = self._silent, None
        if silent_sockets is None:
            return 0
        closed = 0
        for silent in silent_sockets.all():
            silent_sockets.take(silent)
            self._silent_ended(silent.info, spoke=False)
            _close_silent(silent.sock, reset=False)
            if silent.ending is not None and not silent.ending.done():
                silent.ending.set_result(ENDED_OTHERWISE)
            closed += 1
        silent_sockets.close()
        return closed

    # ------------------------------------------------------------ opening

    def _open_now(
        self, conn: socket.socket, started: float, chosen: _Chosen | None, head: bytes | None = None
    ) -> None:
        """``_open_transport`` for a connection nothing is awaited for before its
        transport (most): a cleartext one, or a TLS one whose ClientHello's headers
        came with its accept and whose port judges no server name. Its handshake and
        transport are the event loop's coroutine, run to its end without a Task
        (``_run_bare``): a Task costs a Python call into asyncio's weak set of tasks
        as it starts and another as it ends, and a coroutine of ours around it two
        more (a third of the Python of an accept)."""
        loop = self._loop
        if chosen is None:
            coro = loop.connect_accepted_socket(self._protocol, conn)
        else:
            tls = self._tls
            context, judge, peer, local = chosen
            if judge is not None or head is None or len(head) < HELLO_HEADERS or tls is None:
                # Its ClientHello is waited for, or read whole and judged, first.
                loop.create_task(self._open_transport(conn, started, chosen, head))
                return
            # (As ``refuse_client_hello`` begins: a plain ClientHello's headers, at once.)
            if not opens_client_hello(head):
                refused = _refuse_hello_head(conn, head)
                if refused is not None:
                    tls.tls_failed(peer, local, refused)
                    self._linger_close(conn)
                    return
            # The deadline runs from the accept.
            left = started + tls.handshake_timeout - loop.time()
            coro = loop.connect_accepted_socket(
                self._protocol, conn, ssl=context, ssl_handshake_timeout=max(left, 0.001)
            )
        _run_bare(coro, partial(self._open_failed, conn, started, chosen))

    async def _open(
        self,
        conn: socket.socket,
        started: float,
        chosen: _Chosen | None,
        ending: asyncio.Future[str] | None,
    ) -> None:
        """``_open_transport``, and then ``ending`` (a drain's) follows the pipe's end."""
        protocol = None
        try:
            protocol = await self._open_transport(conn, started, chosen)
        finally:
            if ending is not None:
                _follow(ending, protocol)

    async def _open_transport(
        self,
        conn: socket.socket,
        started: float,
        chosen: _Chosen | None,
        head: bytes | None = None,
    ) -> asyncio.BaseProtocol | None:
        """Give ``conn`` its transport (after the TLS handshake ``chosen`` asks for):
        the protocol it is given, or None if it is gone or was refused. ``head``: its
        first bytes, peeked already at accept."""
        tls = self._tls
        context: ssl.SSLContext | None = None
        judge: ConnectionPolicy | None = None
        if chosen is not None:
            context, judge, peer, local = chosen
        if context is not None and tls is not None:
            refused: BaseException | None
            try:
                if head is not None and len(head) >= HELLO_HEADERS:
                    # Peeked whole at accept, as most are: judged without a coroutine, and
                    # a plain ClientHello's headers without a call more (as
                    # ``refuse_client_hello`` begins).
                    refused = None if opens_client_hello(head) else _refuse_hello_head(conn, head)
                else:
                    refused = await self._read_hello_headers(
                        conn, max(started + tls.handshake_timeout - self._loop.time(), 0.0), head
                    )
                if refused is None and judge is not None:
                    refused = await self._judge_hello(
                        conn, judge, started + tls.handshake_timeout, peer, local
                    )
            except ConnectionError as exc:  # gone before a byte: a port check, not a client
                log.debug("TLS client left before its ClientHello: %s", exc)
                conn.close()
                return None
            if refused is not None:
                if not isinstance(refused, _Denied):
                    tls.tls_failed(peer, local, refused)
                self._linger_close(conn)
                return None
        try:
            if context is None:
                _, protocol = await self._loop.connect_accepted_socket(self._protocol, conn)
            else:
                assert tls is not None
                # The deadline runs from the accept: what the hello's check took counts.
                left = started + tls.handshake_timeout - self._loop.time()
                _, protocol = await self._loop.connect_accepted_socket(
                    self._protocol,
                    conn,
                    ssl=context,
                    ssl_handshake_timeout=max(left, 0.001),
                )
        except (OSError, TimeoutError) as exc:  # reset before we got to it, or a failed handshake
            self._open_failed(conn, started, chosen, exc)
            return None
        return protocol

    def _open_failed(
        self, conn: socket.socket, started: float, chosen: _Chosen | None, exc: BaseException
    ) -> None:
        """``conn`` got no transport: reset before we got to it, or its handshake
        failed (a TLS failure record) or ran out of time."""
        if not isinstance(exc, (OSError, TimeoutError)):
            # A bug: reported as a Task's would be, not raised into the accept loop
            # (``_open_now`` runs there).
            self._loop.call_exception_handler(
                {"message": "opening an accepted connection failed", "exception": exc}
            )
            conn.close()
            return
        tls = self._tls
        if chosen is not None and tls is not None:
            # The loop ends a handshake past its deadline with ConnectionAbortedError.
            late = self._loop.time() - started >= tls.handshake_timeout
            if late and isinstance(exc, ConnectionAbortedError):
                exc = TimeoutError(str(exc))
            tls.tls_failed(chosen[2], chosen[3], exc)
        else:
            log.debug("accepted connection lost before it opened: %s", exc)
        conn.close()

    async def _read_hello_headers(
        self, conn: socket.socket, timeout: float, head: bytes | None = None
    ) -> BaseException | None:
        """Wait for the client's first bytes (unless ``head`` holds them already) and
        judge its ClientHello's headers (``refuse_client_hello``) before OpenSSL reads
        them: a refusal is answered here (an alert, or a close for bytes that are not
        TLS). None: go on."""
        # (accept() hands out blocking sockets: every read here says MSG_DONTWAIT rather
        # than an ioctl making it non-blocking, which the event loop's does again.)
        try:  # usually there already: the client sends its hello as it connects
            if head is None or len(head) < HELLO_HEADERS:
                head = conn.recv(HELLO_HEADERS, _PEEK_NOW)  # ConnectionError: gone
        except BlockingIOError:
            loop = self._loop
            fd = conn.fileno()
            readable: asyncio.Future[None] = loop.create_future()

            def ready() -> None:  # the reader fires until it is removed
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(fd, ready)
            try:
                await asyncio.wait_for(readable, timeout)
            except TimeoutError as exc:
                return exc
            finally:
                loop.remove_reader(fd)
            head = conn.recv(HELLO_HEADERS, _PEEK_NOW)
        if not head:
            raise ConnectionResetError("closed before its ClientHello")
        if len(head) < HELLO_HEADERS:
            # A client that trickles its first bytes: OpenSSL's own bound (128 KiB)
            # and the handshake deadline apply to it.
            return None
        return _refuse_hello_head(conn, head)

    async def _judge_hello(
        self,
        conn: socket.socket,
        policy: ConnectionPolicy,
        deadline: float,
        peer: Address,
        local: Address,
    ) -> BaseException | None:
        """``serverNames`` on a terminated port: read the whole ClientHello without
        taking it from the socket (MSG_PEEK, and SO_RCVLOWAT to wait for more than is
        there), judge it as a judged port does, and answer a denial with
        ``access_denied`` before OpenSSL reads a byte. None: go on to the handshake."""
        loop = self._loop
        fd = conn.fileno()
        try:
            while True:
                data = conn.recv(PEEK_LIMIT, _PEEK_NOW)
                if not data:
                    raise ConnectionResetError("closed in its ClientHello")
                try:
                    hello = ClientHelloReader().feed(data)
                except ProtocolError as err:
                    if err.wire_reply:
                        with contextlib.suppress(OSError):
                            conn.send(err.wire_reply, socket.MSG_DONTWAIT)
                    return err
                if hello is not None:
                    break
                # Readable again only once more than what is there has come.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
                readable: asyncio.Future[None] = loop.create_future()

                def ready(fut: asyncio.Future[None] = readable) -> None:
                    if not fut.done():
                        fut.set_result(None)

                loop.add_reader(fd, ready)
                try:
                    await asyncio.wait_for(readable, max(deadline - loop.time(), 0))
                except TimeoutError as exc:
                    return exc
                finally:
                    loop.remove_reader(fd)
        finally:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        request = hello.request()
        decision = policy.decide(request)
        assert self._tls is not None
        self._tls.hello_judged(peer, local, request, decision)
        if decision.allowed:
            return None
        with contextlib.suppress(OSError):
            conn.send(hello.alert(ACCESS_DENIED), socket.MSG_DONTWAIT)
        return _Denied()

    def _linger_close(self, conn: socket.socket) -> None:
        """Close after our answer without a reset: FIN, then read and discard until
        the client closes (or LINGER_SECONDS pass), as ``Pipe.close`` does. Closing
        with unread input would send an RST that can destroy the alert before it is read."""
        loop = self._loop
        fd = conn.fileno()
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

        def finish() -> None:
            if conn.fileno() >= 0:
                loop.remove_reader(fd)
                conn.close()
            deadline.cancel()

        def drain() -> None:
            try:
                if conn.recv(65536, socket.MSG_DONTWAIT):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            finish()

        deadline = loop.call_later(LINGER_SECONDS, finish)
        loop.add_reader(fd, drain)

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self._fd, self._accept_some)

    def close(self) -> None:
        """Stop accepting and close our descriptor of the listening socket."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            self._sock.close()


@dataclass(frozen=True)
class Upstream:
    """Firewall mode: where the one protected service lives."""

    host: str
    port: int
    endpoint: Endpoint


class Proxy:
    def __init__(
        self,
        state: PolicyState,
        flowlog: FlowLog,
        *,
        limits: ProxyLimits | None = None,
        upstream: Upstream | None = None,
        mark: int = 0,
        preserve_source: bool = True,
        tls: TlsStore | None = None,
    ):
        self.state = state
        # TLS contexts (terminatingTLS/originatingTLS, the firewall's --tls-*).
        self.tls = tls
        self.flowlog = flowlog
        self.limits = limits or ProxyLimits()
        # The handshake is a TLS connection's head: it has the head's deadline.
        self.handshake_timeout = self.limits.header_timeout
        self.stats = ProxyStats()
        # Bytes held in frames by all of this proxy's connections together.
        self.held = HeldBudget(self.limits.max_held_bytes)
        self.upstream = upstream
        self.mark = mark
        self.preserve_source = preserve_source
        # The event loop it serves on (known once it listens): kept, because asking
        # asyncio for the running loop costs a getpid() system call each time.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipes: set[Pipe] = set()
        # Set when _pipes is empty again, for those waiting for that (wait_all_closed):
        # made by the first of them, not set and cleared by every connection.
        self._no_pipes: asyncio.Event | None = None
        self._acceptors: list[Acceptor] = []
        self._listen_ports: set[int] = set()
        # _connection's answers but the source port, by (source ip, destination ip,
        # port), for one policy (and one set of listening ports).
        self._connections: dict[
            tuple[str, str, int],
            tuple[str, str, int, dict[str, Any], dict[str, Any], ConnectionPolicy] | None,
        ] = {}
        self._connections_for: object = None
        # Connections open at the most since memory was last given back.
        self._peak_pipes = 0
        self._give_back: asyncio.TimerHandle | None = None
        # admit_silent's answers by (source ip, destination ip, port), for one policy.
        self._silent_waits: dict[tuple[str, str, int], bool] = {}
        self._silent_for: object = None
        self._silent_since = 0.0
        # tls_context's answers by (source ip, destination ip, port), for one policy and
        # one set of TLS contexts.
        self._tls_choices: dict[tuple[str, str, int], _Terminated | None] = {}
        self._tls_choices_for: object = None
        self._tls_choices_generation = -1
        self._tls_choices_since = 0.0
        # The engine factory of each parser family, made once: its engines share what
        # they may across this proxy's connections (the HTTP/1.1 heads seen lately).
        self._engine_factories: dict[str, EngineFactory] = {}

    # ------------------------------------------------------------ listeners

    async def listen(
        self, host: str, port: int, *, transparent: bool = False, sock: socket.socket | None = None
    ) -> socket.socket:
        self._loop = asyncio.get_running_loop()
        if sock is None:
            sock = make_listener(host, port, transparent=transparent, backlog=self.limits.backlog)
        bound = sock.getsockname()
        # Firewall mode: clients connect to the listener itself, so a listener bound to
        # one address is every connection's local address (a redirect's destination, or
        # a wildcard's, is each connection's own).
        one_address = self.upstream is not None and not transparent and not _is_wildcard(bound[0])
        self._acceptors.append(
            Acceptor(
                sock,
                partial(ClientSide, self),
                self if self.tls is not None else None,
                admission=self,
                local=bound if one_address else None,
            )
        )
        self._listen_ports.add(bound[1])
        self._connections.clear()  # a direct connection to this port is refused now
        return sock

    # ------------------------------------------------------------ draining

    @property
    def connections(self) -> int:
        """Open client connections, including those in their lingering close and
        those that have not spoken yet."""
        return len(self._pipes) + sum(acceptor.silent for acceptor in self._acceptors)

    def stop_accepting(self) -> None:
        """Close our listening sockets' descriptors (a successor may hold the same sockets)."""
        for acceptor in self._acceptors:
            acceptor.close()

    async def wait_all_closed(self) -> None:
        """Return once no client connection is open (at once if none is)."""
        while True:
            if self._pipes:
                if self._no_pipes is None:
                    self._no_pipes = asyncio.Event()
                await self._no_pipes.wait()
            for acceptor in self._acceptors:
                await acceptor.none_silent()
            # One that spoke meanwhile is a pipe now.
            if not self._pipes and not any(acceptor.silent for acceptor in self._acceptors):
                return

    def close_when_idle(self) -> list[asyncio.Future[str]]:
        """Ask every connection not already ending to end at its next idle
        point (``Pipe.close_when_idle``), and every one that has not spoken yet to
        end if it is still silent a moment from now; one future per connection asked."""
        endings = [pipe.close_when_idle() for pipe in list(self._pipes) if not pipe.closing]
        for acceptor in self._acceptors:
            endings += acceptor.end_silent_when_quiet()
        return endings

    async def close(self, grace: float = 0.0) -> int:
        """Stop accepting; after up to ``grace`` seconds for connections to end
        by themselves, close the rest. Returns how many this close cut: those
        whose close it was (``Pipe.close`` says so). A connection that was already
        ending, or whose transport was already gone with its ``connection_lost``
        still to run (reset by a drain a moment ago, or by its client), is in the
        set until then, but it is not cut here, and not counted."""
        self.stop_accepting()
        if self._give_back is not None:
            self._give_back.cancel()
            self._give_back = None
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_all_closed(), grace)
        cut = sum(pipe.close("proxy shutting down") for pipe in list(self._pipes))
        cut += sum(acceptor.close_silent() for acceptor in self._acceptors)
        self.flowlog.flush()
        return cut

    # ------------------------------------------------------------ per connection

    def _connection(
        self, peer: Address, local: Address
    ) -> tuple[str, int, str, int, dict[str, Any], dict[str, Any], ConnectionPolicy] | None:
        """Who is connecting to what (their flow-log descriptions, ``Side.describe``),
        and the policy of that connection; None for a direct connection to the proxy
        port itself, not a redirected flow.

        All but the source port is the same for every connection from one address to
        one destination, and follows from the policy in force alone (its ipcache,
        endpoints and identities): kept per policy, as the policy of such connections
        is one (it depends on their identities, endpoints and port, not on the source
        port). The descriptions are shared by those connections' flow records, as a
        connection's own records share them (nothing changes a record's fields)."""
        known = self._known_connection(peer, local)
        if known is None:
            return None
        src_ip, dst_ip, dst_port, src_shape, dst, policy = known
        # The source's description with this connection's port (in its place).
        src = {**src_shape, "port": peer[1]}
        return src_ip, peer[1], dst_ip, dst_port, src, dst, policy

    def _known_connection(
        self, peer: Address, local: Address
    ) -> tuple[str, str, int, dict[str, Any], dict[str, Any], ConnectionPolicy] | None:
        """``_connection``'s answer as it is kept: the source's description without
        its port."""
        connections = self._connections
        key = (peer[0], local[0], local[1])
        current = self.state.current
        if self._connections_for is not current:
            self._connections_for = current
            connections.clear()
        if key in connections:
            return connections[key]
        if len(connections) >= 4096:  # (bounded where it grows)
            connections.clear()
        known = connections[key] = self._new_connection(peer, local)
        return known

    def _new_connection(
        self, peer: Address, local: Address
    ) -> tuple[str, str, int, dict[str, Any], dict[str, Any], ConnectionPolicy] | None:
        src_ip, src_port = _v4(peer[0]), peer[1]
        if self.upstream is not None:
            dst_ip, dst_port, dst_ep = (
                self.upstream.host,
                self.upstream.port,
                self.upstream.endpoint,
            )
        else:
            dst_ip, dst_port, dst_ep = _v4(local[0]), local[1], None
            if (
                dst_port in self._listen_ports
                and self.state.current.endpoints_by_ip.get(dst_ip) is None
                and _is_local(dst_ip)
            ):
                return None
        state = self.state
        src = state.side(src_ip, src_port)
        dst = state.side(dst_ip, dst_port, dst_ep)
        identities = state.current.identities
        policy = state.connection(src, dst)
        return src_ip, dst_ip, dst_port, src.describe(identities), dst.describe(identities), policy

    # ------------------------------------------------------------ silent connections

    def silent_wait(self, peer: Address, local: Address) -> float | None:
        """A client-first protocol's connection waits for its first byte as a bare
        socket, under the idle timeout (the deadline a pipe gives a connection that
        has not spoken: ``Pipe._check_timers``); a port without L7 rules, whose
        server may speak first, and a refused connection are opened at once."""
        # What decides it (the source's identity, the destination and its port) is
        # the same for most connections: a policy lookup costs more than the rest of
        # an accept, so the answers are kept for as long as the policy stays.
        key = (peer[0], local[0], local[1])
        assert self._loop is not None  # it listens
        now = self._loop.time()
        if (
            self._silent_for is not self.state.current
            or now - self._silent_since > 1.0  # identities move without a new policy
            or len(self._silent_waits) >= 4096
        ):
            self._silent_for, self._silent_since = self.state.current, now
            self._silent_waits.clear()
        if key in self._silent_waits:
            silent = self._silent_waits[key]
        else:
            silent = self._silent_waits[key] = self._may_stay_silent(peer, local)
        return self.limits.idle_timeout if silent else None

    def hold_silent(self, conn: socket.socket) -> None:
        if self.upstream is None:
            # As its pipe will (reset_if_killed): a kill must not leave our side in
            # TIME_WAIT on the client's 4-tuple (docs/restarts.md).
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # It is an open connection from now, as a pipe would have made it.
        self.stats.connections_total += 1
        self.stats.connections_active += 1

    def _may_stay_silent(self, peer: Address, local: Address) -> bool:
        known = self._connection(peer, local)
        if known is None:
            return False
        policy = known[-1]
        if not policy.l4.allowed or not policy.parser:
            return False
        return bool(getattr(engine_factory(policy.parser), "client_speaks_first", False))

    def silent_ended(self, spoke: bool) -> None:
        self.stats.connections_active -= 1
        if spoke:
            self.stats.connections_total -= 1  # its pipe counts it again as it opens

    def never_spoke(self, conn: socket.socket) -> None:
        """The idle timeout's flow record, as a pipe writes it (``Pipe._check_timers``)."""
        try:
            known = self._connection(conn.getpeername(), conn.getsockname())
        except OSError:  # reset meanwhile: it left, it was not cut
            return
        if known is None:
            return
        src, dst, policy = known[4], known[5], known[6]
        idle = self.limits.idle_timeout
        rec = now_fields()
        rec.update(
            type="limit",
            protocol=policy.parser or "tcp",
            source=src,
            destination=dst,
            verdict="DROPPED",
            limit="idle_timeout",
            reason=f"no byte either way for {idle:g} s",
        )
        self.flowlog.emit(rec)

    # ------------------------------------------------------------ TLS termination

    def tls_context(self, peer: Address, local: Address) -> _Terminated | None:
        """Terminate this connection's TLS? Its port's ``terminatingTLS`` (or the
        firewall's certificate) says so; a connection policy refuses is not
        terminated, so that ``open_pipe`` refuses it without a handshake."""
        tls = self.tls
        if tls is None:
            return None
        # As admit_silent's: the answer depends on the source's identity, the
        # destination and its port, and the contexts in force, and the policy lookup
        # costs as much as the rest of an accept; kept while the policy and the
        # contexts stay (and a second at most: identities move without a new policy).
        # Whether anything is terminated at all is one of those answers: it changes
        # only with the contexts (a new generation).
        choices = self._tls_choices
        key = (peer[0], local[0], local[1])
        assert self._loop is not None  # it listens
        now = self._loop.time()
        if (
            self._tls_choices_for is not self.state.current
            or self._tls_choices_generation != tls.generation
            or now - self._tls_choices_since > 1.0
        ):
            self._tls_choices_for, self._tls_choices_since = self.state.current, now
            self._tls_choices_generation = tls.generation
            choices.clear()
        if key in choices:
            return choices[key]
        if len(choices) >= 4096:  # (bounded where it grows)
            choices.clear()
        chosen = choices[key] = self._choose_tls(peer, local) if tls.terminates else None
        return chosen

    def _choose_tls(self, peer: Address, local: Address) -> _Terminated | None:
        assert self.tls is not None
        known = self._connection(peer, local)
        if known is None or not known[-1].l4.allowed:
            return None
        policy = known[-1]
        tls = policy.tls
        context = self.tls.server_context(
            tls.terminating if tls is not None else None, policy.parser
        )
        if context is None:
            return None
        return context, policy if tls is not None and tls.server_names else None

    def hello_judged(
        self, peer: Address, local: Address, request: TlsClientHello, decision: Decision
    ) -> None:
        """The flow record of a terminated connection's judged ClientHello."""
        known = self._connection(peer, local)
        if known is None:
            return
        rec = now_fields()
        rec.update(
            type="l7",
            protocol=request.protocol,
            source=known[4],
            destination=known[5],
            l7=request.flow_fields(),
            reply={} if decision.allowed else {"alert": "access_denied"},
            verdict=decision.verdict,
            policy=decision.policy,
            rule=decision.rule,
            reason=decision.reason,
        )
        self.flowlog.emit(rec)

    def tls_failed(self, peer: Address, local: Address, exc: BaseException) -> None:
        """A flow record for a handshake that failed (a client that does not trust
        our certificate, a missing client certificate) or ran out of time."""
        self.stats.tls_handshake_failures += 1
        known = self._connection(peer, local)
        if known is None:
            return
        src, dst = known[4], known[5]
        timed_out = isinstance(exc, TimeoutError)
        limit = TLS_HANDSHAKE_TIMEOUT if timed_out else getattr(exc, "limit", None)
        if timed_out:
            reason = f"TLS handshake not complete {self.handshake_timeout:g} s after the connection"
        elif isinstance(exc, ProtocolError):  # refused from its first bytes, by parsers/tls
            reason = f"ClientHello refused: {exc}"
        else:
            reason = f"TLS handshake failed: {_tls_reason(exc)}"
        log.info("%s:%s: %s", peer[0], peer[1], reason)
        rec = now_fields()
        rec.update(
            type="limit" if limit else "tls",
            protocol="tls",
            source=src,
            destination=dst,
            verdict="DROPPED",
            reason=reason,
        )
        if limit:
            rec["limit"] = limit
        self.flowlog.emit(rec)

    # ------------------------------------------------------------ per connection

    def open_pipe(self, transport: asyncio.Transport) -> Pipe | None:
        loop = self._loop
        assert loop is not None  # it listens
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if peer is None or local is None:
            # Reset between its first bytes and its transport: no one left to serve
            # (the event loop found no address for the socket).
            return None
        # (``_connection``'s answer, taken apart here without a tuple made between.)
        known = self._known_connection(peer, local)
        if known is None:
            self.stats.connections_refused += 1
            return None
        src_ip, dst_ip, dst_port, src_shape, dst_info, policy = known
        src_info = {**src_shape, "port": peer[1]}
        if not policy.l4.allowed:
            self.stats.connections_refused += 1
            rec = now_fields()
            rec.update(
                type="drop",
                protocol="tcp",
                source=src_info,
                destination=dst_info,
                verdict="DROPPED",
                reason=policy.l4.reason,
            )
            self.flowlog.emit(rec)
            return None
        # A terminated session: what it negotiated goes into every flow record,
        # and the upstream is asked for the same server name and protocol.
        session: dict[str, Any] | None = None
        upstream_tls: ssl.SSLContext | None = None
        tls = self.tls
        if tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                session = session_fields(transport, ssl_object)
            # (No upstream context unless one is in force: most ports are cleartext.)
            if tls.originates:
                if session is not None:
                    alpn = session["alpn"]
                else:  # a cleartext client: HTTP/2 upstream needs ALPN h2
                    alpn = "http/1.1" if policy.parser == "http" else None
                ports = policy.tls
                upstream_tls = tls.client_context(
                    ports.originating if ports is not None else None, alpn
                )
        connect: partial[asyncio.Task[Any]]
        if upstream_tls is not None:
            assert tls is not None
            # The name the upstream's certificate must have (and its SNI): the one the
            # client asked us for, else the firewall's --upstream-server-name, else its
            # address.
            upstream_name = (
                (session["sni"] if session is not None else None)
                or tls.upstream_server_name
                or dst_ip
            )
            connect = partial(
                self._connect_upstream, src_ip, dst_ip, dst_port, upstream_tls, upstream_name
            )
        else:
            connect = partial(self._connect_upstream, src_ip, dst_ip, dst_port, None, "")
        parser = policy.parser
        engine: Engine
        if parser:
            make = self._engine_factories.get(parser)
            if make is None:
                make = self._engine_factories[parser] = proxy_engine_factory(parser)
            engine = make(policy.decide, max_pending=self.limits.max_pending_requests)
        else:
            engine = PassthroughEngine()
        pipe = Pipe(
            loop,
            engine,
            self.flowlog,
            parser or "tcp",
            self.limits,
            self.stats,
            client=transport,
            source=src_info,
            destination=dst_info,
            connect=connect,
            # The kernel redirect is what turns a TIME_WAIT left on a client's tuple
            # into a trap for its next SYN (docs/restarts.md): transparent mode only.
            reset_if_killed=self.upstream is None,
            budget=self.held,
            tls=session,
        )
        # (TCP_NODELAY: uvloop and asyncio both set it on every TCP transport.)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        pipes = self._pipes
        pipes.add(pipe)
        if len(pipes) > self._peak_pipes:
            self._peak_pipes = len(pipes)
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        return pipe

    def pipe_closed(self, pipe: Pipe) -> None:
        """The client connection of ``pipe`` is gone (called by its protocol)."""
        pipes = self._pipes
        if pipe in pipes:
            pipes.discard(pipe)
            self.stats.connections_active -= 1
            if not pipes and self._no_pipes is not None:
                self._no_pipes.set()  # (a later waiter makes another)
                self._no_pipes = None
            gone = self._peak_pipes - len(pipes)
            if gone >= GIVE_BACK_AFTER_CLOSED and self._give_back is None:
                loop = asyncio.get_running_loop()
                self._give_back = loop.call_later(GIVE_BACK_DELAY, self._give_memory_back)

    def _give_memory_back(self) -> None:
        """Many connections have ended (an attack, a burst): their memory goes back."""
        self._give_back = None
        self._peak_pipes = len(self._pipes)
        give_memory_back()

    def _connect_upstream(
        self,
        src_ip: str,
        dst_ip: str,
        dst_port: int,
        tls: ssl.SSLContext | None,
        server_name: str,
        pipe: Pipe,
    ) -> asyncio.Task[Any]:
        """Start connecting ``pipe``'s upstream, within ``connect_timeout``: the task
        the pipe cancels if it ends first. (The pipe last: ``open_pipe`` binds the
        rest, and the pipe calls what it is given with itself.)"""
        loop = self._loop
        assert loop is not None  # it listens
        protocol = partial(ServerSide, pipe)
        if self.upstream is not None:
            if tls is None:
                coro = loop.create_connection(protocol, dst_ip, dst_port)
            else:
                # originatingTLS: the handshake is part of connecting, under the same deadline.
                coro = loop.create_connection(
                    protocol, dst_ip, dst_port, ssl=tls, server_hostname=server_name
                )
        else:
            coro = self._transparent_connect(
                pipe, protocol, src_ip, dst_ip, dst_port, tls, server_name
            )
        # A timer for the deadline and a callback for the end, not a coroutine under
        # asyncio.timeout: that costs a second coroutine and half a dozen calls in
        # Python per connection.
        task = loop.create_task(coro)
        deadline = loop.call_later(
            self.limits.connect_timeout, self._upstream_late, pipe, task, dst_ip, dst_port
        )
        task.add_done_callback(partial(self._upstream_done, pipe, deadline, dst_ip, dst_port))
        return task

    def _upstream_late(
        self, pipe: Pipe, task: asyncio.Task[Any], dst_ip: str, dst_port: int
    ) -> None:
        """The connect's deadline passed: it is cancelled, and the pipe ends."""
        if task.done() or pipe.closing:
            return  # connected (or failed) just in time, or nobody is waiting any more
        task.cancel()
        # (A deadline has no message of its own.)
        self._upstream_failed(pipe, dst_ip, dst_port, "timeout")

    def _upstream_done(
        self,
        pipe: Pipe,
        deadline: asyncio.TimerHandle,
        dst_ip: str,
        dst_port: int,
        task: asyncio.Task[Any],
    ) -> None:
        """The connect ended: connected (``ServerSide`` told the pipe), cancelled (by
        the pipe, or by its deadline, which ended the pipe), or failed."""
        deadline.cancel()
        if pipe.closing or task.cancelled():
            return  # nobody is waiting for this upstream any more
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, OSError):
            raise exc  # a bug: the event loop's exception handler reports it
        why = _tls_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc) or "timeout"
        self._upstream_failed(pipe, dst_ip, dst_port, why)

    def _upstream_failed(self, pipe: Pipe, dst_ip: str, dst_port: int, why: str) -> None:
        self.stats.upstream_failures += 1
        log.info("upstream %s:%s unreachable: %s", dst_ip, dst_port, why)
        pipe.close(f"upstream unreachable: {why}")

    async def _transparent_connect(
        self,
        pipe: Pipe,
        protocol: Callable[[], ServerSide],
        src_ip: str,
        dst_ip: str,
        dst_port: int,
        tls: ssl.SSLContext | None,
        server_name: str,
    ):
        loop = self._loop
        assert loop is not None  # it listens
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            # The server's replies can only be steered back to a socket bound to
            # the client's address when the server sits behind an endpoint veth;
            # toward the host or the world, connect from our own address.
            if self.preserve_source and dst_ip in self.state.current.endpoints_by_ip:
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((src_ip, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (dst_ip, dst_port))
            if pipe.closing:
                sock.close()
                return None
            if tls is None:
                return await loop.create_connection(protocol, sock=sock)
            # originatingTLS: the handshake is part of connecting, under the same deadline.
            return await loop.create_connection(
                protocol, sock=sock, ssl=tls, server_hostname=server_name
            )
        except BaseException:
            sock.close()
            raise


def make_listener(
    host: str,
    port: int,
    *,
    transparent: bool = False,
    backlog: int | None = None,
    reuse_port: bool = False,
) -> socket.socket:
    """A bound, listening socket (``backlog``: the kernel's somaxconn unless given).
    ``reuse_port``: one of a group on the same address, among which the kernel
    spreads new connections by a hash of their addresses (``firewall --workers``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(kernel_somaxconn() if backlog is None else backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: address in use") from None
        raise
    return sock


def _close_silent(conn: socket.socket, *, reset: bool) -> None:
    """Close a connection that never spoke: with a FIN as ``Pipe.close`` ends one (no
    reply of ours to protect, so no lingering), or with a reset (a drain's quiet end,
    as ``Pipe.close_when_idle``: no TIME_WAIT left on the client's 4-tuple)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(reset), 0))
    conn.close()


def _follow(ending: asyncio.Future[str], protocol: asyncio.BaseProtocol | None) -> None:
    """A drain asked a silent connection to end and it spoke: it ends as its pipe does."""
    pipe_ending = protocol.close_when_idle() if isinstance(protocol, ClientSide) else None
    if pipe_ending is None:
        if not ending.done():
            ending.set_result(ENDED_OTHERWISE)
        return

    def done(finished: asyncio.Future[str]) -> None:
        if not ending.done():
            ending.set_result(finished.result() if not finished.cancelled() else ENDED_OTHERWISE)

    pipe_ending.add_done_callback(done)


def _peek_now(conn: socket.socket, size: int) -> bytes | None:
    """Up to ``size`` of the bytes waiting in ``conn``, left there; b"": its client
    closed or reset it; None: nothing came yet."""
    try:
        return conn.recv(size, _PEEK_NOW)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:  # reset, or any other error: gone
        return b""


def _run_bare(
    coro: Coroutine[Any, Any, Any],
    failed: Callable[[Exception], None],
    _awaited: asyncio.Future[Any] | None = None,
) -> None:
    """Run ``coro`` to its end without a Task: a coroutine of the event loop's own
    that awaits only its futures (``connect_accepted_socket``), whose result is not
    wanted (its protocol is told of its transport). It goes on each time a future it
    awaits is done, as a Task would have it; what it raises goes to ``failed``.
    (Nobody cancels it, as nobody cancelled the Task it replaces: a handshake ends by
    its own deadline.)"""
    try:
        awaited = coro.send(None)
    except StopIteration:
        return
    except Exception as exc:
        failed(exc)
        return
    awaited.add_done_callback(partial(_run_bare, coro, failed))


def _refuse_hello_head(conn: socket.socket, head: bytes) -> ProtocolError | None:
    """Judge a ClientHello's headers (``refuse_client_hello``), ``head`` holding them
    whole, and answer a refusal (an alert, or nothing for bytes that are not TLS)."""
    refusal = refuse_client_hello(head)
    if refusal is not None and refusal.wire_reply:
        with contextlib.suppress(OSError):
            conn.send(refusal.wire_reply, socket.MSG_DONTWAIT)
    return refusal


def _v4(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


class _Denied(Exception):
    """A ClientHello policy denied: answered, and recorded, already."""


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's short reason (CERTIFICATE_VERIFY_FAILED, ...) and its detail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or type(exc).__name__


def _is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "")


def _is_local(ip: str) -> bool:
    return ip.startswith("127.") or ip == "0.0.0.0"
