"""The only place where proxied bytes meet sockets.

A ``Pipe`` joins one client transport and one server transport through a
sans-I/O engine: bytes read on either side go into the engine, and the
commands it returns are executed here, in order. Backpressure is the
transports' own: when one side's write buffer passes its high-water mark,
reading from the other side pauses until it drains, so a slow reader never
grows memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from l7proxy.observe.flowlog import FlowLog, now_fields, request_fields
from l7proxy.policy.state import ConnectionPolicy
from parsers.base import (
    Access,
    Close,
    Log,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    ToClient,
    ToServer,
)

log = logging.getLogger("l7proxy.proxy")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
LINGER_SECONDS = 2.0


@dataclass
class ProxyLimits:
    header_timeout: float = 10.0  # a request head must complete within this
    idle_timeout: float = 300.0  # no bytes either way for this long -> close
    connect_timeout: float = 5.0


@dataclass
class ProxyStats:
    """Counters the metrics module reads; plain ints, no locking needed in one loop."""

    connections_total: int = 0
    connections_active: int = 0
    connections_refused: int = 0
    upstream_failures: int = 0
    parse_errors: dict[str, int] = field(default_factory=dict)


class Pipe:
    """One proxied connection. Created by the client-side protocol."""

    __slots__ = (
        "loop",
        "engine",
        "policy",
        "flowlog",
        "protocol",
        "limits",
        "stats",
        "client",
        "server",
        "pending_server",
        "server_eof_pending",
        "closing",
        "last_activity",
        "pending",
        "timer",
        "src_info",
        "dst_info",
        "client_paused_by_us",
        "server_paused_by_us",
        "client_eof_sent",
        "server_eof_sent",
    )

    def __init__(
        self,
        loop,
        engine,
        policy: ConnectionPolicy,
        flowlog: FlowLog,
        protocol: str,
        limits: ProxyLimits,
        stats: ProxyStats,
    ):
        self.loop = loop
        self.engine = engine
        self.policy = policy
        self.flowlog = flowlog
        self.protocol = protocol
        self.limits = limits
        self.stats = stats
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.pending_server: list[bytes] = []
        self.server_eof_pending = False
        self.closing = False
        self.last_activity = loop.time()
        self.pending: dict[Any, tuple[float, Any, Any]] = {}
        self.timer = None
        self.src_info = None
        self.dst_info = None
        self.client_paused_by_us = False
        self.server_paused_by_us = False
        self.client_eof_sent = False
        self.server_eof_sent = False

    # ------------------------------------------------------------- input

    def client_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.execute(self.engine.client_data(data))

    def server_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.execute(self.engine.server_data(data))

    # ------------------------------------------------------------- commands

    def execute(self, commands: list) -> None:
        for cmd in commands:
            kind = type(cmd)
            if kind is ToServer:
                if self.server_eof_sent:
                    log.debug(
                        "%s engine wrote to the server after shutting it down; dropped",
                        self.protocol,
                    )
                elif self.server is not None:
                    self.server.write(cmd.data)
                else:
                    self.pending_server.append(cmd.data)
            elif kind is ToClient:
                if (
                    self.client is not None
                    and not self.client_eof_sent
                    and not self.client.is_closing()
                ):
                    self.client.write(cmd.data)
            elif kind is Access:
                self.pending[cmd.key] = (time.monotonic(), cmd.request, cmd.decision)
            elif kind is Reply:
                self.record(cmd.key, cmd.fields)
            elif kind is ShutdownServer:
                if self.server_eof_sent:
                    continue
                self.server_eof_sent = True
                if self.server is not None:
                    if self.server.can_write_eof():
                        self.server.write_eof()
                else:
                    self.server_eof_pending = True
            elif kind is ShutdownClient:
                if (
                    self.client is not None
                    and not self.client_eof_sent
                    and self.client.can_write_eof()
                ):
                    self.client_eof_sent = True
                    self.client.write_eof()
            elif kind is ParseError:
                errs = self.stats.parse_errors
                key = f"{self.protocol}:{cmd.side}"
                errs[key] = errs.get(key, 0) + 1
                log.info("%s parse error from %s: %s", self.protocol, cmd.side, cmd.error)
                if cmd.close:
                    self.close(f"parse error: {cmd.error}")
            elif kind is Close:
                self.close(cmd.reason)
            elif kind is Log:
                log.log(logging.INFO if cmd.level == "info" else logging.DEBUG, "%s", cmd.message)

    def record(self, key: Any, reply: dict | None) -> None:
        started = self.pending.pop(key, None)
        if started is None:
            return
        t0, request, decision = started
        protocol, fields = request_fields(request)
        rec = now_fields()
        rec.update(
            type="l7",
            protocol=protocol,
            source=self.src_info,
            destination=self.dst_info,
            l7=fields,
            reply=reply or {},
            verdict=decision.verdict,
            policy=decision.policy,
            rule=decision.rule,
            reason=decision.reason,
            latency_ms=round((time.monotonic() - t0) * 1000, 3),
        )
        self.flowlog.emit(rec)

    # ------------------------------------------------------------- lifecycle

    def server_connected(self, transport: asyncio.Transport) -> None:
        self.server = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self.pending_server:
            transport.writelines(self.pending_server)
            self.pending_server = []
        if self.server_eof_pending and transport.can_write_eof():
            transport.write_eof()

    def close(self, reason: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        if self.server is not None and not self.server.is_closing():
            self.server.close()  # flushes what is buffered, then closes
        client = self.client
        if client is not None and not client.is_closing():
            if client.can_write_eof() and not self.client_eof_sent:
                self.client_eof_sent = True
                # Lingering close: send our FIN after the buffered reply, then
                # read and discard until the client closes (or a short while
                # passes). Closing with unread input would send an RST that can
                # destroy the error reply before the client reads it.
                client.write_eof()
                if self.client_paused_by_us:
                    client.resume_reading()
                self.loop.call_later(LINGER_SECONDS, client.close)
            else:
                client.close()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for key in list(self.pending):
            self.record(key, {"closed": reason or "connection closed"})

    def check_timers(self) -> None:
        self.timer = None
        if self.closing:
            return
        now = self.loop.time()
        idle = now - self.last_activity
        if idle > self.limits.idle_timeout:
            self.close("idle timeout")
            return
        if (
            self.engine is not None
            and self.engine.reading_headers
            and idle > self.limits.header_timeout
        ):
            self.close("header read timeout")
            return
        self.timer = self.loop.call_later(
            min(self.limits.header_timeout, self.limits.idle_timeout) / 2, self.check_timers
        )


class ClientSide(asyncio.Protocol):
    """Protocol for an accepted client connection."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.pipe: Pipe | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.pipe = self.proxy.open_pipe(transport)
        if self.pipe is None:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.pipe.closing:
            self.pipe.client_data(data)
        # else: lingering close, discard

    def eof_received(self) -> bool:
        if self.pipe is None:
            return False
        if self.pipe.closing:
            return False  # lingering close is over: let the transport close
        self.pipe.client_data(b"")
        return True  # keep the write side open; the engine decides when to close

    def pause_writing(self) -> None:
        server = self.pipe.server if self.pipe else None
        if server is not None:
            server.pause_reading()
            self.pipe.server_paused_by_us = True

    def resume_writing(self) -> None:
        server = self.pipe.server if self.pipe else None
        if server is not None and self.pipe.server_paused_by_us:
            self.pipe.server_paused_by_us = False
            server.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.pipe is not None:
            self.proxy.pipe_closed(self.pipe)
            self.pipe.close("client closed")


class ServerSide(asyncio.Protocol):
    """Protocol for the upstream connection of one pipe."""

    def __init__(self, pipe: Pipe):
        self.pipe = pipe

    def connection_made(self, transport) -> None:
        self.pipe.server_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.pipe.server_data(data)

    def eof_received(self) -> bool:
        if not self.pipe.closing:
            self.pipe.server_data(b"")
        return True

    def pause_writing(self) -> None:
        client = self.pipe.client
        if client is not None:
            client.pause_reading()
            self.pipe.client_paused_by_us = True

    def resume_writing(self) -> None:
        client = self.pipe.client
        if client is not None and self.pipe.client_paused_by_us:
            self.pipe.client_paused_by_us = False
            client.resume_reading()

    def connection_lost(self, exc) -> None:
        self.pipe.close("server closed")
