"""The peers of ``bench/hostile.py`` that are not attacks (no ``main``: not a benchmark).

- **legitimate clients** (HTTP/1.1 and HTTP/2), each in a process of its own, so that an
  attacker busy in the bench's process does not show up in their latency: one keep-alive
  connection, one request at a time, a fixed pace, every request timed;
- a **raw upstream** (its own process too) for what nginx cannot play: it answers an HTTP/1.1
  request only once its whole body has arrived, and never answers ``/silent`` (it reads and
  discards, so only the proxy's own limits can stop a client pipelining toward it);
- the **HTTP/2 wire** the attackers speak: raw frames, hand-built, and a frame reader;
- **what came back**: a reply read off the wire, classified (``408``, ``GOAWAY(CODE)``,
  ``close``, ``reset``), and a summary of many.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bench.common import LOOPBACK, median, percentile

# One spawned (not forked) process per peer: the bench process holds thousands of sockets
# and an event loop, none of which a child should inherit.
SPAWN = multiprocessing.get_context("spawn")

# --------------------------------------------------------------------------- HTTP/2 frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
FRAME_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PING: "PING",
    GOAWAY: "GOAWAY",
    0x8: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL = 0x8
SETTINGS_HEADER_TABLE_SIZE = 0x1

# GET http://bench/ from the HPACK static table alone (:method GET, :scheme http, :path /)
# plus :authority as a literal never indexed: no dynamic-table state, so the same bytes
# are a valid header block on every stream, however many times they are sent.
GET_BLOCK = b"\x82\x86\x84\x01\x05bench"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame (RFC 9113 §4.1)."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def error_name(code: int) -> str:
    from h2.errors import ErrorCodes

    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class FrameReader:
    """HTTP/2 frames out of a byte stream: (type, flags, stream, payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self._buf
        buf += data
        frames = []
        pos = 0  # consumed once at the end: a flood of small frames costs no memmove each
        while len(buf) - pos >= 9:
            end = pos + 9 + int.from_bytes(buf[pos : pos + 3], "big")
            if end > len(buf):
                break
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            frames.append((buf[pos + 3], buf[pos + 4], stream, bytes(buf[pos + 9 : end])))
            pos = end
        del buf[:pos]
        return frames


def goaway_of(payload: bytes) -> str:
    """``GOAWAY(CODE)`` from a GOAWAY frame's payload (debug data, if any, in brackets)."""
    code = int.from_bytes(payload[4:8], "big")
    debug = payload[8:].decode("latin-1")[:40]
    return f"GOAWAY({error_name(code)}{', ' + debug if debug else ''})"


# --------------------------------------------------------------------------- what came back


def reply_kind(reply: bytes, *, reset: bool = False) -> str:
    """How a proxy ended an HTTP/1.1 connection: its status code, ``close`` or ``reset``."""
    if reply.startswith(b"HTTP/1.") and len(reply) >= 12:
        return reply[9:12].decode("latin-1")
    if reset:
        return "reset"
    return "close" if not reply else "bytes"


@dataclass
class Ending:
    """One attacking connection: how it ended (``open``: the proxy never cut it) and when,
    in seconds from its first byte (or from the attack's start, for floods)."""

    how: str
    after: float | None = None

    @property
    def cut(self) -> bool:
        return self.how != "open"


def summarize_endings(endings: Sequence[Ending]) -> dict[str, Any]:
    """How many were cut, by what, and when (median and slowest)."""
    times = [e.after for e in endings if e.cut and e.after is not None]
    return {
        "connections": len(endings),
        "cut": sum(e.cut for e in endings),
        "how": dict(Counter(e.how for e in endings).most_common()),
        "cut_after_median_s": round(median(times), 2) if times else None,
        "cut_after_max_s": round(max(times), 2) if times else None,
    }


# --------------------------------------------------------------------------- legitimate clients

HTTP1_GET = "GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: legitimate\r\n\r\n"

# (monotonic time the request was sent, latency in seconds or None, error or "")
Sample = tuple[float, float | None, str]


class _Http1Client:
    def __init__(self, address: tuple[str, int], path: str, timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self.request = HTTP1_GET.format(path=path).encode()
        self.sock: socket.socket | None = None

    def get(self) -> int:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
        self.sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
        while len(body) < length:
            body += self._recv()
        if close:
            self.reset()
        return int(lines[0].split()[1])

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the proxy")
        return chunk

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


class _H2Client:
    def __init__(self, address: tuple[str, int], path: str, timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self.headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"bench"),
            (b":path", path.encode()),
            (b"user-agent", b"legitimate"),
        ]
        self.sock: socket.socket | None = None
        self.conn: Any = None

    def get(self) -> int:
        import h2.events as ev
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            self.conn.initiate_connection()
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, self.headers, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        status = 0
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            for event in self.conn.receive_data(data):
                if isinstance(event, ev.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, ev.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, ev.StreamReset) and event.stream_id == stream:
                    raise ConnectionError(f"RST_STREAM({error_name(int(event.error_code))})")
                elif isinstance(event, ev.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY({error_name(int(event.error_code or 0))})")
                elif isinstance(event, ev.StreamEnded) and event.stream_id == stream:
                    out = self.conn.data_to_send()
                    if out:
                        self.sock.sendall(out)
                    return status
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.conn = None, None


def _legit_main(
    protocol: str,
    address: tuple[str, int],
    path: str,
    interval: float,
    timeout: float,
    stop: Any,
    ready: Any,
    out: multiprocessing.connection.Connection,
) -> None:
    """A legitimate client's process: a GET every ``interval`` seconds until ``stop``."""
    client = (_H2Client if protocol == "h2" else _Http1Client)(address, path, timeout)
    samples: list[Sample] = []
    while not stop.is_set():
        sent = time.monotonic()
        try:
            status = client.get()
            samples.append((sent, time.monotonic() - sent, "" if status == 200 else str(status)))
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request
            # A timeout or a reset by its class; what the proxy said (GOAWAY...) by name.
            said = str(exc) if type(exc) is ConnectionError else ""
            samples.append((sent, None, said or type(exc).__name__))
            client.reset()
        if samples[-1][2] == "":
            ready.set()
        stop.wait(max(0.0, interval - (time.monotonic() - sent)))
    client.reset()
    out.send(samples)
    out.close()


class LegitClient:
    """A legitimate client in its own process; ``stop()`` returns its samples."""

    def __init__(
        self,
        protocol: str,
        address: tuple[str, int],
        path: str,
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._stop = SPAWN.Event()
        self._ready = SPAWN.Event()
        self._recv, send = SPAWN.Pipe(duplex=False)
        self._proc = SPAWN.Process(
            target=_legit_main,
            args=(protocol, address, path, interval, timeout, self._stop, self._ready, send),
            daemon=True,
        )
        self._proc.start()
        send.close()

    def wait_ready(self, timeout: float) -> bool:
        """True once a request was answered 200."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 15.0) -> list[Sample]:
        self._stop.set()
        samples: list[Sample] = []
        if self._recv.poll(timeout):
            samples = self._recv.recv()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        return samples


def latency_stats(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """p50/p99/max in ms of the requests sent within [start, end], and the failures."""
    within = [s for s in samples if start <= s[0] <= end]
    ok = [lat * 1000 for _, lat, err in within if lat is not None and not err]
    failures = Counter(err for _, _, err in within if err)
    return {
        "requests": len(within),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "p50_ms": round(percentile(ok, 50), 2) if ok else None,
        "p99_ms": round(percentile(ok, 99), 2) if ok else None,
        "max_ms": round(max(ok), 2) if ok else None,
    }


# --------------------------------------------------------------------------- raw upstream

OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def _serve_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /silent"):
                while await reader.read(65536):
                    pass  # never answer, never push back: only the proxy can stop the client
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)  # answer only a complete request
            writer.write(OK_KEEP_ALIVE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def _raw_upstream_main(out: multiprocessing.connection.Connection) -> None:
    async def serve() -> None:
        server = await asyncio.start_server(
            _serve_raw, LOOPBACK, 0, backlog=4096, limit=1 << 20, reuse_address=True
        )
        out.send(server.sockets[0].getsockname()[1])
        out.close()
        await server.serve_forever()

    asyncio.run(serve())


@dataclass
class RawUpstream:
    port: int
    pid: int


@contextmanager
def raw_upstream() -> Iterator[RawUpstream]:
    """The raw HTTP/1.1 upstream in its own process; killed on exit."""
    recv, send = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=_raw_upstream_main, args=(send,), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(20):
            raise RuntimeError("the raw upstream did not start")
        assert proc.pid is not None
        yield RawUpstream(recv.recv(), proc.pid)
    finally:
        proc.kill()
        proc.join(5)
