"""``SilentSockets``: accepted sockets held bare until their first byte, on loopback.

What it must do for the proxy (``l7proxy/proxy/silent.py``): hand over a socket
that spoke with its bytes still unread, close one whose client left, expire the
silent ones at their deadline in the order they came, and never look at more
than ``READY_BATCH`` of them in one turn of the event loop, however many reset
at once (issue 14: 10,000 resets once held the loop for tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import pytest

from l7proxy.proxy.silent import READY_BATCH, Silent, SilentSockets

RST_ON_CLOSE = struct.pack("ii", 1, 0)


class Owner:
    """Records what became of each socket, by the name it was added with."""

    def __init__(self) -> None:
        self.spoken: list[str] = []
        self.gone: list[str] = []
        self.timed_out: list[str] = []
        self.first_bytes: dict[str, bytes] = {}

    def spoke(self, silent: Silent) -> None:
        self.spoken.append(silent.info)
        self.first_bytes[silent.info] = silent.sock.recv(100)
        silent.sock.close()

    def left(self, silent: Silent) -> None:
        assert silent.sock.fileno() == -1  # closed already
        self.gone.append(silent.info)

    def expired(self, silent: Silent) -> None:
        self.timed_out.append(silent.info)
        silent.sock.close()

    @property
    def done(self) -> int:
        return len(self.spoken) + len(self.gone) + len(self.timed_out)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as sock:
        yield sock


def connected_pairs(
    listener: socket.socket, count: int
) -> list[tuple[socket.socket, socket.socket]]:
    """(client, accepted) pairs on loopback."""
    pairs = []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        pairs.append((client, accepted))
    return pairs


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_socket_that_speaks_is_handed_over_with_its_bytes_unread(listener) -> None:
    owner = Owner()
    silent = SilentSockets(asyncio.get_running_loop(), owner)
    [(client, accepted)] = connected_pairs(listener, 1)
    try:
        silent.add(accepted, asyncio.get_running_loop().time(), 30, "talker")
        await asyncio.sleep(0.05)
        assert (owner.done, len(silent)) == (0, 1)

        client.sendall(b"GET / HTTP/1.1\r\n")
        await until(lambda: owner.done == 1)
        assert owner.spoken == ["talker"]
        assert owner.first_bytes["talker"] == b"GET / HTTP/1.1\r\n"
        assert len(silent) == 0
    finally:
        client.close()
        silent.close()


async def test_sockets_whose_clients_leave_are_closed_fin_or_reset(listener) -> None:
    owner = Owner()
    silent = SilentSockets(asyncio.get_running_loop(), owner)
    (fin, a), (rst, b) = connected_pairs(listener, 2)
    try:
        now = asyncio.get_running_loop().time()
        silent.add(a, now, 30, "fin")
        silent.add(b, now, 30, "rst")
        fin.close()
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        rst.close()
        await until(lambda: owner.done == 2)
        assert sorted(owner.gone) == ["fin", "rst"]
        await asyncio.wait_for(silent.none_left(), 1)
    finally:
        silent.close()


async def test_a_mass_reset_is_taken_at_most_a_batch_per_turn(listener) -> None:
    owner = Owner()
    silent = SilentSockets(asyncio.get_running_loop(), owner)
    count = 3 * READY_BATCH + 5
    pairs = connected_pairs(listener, count)
    try:
        now = asyncio.get_running_loop().time()
        for i, (_, accepted) in enumerate(pairs):
            silent.add(accepted, now, 30, str(i))
        for client, _ in pairs:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
            client.close()
        # Loopback delivers each reset as it is sent: all are ready before the next turn.

        per_turn = []
        while owner.done < count:
            before = owner.done
            await asyncio.sleep(0)  # one turn of the loop
            per_turn.append(owner.done - before)
        assert max(per_turn) == READY_BATCH
        assert sum(per_turn) == count and len(owner.gone) == count
    finally:
        silent.close()


async def test_silent_sockets_expire_at_their_deadline_in_the_order_they_came(listener) -> None:
    owner = Owner()
    loop = asyncio.get_running_loop()
    silent = SilentSockets(loop, owner)
    pairs = connected_pairs(listener, 4)
    try:
        start = loop.time()
        for i, (_, accepted) in enumerate(pairs[:3]):
            silent.add(accepted, start + i * 0.1, 0.3, f"short {i}")
        silent.add(pairs[3][1], start, 0.15, "shorter")  # another wait length, due first

        await until(lambda: owner.done == 4)
        assert owner.timed_out == ["shorter", "short 0", "short 1", "short 2"]
        assert loop.time() - start >= 0.5
        for client, _ in pairs:
            assert client.recv(10) == b""  # the owner closed each
    finally:
        for client, _ in pairs:
            client.close()
        silent.close()
