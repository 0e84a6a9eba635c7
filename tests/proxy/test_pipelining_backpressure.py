"""Clients that send and never read, against the real ``l7proxy firewall``.

A keep-alive HTTP/1.1 client may pipeline requests. One that pipelines toward
a server that never answers, or never reads the answers it is owed, once made
the proxy read on without limit: 600k requests grew it from 279 to 738 MiB
(issue 14, finding 4). Now reading a client stops while ``--max-pending-requests``
of its requests await an answer, or while it does not read what it is owed,
and resumes when that clears, with nothing lost.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.firewall import GET_ONLY_POLICY, RunningFirewall, running_firewall

LABELS = {"app": "api"}
PENDING_LIMIT = 16


def get(n: int) -> bytes:
    return b"GET /items/%d HTTP/1.1\r\nHost: api\r\n\r\n" % n


def post(n: int) -> bytes:
    return b"POST /items/%d HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n" % n


class WithholdingUpstream:
    """Reads every request and answers none until ``answer()``; from then on it
    answers each request with its own path as the body, in order."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self._answering = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def answer(self) -> None:
        self._answering.set()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        paths: list[bytes] = []
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(1 << 16)
                except TimeoutError:
                    chunk = None
                except OSError:
                    return
                if chunk == b"":
                    return
                if chunk:
                    buf += chunk
                    *heads, buf = buf.split(b"\r\n\r\n")
                    for head in heads:
                        self.received += 1
                        paths.append(head.split(b" ", 2)[1])
                if self._answering.is_set() and paths:
                    answers = b"".join(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(p), p)
                        for p in paths
                    )
                    paths.clear()
                    try:
                        conn.sendall(answers)
                    except OSError:
                        return

    def __enter__(self) -> WithholdingUpstream:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def upstream() -> Iterator[WithholdingUpstream]:
    with WithholdingUpstream() as up:
        yield up


@pytest.fixture
def firewall(upstream: WithholdingUpstream) -> Iterator[RunningFirewall]:
    policy = GET_ONLY_POLICY.format(port=upstream.port)
    with running_firewall(
        policy,
        upstream=("127.0.0.1", upstream.port),
        labels=LABELS,
        extra_args=["--max-pending-requests", str(PENDING_LIMIT)],
    ) as fw:
        yield fw


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def send_until_stalled(
    s: socket.socket, request: bytes, seconds: float, stall: float = 1.0
) -> tuple[int, bool]:
    """Send ``request`` over and over, never reading, for at most ``seconds`` or
    until the proxy takes nothing for ``stall`` seconds: (requests sent, stalled)."""
    s.setblocking(False)
    batch = request * 64
    sent = 0
    last_progress = started = time.monotonic()
    pending = memoryview(b"")
    while time.monotonic() - started < seconds:
        if not pending:
            pending = memoryview(batch)
        try:
            n = s.send(pending)
        except BlockingIOError:
            if time.monotonic() - last_progress > stall:
                return sent // len(request), True
            time.sleep(0.01)
            continue
        pending = pending[n:]
        sent += n
        last_progress = time.monotonic()
    return sent // len(request), False


def read_responses(s: socket.socket, count: int, timeout: float = 20.0) -> list[bytes]:
    """The bodies of ``count`` responses (each ``Content-Length`` framed)."""
    s.setblocking(True)
    s.settimeout(timeout)
    buf = b""
    bodies: list[bytes] = []
    while len(bodies) < count:
        chunk = s.recv(1 << 16)
        assert chunk, f"the proxy closed after {len(bodies)} of {count} responses"
        buf += chunk
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            length = int(re.search(rb"Content-Length: (\d+)", buf[:end]).group(1))
            if len(buf) < end + 4 + length:
                break
            assert buf.startswith(b"HTTP/1.1 200 OK\r\n"), buf[:60]
            bodies.append(buf[end + 4 : end + 4 + length])
            buf = buf[end + 4 + length :]
    return bodies


def test_a_client_pipelining_toward_a_silent_server_is_not_read_past_the_pending_limit(
    firewall: RunningFirewall, upstream: WithholdingUpstream
) -> None:
    rss_before = rss_kib(firewall.proc.pid)
    with socket.create_connection(firewall.address) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sent, stalled = send_until_stalled(s, get(0), seconds=10.0)
        assert stalled, f"the proxy read on: {sent} requests in 10 s"
        # What the client sent past the 16 waits unread in the kernel's buffers.
        assert upstream.received == PENDING_LIMIT < sent
        assert rss_kib(firewall.proc.pid) - rss_before < 30 * 1024


def test_a_held_pipeline_is_served_whole_and_in_order_once_the_server_answers(
    firewall: RunningFirewall, upstream: WithholdingUpstream
) -> None:
    count = 10 * PENDING_LIMIT
    with socket.create_connection(firewall.address) as s:
        s.sendall(b"".join(get(n) for n in range(count)))
        deadline = time.monotonic() + 5
        while upstream.received < PENDING_LIMIT and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the proxy has had every chance to read further
        assert upstream.received == PENDING_LIMIT  # held: every request was in one read
        upstream.answer()
        bodies = read_responses(s, count)
    assert bodies == [b"/items/%d" % n for n in range(count)]
    assert upstream.received == count


def test_a_client_that_never_reads_its_denials_is_not_read_without_limit(
    firewall: RunningFirewall, upstream: WithholdingUpstream
) -> None:
    rss_before = rss_kib(firewall.proc.pid)
    with socket.create_connection(firewall.address) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sent, stalled = send_until_stalled(s, post(0), seconds=10.0)
        # Each POST is answered 403 at once, so nothing is pending: what stops
        # the proxy is the client's own unread answers.
        assert stalled, f"the proxy read on: {sent} requests in 10 s"
        assert rss_kib(firewall.proc.pid) - rss_before < 30 * 1024
    assert upstream.received == 0
