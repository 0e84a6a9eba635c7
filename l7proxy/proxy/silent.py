"""Accepted connections that have not spoken yet, held as bare sockets.

Most clients of a client-first protocol speak as they connect; the ones that do
not are idle connections, port scans, health checks, or an attacker holding
thousands of sockets open. Each of those used to get an event-loop transport,
a protocol, a ``Pipe``, an engine and a timer the moment it was accepted, and
its teardown cost as much again: 10,000 idle connections reset at once held the
event loop for tens of milliseconds per turn. Here such a socket costs its
descriptor and a few hundred bytes until its first byte comes:

- one ``epoll`` instance of our own watches all of them, and the event loop
  watches only that one descriptor. Registering and forgetting a socket is one
  ``epoll_ctl``, and closing a socket forgets it by itself;
- at most ``READY_BATCH`` of them are looked at per turn of the event loop
  (level-triggered: the rest stay ready for the next turn), so a mass reset is
  spread over many turns, with every other connection served in between;
- their deadlines share one timer: sockets that wait the same number of seconds
  expire in the order they came, so each wait length keeps its sockets in one
  ordered dict, and only its oldest has to be looked at.

What becomes of a socket is its owner's to say (``SilentOwner``): it spoke (its
bytes are still unread, for the transport to get), it left (EOF or reset, and
nothing ever came: closed here), or its deadline passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections import OrderedDict
from typing import Any, Protocol

# Sockets looked at per turn of the event loop, at most: their first bytes, their
# resets, their deadlines. A peek and a close cost 5-20 us (the kernel's close of a
# socket whose client sent its FIN is most of it): about half a millisecond a turn.
READY_BATCH = 32
# Why the ready sockets are watched: bytes, EOF (RDHUP), and (always) errors and hang-ups.
_WATCH = select.EPOLLIN | select.EPOLLRDHUP
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class Silent:
    """One socket waiting for its first byte; ``info`` is its owner's (what the
    owner decided about it at accept, handed back with it)."""

    __slots__ = ("sock", "since", "seconds", "info", "ending")

    def __init__(self, sock: socket.socket, since: float, seconds: float, info: Any) -> None:
        self.sock = sock
        self.since = since  # the event loop's clock at accept
        self.seconds = seconds  # how long it may stay silent
        self.info = info
        # Set by ``end_when_quiet``: how this socket ended, once it has.
        self.ending: asyncio.Future[str] | None = None


class SilentOwner(Protocol):
    def spoke(self, silent: Silent) -> None:
        """Its first bytes are readable: the socket is the owner's now (no longer watched)."""
        ...

    def left(self, silent: Silent) -> None:
        """The client closed or reset it before a byte: already closed here."""
        ...

    def expired(self, silent: Silent) -> None:
        """Silent until its deadline: the owner records and closes it."""
        ...


class SilentSockets:
    """The accepted sockets of one listener that have not spoken yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: SilentOwner) -> None:
        self._loop = loop
        self._owner = owner
        self._epoll = select.epoll()
        # Wait length -> its sockets by descriptor, oldest first.
        self._by_wait: dict[float, OrderedDict[int, Silent]] = {}
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._watching = False

    def __len__(self) -> int:
        return self._count

    def add(self, sock: socket.socket, since: float, seconds: float, info: Any = None) -> None:
        """Watch ``sock`` until its first byte, EOF, or ``since + seconds``."""
        fd = sock.fileno()
        self._epoll.register(fd, _WATCH)
        silent = Silent(sock, since, seconds, info)
        waiting = self._by_wait.get(seconds)
        if waiting is None:
            waiting = self._by_wait[seconds] = OrderedDict()
        waiting[fd] = silent
        self._count += 1
        self._none.clear()
        if not self._watching:
            self._watching = True
            self._loop.add_reader(self._epoll.fileno(), self._look)
        deadline = since + seconds
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    async def none_left(self) -> None:
        """Return once no socket is waiting here (at once if none is)."""
        await self._none.wait()

    def all(self) -> list[Silent]:
        return [s for waiting in self._by_wait.values() for s in waiting.values()]

    def take(self, silent: Silent) -> None:
        """Stop watching ``silent``: the caller does what it will with its socket."""
        fd = silent.sock.fileno()
        waiting = self._by_wait[silent.seconds]
        if waiting.pop(fd, None) is None:
            return
        if fd >= 0:
            self._epoll.unregister(fd)
        self._gone()

    def close(self) -> None:
        """Stop watching (the sockets still here are the caller's to close first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watching:
            self._loop.remove_reader(self._epoll.fileno())
            self._watching = False
        self._epoll.close()

    # ------------------------------------------------------------ internals

    def _gone(self) -> None:
        self._count -= 1
        if not self._count:
            self._none.set()

    def _find(self, fd: int) -> Silent | None:
        for waiting in self._by_wait.values():
            silent = waiting.get(fd)
            if silent is not None:
                return silent
        return None

    def _look(self) -> None:
        """The epoll descriptor is readable: some sockets spoke, left, or failed."""
        try:
            ready = self._epoll.poll(0, READY_BATCH)
        except InterruptedError:
            return
        for fd, _events in ready:
            silent = self._find(fd)
            if silent is None:  # not ours any more: never again
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
                continue
            try:
                first = silent.sock.recv(1, _PEEK)
            except (BlockingIOError, InterruptedError):
                continue  # not really ready: keep waiting
            except OSError:
                first = b""  # reset, or any other error: gone
            del self._by_wait[silent.seconds][fd]
            self._gone()
            if first:
                self._epoll.unregister(fd)
                self._owner.spoke(silent)
            else:
                silent.sock.close()  # forgets it in the epoll too
                self._owner.left(silent)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        """Deadlines: the oldest sockets of each wait length, ``READY_BATCH`` per turn."""
        self._timer = None
        now = self._loop.time()
        budget = READY_BATCH
        for waiting in self._by_wait.values():
            while waiting and budget:
                fd, silent = next(iter(waiting.items()))
                if silent.since + silent.seconds > now:
                    break
                del waiting[fd]
                self._epoll.unregister(fd)
                self._gone()
                budget -= 1
                self._owner.expired(silent)
        if not budget:
            self._arm(now)  # more are due: on the next turn
            return
        heads = [next(iter(w.values())) for w in self._by_wait.values() if w]
        if heads:
            self._arm(min(s.since + s.seconds for s in heads))
