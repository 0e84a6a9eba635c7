"""The control socket through which a running agent hands over to its successor.

A running agent answers on ``STATE/agent.sock`` (a unix stream socket). A new
``l7proxy run`` that finds an agent answering there takes over instead of
starting from nothing:

    successor                          running agent
    ---------                          -------------
    hello                        ->    {"pid", "version", "listeners": {family: port}}
    (loads the datapath on the pinned maps)
    listeners                    ->    {"families": [...]} + the listening sockets (SCM_RIGHTS),
                                       a family once per socket of its group (run --workers)
    (accepts on the same kernel sockets, replaces the tc programs, syncs maps)
    drain {"timeout": s,         ->    {"draining": true, "connections": n,
           "cluster": {"etcd": e}}         "cluster_leases": [lease, ...]}
                                       stops accepting, serves its open connections
                                       until they end or the timeout, exits keeping
                                       programs, pins and the policy route
    (moves its keys off those leases, then revokes them)

One request per line, JSON; one JSON line in answer, with file descriptors
attached to it when there are any. The listening sockets are the same kernel
sockets in both processes, so a SYN that arrives at any moment lands in their
shared accept queue: no connection is refused during the swap.

In cluster mode the two agents hold the node's keys in etcd on two leases. A
successor that runs in cluster mode names its etcd in ``drain``; a running
agent on the same etcd then stops writing keys before it answers, and answers
with its lease, which it will not revoke: the successor revokes it once it has
moved every key it owns off it (``l7proxy/cluster/store.py``). Without
``cluster`` (a successor not in cluster mode, or an older one) the running
agent revokes its lease itself when it drains, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("l7proxy.agent.handover")

SOCKET_NAME = "agent.sock"
# Every listening socket in one message: 4 families x up to 63 workers (the
# kernel takes at most 253 descriptors in one SCM_RIGHTS message).
MAX_FDS = 252
MAX_LINE = 64 * 1024
# The predecessor hands its cluster keys over before it answers ``drain``: at worst
# a few etcd request timeouts (ClusterStore.hand_over, HAND_OVER_TIMEOUT in agent.py).
DRAIN_REPLY_TIMEOUT = 30.0


class HandoverError(Exception):
    pass


def socket_path(state_root: Path) -> Path:
    return Path(state_root) / SOCKET_NAME


def _read_line(sock: socket.socket, first: bytes = b"") -> bytes:
    buf = first
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise HandoverError("control message too long")
        chunk = sock.recv(4096)
        if not chunk:
            raise HandoverError("control connection closed")
        buf += chunk
    line, _, _rest = buf.partition(b"\n")
    return line


def _send(sock: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


# --------------------------------------------------------------------- the running agent


class ControlServer:
    """Answers successors, one at a time, on a thread of its own.

    The handlers are called on that thread: `hello()` and `listeners()` must
    only read, `drain(timeout, cluster)` must hand the work to the agent's event
    loop (loop.call_soon_threadsafe) and return at once, except for the handover
    of the cluster keys, which it waits for (a bounded wait)."""

    def __init__(
        self,
        path: Path,
        *,
        hello: Callable[[], dict],
        listeners: Callable[[], tuple[list[str], list[int]]],
        drain: Callable[[float, dict | None], dict],
    ):
        self.path = Path(path)
        self._hello = hello
        self._listeners = listeners
        self._drain = drain
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # A predecessor still answers on this path, or a dead one left it:
        # either way the name is ours now (a bound socket lives on unnamed).
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(4)
        sock.settimeout(0.2)
        self._sock = sock
        self._ino = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="l7proxy-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering. The path is removed only if it is still ours."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._ino:
                self.path.unlink()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None  # start() set it before starting this thread
        while not self._closed.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    self._session(conn)
                except (OSError, HandoverError, ValueError) as exc:
                    log.info("control connection ended: %s", exc)

    def _session(self, conn: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                line = _read_line(conn)
            except HandoverError:
                return
            request = json.loads(line)
            op = request.get("op")
            if op == "hello":
                _send(conn, self._hello())
            elif op == "listeners":
                families, fds = self._listeners()
                _send(conn, {"families": families}, fds)
            elif op == "drain":
                cluster = request.get("cluster")
                timeout = float(request.get("timeout", 30.0))
                _send(conn, self._drain(timeout, cluster if isinstance(cluster, dict) else None))
                return  # handed over: this agent answers no one any more
            else:
                _send(conn, {"error": f"unknown op {op!r}"})


# --------------------------------------------------------------------- the successor


class Predecessor:
    """The successor's end: a connection to the agent it takes over from."""

    def __init__(self, sock: socket.socket, info: dict):
        self.sock = sock
        self.info = info

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> Predecessor | None:
        """The running agent behind `path`, or None if there is none (no
        socket, or one a killed agent left behind)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        try:
            _send(sock, {"op": "hello"})
            info = json.loads(_read_line(sock))
        except (OSError, HandoverError, ValueError):
            sock.close()
            return None
        return cls(sock, info)

    def listeners(self) -> dict[str, list[socket.socket]]:
        """The predecessor's listening sockets by parser family (new fds for
        the same kernel sockets): one each, or a reuseport group each when it ran
        workers (the family is repeated in ``families``)."""
        _send(self.sock, {"op": "listeners"})
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_LINE, MAX_FDS)
        if not data:
            raise HandoverError("predecessor closed the control connection")
        reply = json.loads(_read_line(self.sock, data))
        families = reply.get("families", [])
        if len(families) != len(fds):
            for fd in fds:
                os.close(fd)
            raise HandoverError(
                f"predecessor sent {len(fds)} sockets for {len(families)} listeners"
            )
        out: dict[str, list[socket.socket]] = {}
        for family, fd in zip(families, fds, strict=True):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            out.setdefault(family, []).append(sock)
        return out

    def drain(self, timeout: float, cluster: dict | None = None) -> dict:
        """Tell the predecessor to stop accepting and finish its connections. With
        ``cluster`` (``{"etcd": "host:port"}``), a predecessor on that etcd hands its
        cluster keys over first and answers with ``cluster_leases``."""
        request: dict = {"op": "drain", "timeout": timeout}
        if cluster is not None:
            request["cluster"] = cluster
        _send(self.sock, request)
        self.sock.settimeout(DRAIN_REPLY_TIMEOUT)  # the handover of the keys waits on etcd
        return json.loads(_read_line(self.sock))

    def close(self) -> None:
        self.sock.close()
