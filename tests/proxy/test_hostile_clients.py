"""Clients that connect and leave, or connect and wait, against the real ``l7proxy firewall``.

The upstream is a plain HTTP/1.1 server that counts the connections the proxy
opened to it and how many are still open. Every attack here once cost one
upstream connection per client, kept until the proxy exited (issue 14,
findings 1 and 2): a port scan's connect-and-close, an HTTP/1.1 client that
leaves mid-head, an h2c client that leaves after its SETTINGS, and idle clients
that never say a word. Now the proxy connects upstream only when a client-first
protocol has bytes for the server, and an upstream that connects after its
client left is closed at once.
"""

from __future__ import annotations

import asyncio
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from tests.support.firewall import GET_ONLY_POLICY, RunningFirewall, running_firewall

LABELS = {"app": "api"}

GET = b"GET /v1/items HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, stream 0


class CountingUpstream:
    """Answers each GET head with OK and closes; counts the proxy's connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    writer.write(OK)
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the proxy hung up
        finally:
            self.open -= 1
            writer.close()

    def __enter__(self) -> CountingUpstream:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def firewall(upstream: CountingUpstream) -> Iterator[RunningFirewall]:
    policy = GET_ONLY_POLICY.format(port=upstream.port)
    with running_firewall(policy, upstream=("127.0.0.1", upstream.port), labels=LABELS) as fw:
        yield fw


def eventually(condition: Callable[[], bool], timeout: float = 4.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def legitimate_get(fw: RunningFirewall) -> bool:
    """One allowed GET through the proxy, answered by the upstream."""
    with socket.create_connection(fw.address, timeout=5) as s:
        s.sendall(GET)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok")


def connect_say_and_leave(fw: RunningFirewall, said: bytes) -> None:
    with socket.create_connection(fw.address, timeout=5) as s:
        if said:
            s.sendall(said)


# --------------------------------------------------------------------------- leaks


@pytest.mark.parametrize(
    ("attack", "clients", "said"),
    [
        ("port scan: connect and close", 100, b""),
        ("HTTP/1.1 client closing mid-head", 50, GET[:20]),
        ("h2c client closing after its SETTINGS", 50, H2_PREFACE + EMPTY_SETTINGS),
    ],
)
def test_clients_that_leave_before_their_first_request_leave_no_upstream_connection(
    firewall: RunningFirewall, upstream: CountingUpstream, attack: str, clients: int, said: bytes
) -> None:
    for _ in range(clients):
        connect_say_and_leave(firewall, said)

    time.sleep(0.5)  # let any connect the proxy started complete
    assert eventually(lambda: upstream.open == 0), (
        f"{attack}: {upstream.open} upstream connections still open after {clients} clients left"
    )
    assert legitimate_get(firewall)
    assert eventually(lambda: upstream.open == 0)


def test_idle_clients_open_no_upstream_connection(
    firewall: RunningFirewall, upstream: CountingUpstream
) -> None:
    before = upstream.accepted
    idle = [socket.create_connection(firewall.address, timeout=5) for _ in range(500)]
    try:
        time.sleep(1.0)  # the proxy has long accepted them all

        assert upstream.accepted == before, "idle clients made the proxy connect upstream"
        assert legitimate_get(firewall)  # the proxy still serves others
        assert upstream.accepted == before + 1
    finally:
        for s in idle:
            s.close()
    assert eventually(lambda: upstream.open == 0)


POLICY_WITHOUT_L7_RULES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: mail}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
"""


def test_a_server_first_protocol_on_a_port_without_l7_rules_still_greets_a_silent_client() -> None:
    # SMTP: the server speaks first. Waiting for the client's bytes here would
    # leave both sides waiting for the other.
    banner = b"220 mail.example ESMTP\r\n"
    with socket.create_server(("127.0.0.1", 0)) as mail:
        port = mail.getsockname()[1]

        def greet() -> None:
            conn, _ = mail.accept()
            with conn:
                conn.sendall(banner)
                conn.recv(1)  # until the proxy hangs up

        greeter = threading.Thread(target=greet, daemon=True)
        greeter.start()
        policy = POLICY_WITHOUT_L7_RULES.format(port=port)
        with running_firewall(policy, ("127.0.0.1", port), LABELS) as fw:
            with socket.create_connection(fw.address, timeout=5) as client:
                assert client.recv(len(banner)) == banner
        greeter.join(5)


# --------------------------------------------------------------------------- the accept queue


def listen_backlog(port: int) -> int | None:
    """The accept queue of the listener on ``port`` (``ss``'s Send-Q), or None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-Hltn", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    [line] = out.splitlines()
    return int(line.split()[2])


def kernel_somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def test_the_listener_accept_queue_is_the_kernels_somaxconn(firewall: RunningFirewall) -> None:
    backlog = listen_backlog(firewall.port)
    if backlog is None:
        pytest.skip("needs ss (iproute2)")
    assert backlog == kernel_somaxconn()  # not asyncio's 100


def test_the_accept_queue_is_configurable(upstream: CountingUpstream) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    policy = GET_ONLY_POLICY.format(port=upstream.port)
    target = ("127.0.0.1", upstream.port)
    with running_firewall(policy, target, LABELS, extra_args=["--backlog", "512"]) as fw:
        assert listen_backlog(fw.port) == 512


BURST = 1000


def test_a_burst_of_connects_waits_in_the_accept_queue_not_for_syn_retries(
    firewall: RunningFirewall, upstream: CountingUpstream
) -> None:
    # The proxy is stopped for the burst, so only the kernel's accept queue
    # can hold the connections: with asyncio's queue of 100 the rest of the
    # SYNs are dropped, and so are their retries (1 s, then 3 s...) while
    # the queue stays full.
    # A stop is what a busy event loop looks like from outside, made exact.
    sockets: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    firewall.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        for _ in range(BURST):
            s = socket.socket()
            sockets.append(s)
            s.setblocking(False)
            s.connect_ex(firewall.address)
            selector.register(s, selectors.EVENT_WRITE)
        completed = 0
        while completed < BURST and time.monotonic() - started < 3.0:
            for key, _ in selector.select(timeout=0.1):
                s = cast(socket.socket, key.fileobj)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                selector.unregister(s)
                completed += 1
    finally:
        firewall.proc.send_signal(signal.SIGCONT)
        selector.close()
    try:
        assert completed == BURST, f"only {completed} of {BURST} handshakes completed at once"
        for s in sockets[:10]:  # once running again, the proxy serves them
            s.setblocking(True)
            s.settimeout(5)
            s.sendall(GET)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        for s in sockets:
            s.close()
    assert eventually(lambda: upstream.open == 0)
