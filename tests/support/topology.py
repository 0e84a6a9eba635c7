"""Throw-away endpoint topologies for datapath tests.

`topology(["client", "server"])` creates one network namespace + veth per
name inside a random 10.X.Y.0/24, a loaded Datapath with a unique mark and
routing table, and removes all of it on the way out, whatever happened.

Every resource carries this run's random tag (`l7t-<tag>-<name>` namespaces,
`l7t<tag><n>` veths) and a marker file records the owner pid, so the sweeper
only ever removes leftovers of crashed runs of these tests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

MARKER_DIR = Path("/run/l7proxy-tests")
_NS_RE = re.compile(r"^l7t-([0-9a-f]{6})-[a-z0-9]+$")
_LINK_RE = re.compile(r"^l7t([0-9a-f]{6})\d+$")


def skip_reason() -> str | None:
    from l7proxy.datapath.loader import kernel_support

    return kernel_support()


def require_kernel() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(f"datapath tests: {reason}")


# --- stale leftovers -----------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def sweep_stale() -> list[str]:
    """Remove resources of earlier runs whose owner process is gone."""
    from l7proxy.node import netns

    removed = []
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    live_tags = set()
    stale: dict[str, dict] = {}
    for marker in MARKER_DIR.glob("*.json"):
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if _alive(meta.get("pid", -1)):
            live_tags.add(marker.stem)
        else:
            stale[marker.stem] = meta
    started = os.stat(f"/proc/{os.getpid()}").st_ctime
    for ns in netns.list_namespaces("l7t-"):
        m = _NS_RE.match(ns)
        if not m or m.group(1) in live_tags:
            continue
        if m.group(1) not in stale:
            # No marker at all: only if it predates this process.
            try:
                if (netns.NETNS_DIR / ns).stat().st_mtime >= started:
                    continue
            except FileNotFoundError:
                continue
        netns.remove_namespace(ns)
        removed.append(ns)
    namespaces = set(netns.list_namespaces("l7t-"))
    for name, _ in netns.list_links("l7t"):
        m = _LINK_RE.match(name)
        if (
            m
            and m.group(1) not in live_tags
            and not any(n.startswith(f"l7t-{m.group(1)}-") for n in namespaces)
        ):
            netns.delete_link(name)
            removed.append(name)
    for tag, meta in stale.items():
        if "mark" in meta and "table" in meta:
            netns.remove_proxy_routing(meta["mark"], meta["table"])
        (MARKER_DIR / f"{tag}.json").unlink(missing_ok=True)
        removed.append(f"marker {tag}")
    return removed


# --- the topology -------------------------------------------------------------


@dataclass
class Endpoint:
    name: str
    ns: str
    ifname: str
    ifindex: int
    ip: IPv4Address
    endpoint_id: int
    identity: int


@dataclass
class Topology:
    tag: str
    net: IPv4Network
    proxy_mark: int
    redirect_mark: int
    table: int
    endpoints: dict[str, Endpoint]
    dp: object = None
    _closers: list = field(default_factory=list)

    def __getitem__(self, name: str) -> Endpoint:
        return self.endpoints[name]

    def info(self, name: str, *, ingress: bool = False, egress: bool = False, audit: bool = False):
        from l7proxy.datapath.loader import EndpointInfo

        ep = self.endpoints[name]
        return EndpointInfo(
            ep.endpoint_id,
            ep.ifindex,
            ep.ip,
            ep.identity,
            ingress_enforced=ingress,
            egress_enforced=egress,
            audit=audit,
        )

    def attach(self, name: str, **flags) -> None:
        self.dp.attach(self.info(name, **flags))

    def attach_all(self, **flags) -> None:
        for name in self.endpoints:
            self.attach(name, **flags)

    def socket_in(self, name: str, type: int = socket.SOCK_STREAM) -> socket.socket:
        from l7proxy.node import netns

        s = netns.open_socket_in_netns(self.endpoints[name].ns, socket.AF_INET, type)
        self._closers.append(s.close)
        return s

    def serve(self, name: str, port: int = 8080) -> EchoServer:
        """A TCP echo server inside the endpoint that records who connected."""
        sock = self.socket_in(name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(self.endpoints[name].ip), port))
        server = EchoServer(sock)
        self._closers.append(server.close)
        return server

    def connect(self, name: str, ip, port: int, timeout: float = 2.0) -> socket.socket:
        """Connect from inside an endpoint; raises on refusal or timeout."""
        s = self.socket_in(name)
        s.settimeout(timeout)
        s.connect((str(ip), port))
        return s

    def can_connect(self, name: str, ip, port: int, timeout: float = 2.0) -> bool:
        try:
            s = self.connect(name, ip, port, timeout)
        except OSError:
            return False
        s.close()
        return True


class EchoServer:
    """Accepts in a thread, echoes bytes back, remembers peer addresses."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        sock.listen(64)
        sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(timeout=2)


def free_test_network() -> IPv4Network:
    """A random 10.X.Y.0/24 overlapping no route or address on this machine."""
    from l7proxy.node import netns

    for _ in range(200):
        net = IPv4Network(f"10.{random.randint(1, 254)}.{random.randint(0, 255)}.0/24")
        if not netns.routes_in(net):
            return net
    raise RuntimeError("no free 10.x.y.0/24 found")


def _free_table() -> int:
    from l7proxy.node import netns

    used = {t for _, t in netns.list_rules_by_table(range(20000, 30000))}
    for _ in range(100):
        t = random.randint(20000, 29999)
        if t not in used:
            return t
    raise RuntimeError("no free routing table")


@contextlib.contextmanager
def topology(
    names: Sequence[str], *, load: bool = True, routing: bool = True
) -> Iterator[Topology]:
    from l7proxy.datapath.loader import Datapath
    from l7proxy.node import netns

    if load:
        require_kernel()
    elif os.geteuid() != 0:
        pytest.skip("topology: needs root")
    sweep_stale()
    tag = secrets.token_hex(3)
    proxy_mark = random.randrange(0x100000, 0xFFFFFF, 2) << 4
    redirect_mark = proxy_mark + 1
    table = _free_table()
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    marker = MARKER_DIR / f"{tag}.json"
    marker.write_text(
        json.dumps(
            {"pid": os.getpid(), "mark": redirect_mark, "table": table, "started": time.time()}
        )
    )
    topo = Topology(tag, free_test_network(), proxy_mark, redirect_mark, table, {})
    created: list[Endpoint] = []
    try:
        netns.ensure_forwarding()
        hosts = iter(topo.net.hosts())
        for i, name in enumerate(names):
            ip = next(hosts)
            ns, ifname = f"l7t-{tag}-{name}", f"l7t{tag}{i}"
            link = netns.create_endpoint(ns, ifname, ip)
            ep = Endpoint(
                name, ns, ifname, link.host_ifindex, ip, endpoint_id=100 + i, identity=1000 + i
            )
            created.append(ep)
            topo.endpoints[name] = ep
        if routing:
            netns.install_proxy_routing(redirect_mark, table)
        if load:
            topo.dp = Datapath(
                proxy_mark=proxy_mark, redirect_mark=redirect_mark, instance=f"t{tag}"
            )
            topo.dp.load()
        yield topo
    finally:
        for close in reversed(topo._closers):
            with contextlib.suppress(Exception):
                close()
        if topo.dp is not None:
            topo.dp.close()
        if routing:
            netns.remove_proxy_routing(redirect_mark, table)
        for ep in reversed(created):
            netns.delete_endpoint(ep.ns, ep.ifname)
        marker.unlink(missing_ok=True)


def transparent_listener(ip: str = "127.0.0.1") -> socket.socket:
    """The smallest transparent proxy listener: IP_TRANSPARENT, any port."""
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, 0))
    s.listen(16)
    return s


def transparent_upstream(
    client_ip, server_ip, server_port: int, mark: int, timeout: float = 2.0
) -> socket.socket:
    """Connect like the proxy does upstream: bound to the client's address
    (IP_TRANSPARENT) and carrying the proxy's SO_MARK."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.bind((str(client_ip), 0))
        s.settimeout(timeout)
        s.connect((str(server_ip), server_port))
    except BaseException:
        s.close()
        raise
    return s


def wait_for(predicate, timeout: float = 2.0, interval: float = 0.02):
    """Poll until predicate() is truthy (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
