"""Endpoint plumbing with pyroute2: namespaces, veths, routes, proxy policy
routing, and the leftover sweeper. No BPF involved."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Network

import pytest

from l7proxy.node import netns
from tests.support.topology import MARKER_DIR, free_test_network, sweep_stale, topology

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="netns tests need root"),
]


def test_endpoints_reach_each_other_and_the_host_without_policy():
    with topology(["a", "b"], load=False, routing=False) as t:
        a, b = t["a"], t["b"]
        server = t.serve("b", 8080)
        assert t.can_connect("a", b.ip, 8080)
        with socket.create_connection((str(b.ip), 8080), timeout=2) as conn:
            conn.sendall(b"hi")
            assert conn.recv(2) == b"hi"
        # The server saw the client's own address and the host's.
        deadline = time.monotonic() + 2
        while len(server.peers) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.peers[0][0] == str(a.ip)
        assert server.peers[1][0] != str(a.ip)

        host = socket.socket()
        try:
            host.bind(("0.0.0.0", 0))
            host.listen()
            host_ip = next(ip for ip in netns.host_addresses() if not ip.is_loopback)
            assert t.can_connect("a", host_ip, host.getsockname()[1])
        finally:
            host.close()


def test_run_in_netns_runs_inside_the_namespace():
    with topology(["a"], load=False, routing=False) as t:
        proc = netns.run_in_netns(
            t["a"].ns,
            [sys.executable, "-c", "print(open('/proc/net/dev').read())"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            out, _ = proc.communicate(timeout=20)
        finally:
            proc.kill()
        interfaces = {line.split(":")[0].strip() for line in out.splitlines() if ":" in line}
        assert interfaces == {"lo", "eth0"}


def test_create_is_undone_by_delete_and_delete_is_idempotent():
    tag = secrets.token_hex(3)
    ns, ifname = f"l7t-{tag}-solo", f"l7t{tag}0"
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    marker = MARKER_DIR / f"{tag}.json"
    marker.write_text(json.dumps({"pid": os.getpid()}))
    net = free_test_network()
    try:
        link = netns.create_endpoint(ns, ifname, next(net.hosts()))
        assert netns.endpoint_exists(ns, ifname)
        assert link.host_ifindex > 0 and link.ns_name == ns
        with pytest.raises(FileExistsError):
            netns.create_endpoint(ns, ifname, next(net.hosts()))
        assert netns.endpoint_exists(ns, ifname), "a failed create must not undo another"
    finally:
        netns.delete_endpoint(ns, ifname)
        netns.delete_endpoint(ns, ifname)
        marker.unlink(missing_ok=True)
    assert not netns.endpoint_exists(ns, ifname)
    assert not netns.routes_in(IPv4Network(f"{next(net.hosts())}/32"))


def test_proxy_routing_is_installed_once_and_removed():
    mark, table = 0x5EED0 + secrets.randbelow(1000) * 16, 30000 + secrets.randbelow(1000)
    try:
        netns.install_proxy_routing(mark, table)
        netns.install_proxy_routing(mark, table)
        assert netns.list_rules_by_table([table]) == [(mark, table)]
    finally:
        netns.remove_proxy_routing(mark, table)
        netns.remove_proxy_routing(mark, table)
    assert netns.list_rules_by_table([table]) == []


def test_sweeper_removes_leftovers_of_dead_runs_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_tag, live_tag = secrets.token_hex(3), secrets.token_hex(3)
    net = free_test_network()
    hosts = net.hosts()
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    table = 30000 + secrets.randbelow(1000)
    mark = 0x6EED0 + secrets.randbelow(1000) * 16
    (MARKER_DIR / f"{stale_tag}.json").write_text(
        json.dumps({"pid": dead.pid, "mark": mark, "table": table})
    )
    (MARKER_DIR / f"{live_tag}.json").write_text(json.dumps({"pid": os.getpid()}))
    stale = (f"l7t-{stale_tag}-x", f"l7t{stale_tag}0")
    live = (f"l7t-{live_tag}-x", f"l7t{live_tag}0")
    try:
        netns.create_endpoint(*stale, next(hosts))
        netns.create_endpoint(*live, next(hosts))
        netns.install_proxy_routing(mark, table)

        removed = sweep_stale()

        assert stale[0] in removed
        assert not netns.endpoint_exists(*stale)
        assert netns.list_rules_by_table([table]) == []
        assert netns.endpoint_exists(*live), "a live run's resources are not touched"
    finally:
        for ns, ifname in (stale, live):
            netns.delete_endpoint(ns, ifname)
        netns.remove_proxy_routing(mark, table)
        for tag in (stale_tag, live_tag):
            (MARKER_DIR / f"{tag}.json").unlink(missing_ok=True)


def test_interface_names_longer_than_the_kernel_allows_are_refused():
    with pytest.raises(ValueError):
        netns.create_endpoint("l7t-000000-long", "l7t-way-too-long-name", "10.0.0.1")
    assert "l7t-000000-long" not in netns.list_namespaces("l7t-")


def test_sweeper_leaves_unmarked_namespaces_newer_than_this_process():
    tag = secrets.token_hex(3)
    ns, ifname = f"l7t-{tag}-young", f"l7t{tag}0"
    net = free_test_network()
    try:
        netns.create_endpoint(ns, ifname, next(net.hosts()))
        sweep_stale()
        assert netns.endpoint_exists(ns, ifname)
    finally:
        netns.delete_endpoint(ns, ifname)
