"""The kernel datapath, end to end: real namespaces, veths, tc programs and
sockets. Each test builds its own random 10.X.Y.0/24 topology and tears it down."""

from __future__ import annotations

import dataclasses
import socket
import struct
import subprocess
import time
from ipaddress import IPv4Network

import pytest

from l7proxy.datapath.loader import PolicyEntry
from l7proxy.node import netns
from l7proxy.policy.identity import HOST, WORLD
from tests.support.topology import (
    skip_reason,
    topology,
    transparent_listener,
    transparent_upstream,
    wait_for,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(skip_reason() is not None, reason=f"datapath: {skip_reason()}"),
]

TCP, UDP = 6, 17
DROP_TIMEOUT = 0.5


def allow(ep, direction, identity, port_lo=0, port_hi=0, proto=TCP, **kw):
    return PolicyEntry(ep.endpoint_id, direction, identity, proto, port_lo, port_hi, "allow", **kw)


def deny(ep, direction, identity, port_lo=0, port_hi=0, proto=TCP, **kw):
    return PolicyEntry(ep.endpoint_id, direction, identity, proto, port_lo, port_hi, "deny", **kw)


def redirect(ep, direction, identity, port, proxy_port, proto=TCP):
    return PolicyEntry(
        ep.endpoint_id, direction, identity, proto, port, 0, "redirect", proxy_port=proxy_port
    )


def echo(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def drops_until(dp, predicate, timeout: float = 2.0):
    seen = []

    def step():
        seen.extend(dp.poll_drops(50))
        return [e for e in seen if predicate(e)]

    return wait_for(step, timeout)


@pytest.fixture
def pair():
    with topology(["client", "server"]) as t:
        yield t


def test_allowed_flow_connects_and_replies_come_back(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client", egress=True)
    t.attach("server", ingress=True)
    srv = t.serve("server", 8080)
    t.dp.sync_policy(
        [
            allow(client, "egress", server.identity, 8080),
            allow(server, "ingress", client.identity, 8080),
        ]
    )

    conn = t.connect("client", server.ip, 8080)
    assert echo(conn, b"hello through the datapath") == b"hello through the datapath"
    assert wait_for(lambda: srv.peers)[0][0] == str(client.ip)
    totals = t.dp.counters()["total"]
    assert totals["allowed"] == 1
    assert totals["ct_hits"] > 0
    assert totals["denied"] == 0


def test_denied_flow_is_dropped_in_the_kernel(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 9090)])

    with pytest.raises(TimeoutError):  # a drop, not a refusal
        t.connect("client", server.ip, 8080, timeout=DROP_TIMEOUT)
    events = drops_until(t.dp, lambda e: e.dst_port == 8080)
    assert events, "no drop event arrived"
    event = events[0]
    assert (event.src_ip, event.dst_ip, event.proto) == (client.ip, server.ip, TCP)
    assert (event.src_identity, event.dst_identity) == (client.identity, server.identity)
    assert (event.endpoint_id, event.direction, event.reason) == (
        server.endpoint_id,
        "ingress",
        "default-deny",
    )
    assert not event.audited
    counters = t.dp.counters()
    assert counters["total"]["denied"] >= 1
    assert counters["endpoints"][server.endpoint_id]["denied"] >= 1


def test_egress_default_deny_when_enforced(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client", egress=True)
    t.attach("server")
    t.serve("server", 8080)
    t.serve("server", 8081)
    t.dp.sync_policy([allow(client, "egress", server.identity, 8081)])

    assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)
    assert t.can_connect("client", server.ip, 8081)
    events = drops_until(t.dp, lambda e: e.dst_port == 8080)
    assert (events[0].endpoint_id, events[0].direction) == (client.endpoint_id, "egress")


def test_no_enforcement_means_no_policy(pair):
    t = pair
    server = t["server"]
    t.attach("client")
    t.attach("server")
    t.serve("server", 8080)
    assert t.can_connect("client", server.ip, 8080)
    assert t.dp.counters()["total"]["denied"] == 0


def test_deny_wins_over_allow(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.serve("server", 8081)
    # Allow everything from the client, deny 8080 from any peer.
    t.dp.sync_policy([allow(server, "ingress", client.identity), deny(server, "ingress", 0, 8080)])

    assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)
    assert t.can_connect("client", server.ip, 8081)
    events = drops_until(t.dp, lambda e: e.dst_port == 8080)
    assert events[0].reason == "policy-deny"


def test_port_ranges_are_inclusive(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    for port in (7999, 8000, 8037, 8090, 8091):
        t.serve("server", port)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 8000, 8090)])

    reachable = {
        port: t.can_connect("client", server.ip, port, DROP_TIMEOUT)
        for port in (7999, 8000, 8037, 8090, 8091)
    }
    assert reachable == {7999: False, 8000: True, 8037: True, 8090: True, 8091: False}


def test_udp_allow_and_deny(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 5353, proto=UDP)])
    rx = t.socket_in("server", socket.SOCK_DGRAM)
    rx.bind((str(server.ip), 5353))
    rx.settimeout(1)
    rx_denied = t.socket_in("server", socket.SOCK_DGRAM)
    rx_denied.bind((str(server.ip), 5354))
    rx_denied.settimeout(DROP_TIMEOUT)
    tx = t.socket_in("client", socket.SOCK_DGRAM)
    tx.settimeout(1)

    tx.sendto(b"q", (str(server.ip), 5353))
    data, peer = rx.recvfrom(100)
    rx.sendto(b"answer", peer)  # the reply rides the conntrack entry
    assert tx.recvfrom(100)[0] == b"answer"
    tx.sendto(b"q", (str(server.ip), 5354))
    with pytest.raises(TimeoutError):
        rx_denied.recvfrom(100)


def test_cidr_identity_from_the_ipcache():
    cidr_identity = (1 << 24) | 7
    with topology(["client", "outside"]) as t:
        client, outside = t["client"], t["outside"]
        t.attach("client", egress=True)  # "outside" is not an endpoint of the datapath
        t.serve("outside", 8080)
        t.dp.sync_policy([allow(client, "egress", cidr_identity, 8080)])
        block = IPv4Network(f"{outside.ip}/30", strict=False)
        t.dp.sync_ipcache({block: cidr_identity, t.net: 4242})

        assert t.can_connect("client", outside.ip, 8080)
        # The same address now falls only into the /24 with another identity.
        t.dp.sync_ipcache({t.net: 4242})
        assert not t.can_connect("client", outside.ip, 8080, DROP_TIMEOUT)
        assert drops_until(t.dp, lambda e: e.dst_identity == 4242)
        t.dp.sync_ipcache({})
        assert not t.can_connect("client", outside.ip, 8080, DROP_TIMEOUT)
        assert drops_until(t.dp, lambda e: e.dst_identity == WORLD), (
            "an address outside every prefix is judged as world"
        )


def test_host_traffic_is_judged_at_the_endpoint_egress_hook(pair):
    t = pair
    server = t["server"]
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    host_ips = netns.host_addresses()

    with pytest.raises(TimeoutError):
        socket.create_connection((str(server.ip), 8080), timeout=DROP_TIMEOUT)
    t.dp.sync_ipcache({IPv4Network(f"{ip}/32"): HOST for ip in host_ips})
    t.dp.sync_policy([allow(server, "ingress", HOST, 8080)])
    conn = socket.create_connection((str(server.ip), 8080), timeout=1)
    try:
        assert echo(conn) == b"ping"
    finally:
        conn.close()


def test_audit_endpoint_passes_and_reports(pair):
    t = pair
    server = t["server"]
    t.attach("client")
    t.attach("server", ingress=True, audit=True)
    t.serve("server", 8080)

    assert t.can_connect("client", server.ip, 8080)
    events = drops_until(t.dp, lambda e: e.dst_port == 8080)
    assert events[0].audited and events[0].reason == "default-deny"
    assert t.dp.counters()["total"]["audited"] >= 1
    assert t.dp.counters()["total"]["denied"] == 0


def test_audit_deny_entry_passes_but_real_deny_drops(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.serve("server", 8081)
    t.dp.sync_policy(
        [
            deny(server, "ingress", client.identity, 8080, audit=True),
            deny(server, "ingress", client.identity, 8081),
        ]
    )

    assert t.can_connect("client", server.ip, 8080)
    assert not t.can_connect("client", server.ip, 8081, DROP_TIMEOUT)
    audited = drops_until(t.dp, lambda e: e.dst_port == 8080)
    assert audited[0].audited and audited[0].reason == "policy-deny"


def test_redirect_to_transparent_listener_preserves_source(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    srv = t.serve("server", 8080)
    listener = transparent_listener()
    proxy_port = listener.getsockname()[1]
    try:
        t.dp.register_proxy_listener(proxy_port, listener)
        t.dp.sync_policy([redirect(server, "ingress", client.identity, 8080, proxy_port)])

        downstream = t.connect("client", server.ip, 8080, timeout=2)
        listener.settimeout(2)
        accepted, peer = listener.accept()
        # The proxy learns the original destination from its own socket.
        assert accepted.getsockname() == (str(server.ip), 8080)
        assert peer == downstream.getsockname()

        upstream = transparent_upstream(client.ip, server.ip, 8080, t.proxy_mark)
        assert echo(upstream, b"upstream") == b"upstream"
        assert wait_for(lambda: srv.peers)[0][0] == str(client.ip)

        # Relay one exchange by hand: client -> proxy -> server -> proxy -> client.
        downstream.sendall(b"GET /")
        accepted.settimeout(2)
        request = accepted.recv(100)
        assert echo(upstream, request) == b"GET /"
        accepted.sendall(b"200 OK")
        downstream.settimeout(2)
        assert downstream.recv(100) == b"200 OK"
        totals = t.dp.counters()["total"]
        assert totals["redirected"] == 1
        assert totals["proxy_upstream"] >= 1
        assert totals["proxy_replies"] >= 1
        for s in (downstream, accepted, upstream):
            s.close()
    finally:
        listener.close()


def test_redirect_fails_closed_without_listener(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server")  # not even enforced: the redirect alone must not be bypassed
    t.serve("server", 8080)
    t.dp.sync_policy([redirect(server, "ingress", client.identity, 8080, 15001)])

    with pytest.raises(TimeoutError):
        t.connect("client", server.ip, 8080, timeout=DROP_TIMEOUT)
    events = drops_until(t.dp, lambda e: e.reason == "proxy-unavailable")
    assert events and events[0].dst_port == 8080
    assert t.dp.counters()["total"]["proxy_unavailable"] >= 1

    # A listener that comes and goes: afterwards it fails closed again.
    listener = transparent_listener()
    port = listener.getsockname()[1]
    try:
        t.dp.sync_policy([redirect(server, "ingress", client.identity, 8080, port)])
        t.dp.register_proxy_listener(port, listener)
        assert t.can_connect("client", server.ip, 8080)
        t.dp.unregister_proxy_listener(port)
        assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)
        # A proxy that dies without unregistering: closing the socket takes it
        # out of the sockhash, and the redirect fails closed again.
        t.dp.register_proxy_listener(port, listener)
        listener.close()
        assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)
    finally:
        listener.close()


def test_redirect_from_the_host_fails_closed(pair):
    t = pair
    server = t["server"]
    t.attach("server")
    t.serve("server", 8080)
    listener = transparent_listener()
    try:
        port = listener.getsockname()[1]
        t.dp.register_proxy_listener(port, listener)
        t.dp.sync_policy([redirect(server, "ingress", 0, 8080, port)])
        with pytest.raises(TimeoutError):
            socket.create_connection((str(server.ip), 8080), timeout=DROP_TIMEOUT)
        assert drops_until(t.dp, lambda e: e.reason == "redirect-from-host")
    finally:
        listener.close()


def test_listener_without_ip_transparent_is_refused(pair):
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(ValueError):
            pair.dp.register_proxy_listener(plain.getsockname()[1], plain)
    finally:
        plain.close()


def test_policy_change_in_place_keeps_allowed_connection(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.serve("server", 9090)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 8080)])
    programs = t.dp.program_ids()
    conn = t.connect("client", server.ip, 8080)
    assert echo(conn, b"before") == b"before"

    t.dp.sync_policy(
        [
            allow(server, "ingress", client.identity, 8000, 8100),
            allow(server, "ingress", client.identity, 9090),
        ]
    )
    assert echo(conn, b"after") == b"after"
    assert t.can_connect("client", server.ip, 9090)
    assert t.dp.program_ids() == programs  # updated in place, not reloaded
    assert t.dp.counters()["total"]["revoked"] == 0


def test_revoked_flow_stops(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 8080)])
    conn = t.connect("client", server.ip, 8080)
    assert echo(conn, b"before") == b"before"

    t.dp.sync_policy([])
    conn.settimeout(DROP_TIMEOUT)
    with pytest.raises(TimeoutError):
        echo(conn, b"after")
    assert t.dp.counters()["total"]["revoked"] >= 1


def test_detach_removes_filters_and_stops_enforcing(pair):
    t = pair
    server = t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    assert len(netns.tc_bpf_filters(server.ifindex)) == 2
    assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)

    t.dp.detach(server.endpoint_id)
    assert netns.tc_bpf_filters(server.ifindex) == []
    assert t.can_connect("client", server.ip, 8080)


def _prog_exists(prog_id: int) -> bool:
    return (
        subprocess.run(
            ["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True
        ).returncode
        == 0
    )


def test_cleanup_leaves_nothing_behind():
    with topology(["client", "server"]) as t:
        t.attach_all(ingress=True)
        t.dp.sync_policy([allow(t["server"], "ingress", t["client"].identity, 8080)])
        t.serve("server", 8080)
        assert t.can_connect("client", t["server"].ip, 8080)
        programs = list(t.dp.program_ids().values())
        tag, table, mark = t.tag, t.table, t.redirect_mark
        names = [(ep.ns, ep.ifname) for ep in t.endpoints.values()]
        assert all(_prog_exists(p) for p in programs)
        assert netns.proxy_routing_installed(mark, table)

    assert not [n for n in netns.list_namespaces(f"l7t-{tag}")]
    assert not [n for n, _ in netns.list_links(f"l7t{tag}")]
    assert not any(netns.endpoint_exists(ns, ifname) for ns, ifname in names)
    assert not netns.proxy_routing_installed(mark, table)
    assert netns.list_rules_by_table([table]) == []
    deadline = time.monotonic() + 2
    while any(_prog_exists(p) for p in programs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_prog_exists(p) for p in programs)


def test_close_is_idempotent_and_safe_after_partial_setup(pair):
    t = pair
    t.attach("client")
    t.dp.close()
    t.dp.close()
    assert netns.tc_bpf_filters(t["client"].ifindex) == []


def test_a_syn_never_rides_the_conntrack_entry_of_the_opposite_direction(pair):
    t = pair
    server = t["server"]
    host_ip = next(ip for ip in netns.host_addresses() if not ip.is_loopback)
    t.dp.sync_ipcache({IPv4Network(f"{ip}/32"): HOST for ip in netns.host_addresses()})
    t.attach("server", ingress=True, egress=True)
    t.dp.sync_policy([allow(server, "ingress", HOST, 8080)])
    listener = t.serve("server", 8080)

    # host:P -> server:8080 is allowed and leaves a conntrack entry behind.
    host_listener = socket.socket()
    host_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    host_listener.bind((str(host_ip), 0))
    port = host_listener.getsockname()[1]
    try:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind((str(host_ip), port))
        client.settimeout(2)
        client.connect((str(server.ip), 8080))
        assert echo(client) == b"ping"
        client.close()
        listener.close()
        host_listener.listen()

        # The exact reverse tuple, opened from the server side: its egress is
        # enforced with nothing allowed, so it must be judged and dropped.
        reverse = t.socket_in("server")
        reverse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reverse.bind((str(server.ip), 8080))
        reverse.settimeout(DROP_TIMEOUT)
        with pytest.raises(TimeoutError):
            reverse.connect((str(host_ip), port))
        events = drops_until(t.dp, lambda e: e.direction == "egress")
        assert events and events[0].reason == "default-deny"
    finally:
        host_listener.close()


def test_egress_redirect_and_ingress_proxy_port_preferred(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server")
    t.serve("server", 8080)
    t.serve("server", 9090)
    egress_proxy, ingress_proxy = transparent_listener(), transparent_listener()
    try:
        for lst in (egress_proxy, ingress_proxy):
            lst.settimeout(2)
            t.dp.register_proxy_listener(lst.getsockname()[1], lst)
        t.dp.sync_policy(
            [
                redirect(client, "egress", 0, 8080, egress_proxy.getsockname()[1]),
                redirect(client, "egress", 0, 9090, egress_proxy.getsockname()[1]),
                redirect(server, "ingress", 0, 9090, ingress_proxy.getsockname()[1]),
            ]
        )
        # Only the client's egress redirects 8080.
        first = t.connect("client", server.ip, 8080)
        accepted, _ = egress_proxy.accept()
        assert accepted.getsockname() == (str(server.ip), 8080)
        accepted.close()
        # Both directions redirect 9090: the destination's ingress proxy wins.
        second = t.connect("client", server.ip, 9090)
        accepted, _ = ingress_proxy.accept()
        assert accepted.getsockname() == (str(server.ip), 9090)
        accepted.close()
        first.close()
        second.close()
    finally:
        egress_proxy.close()
        ingress_proxy.close()


def test_udp_redirect_fails_closed(pair):
    t = pair
    server = t["server"]
    t.attach("client")
    t.attach("server")
    listener = transparent_listener()
    try:
        t.dp.register_proxy_listener(listener.getsockname()[1], listener)
        t.dp.sync_policy(
            [redirect(server, "ingress", 0, 5353, listener.getsockname()[1], proto=UDP)]
        )
        rx = t.socket_in("server", socket.SOCK_DGRAM)
        rx.bind((str(server.ip), 5353))
        rx.settimeout(DROP_TIMEOUT)
        tx = t.socket_in("client", socket.SOCK_DGRAM)
        tx.sendto(b"q", (str(server.ip), 5353))
        with pytest.raises(TimeoutError):
            rx.recvfrom(100)
        assert drops_until(t.dp, lambda e: e.reason == "proxy-unavailable" and e.proto == UDP)
    finally:
        listener.close()


def test_any_protocol_entry_covers_tcp_and_udp(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 7000)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 7000, proto=0)])
    assert t.can_connect("client", server.ip, 7000)
    rx = t.socket_in("server", socket.SOCK_DGRAM)
    rx.bind((str(server.ip), 7000))
    rx.settimeout(1)
    tx = t.socket_in("client", socket.SOCK_DGRAM)
    tx.sendto(b"q", (str(server.ip), 7000))
    assert rx.recvfrom(100)[0] == b"q"


def test_map_fill_and_status_report_what_is_loaded(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.dp.sync_ipcache({t.net: 4242})
    t.dp.sync_policy([allow(server, "ingress", client.identity, 8000, 8090)])
    assert t.can_connect("client", server.ip, 8080)

    fill = t.dp.map_fill()
    assert fill["ipcache"][0] == 3  # the /24 and two endpoint /32s
    assert fill["endpoints"][0] == 2
    assert fill["policy"][0] == 5  # 8000/10, 8064/12, 8080/13, 8088/15, 8090/16
    assert fill["conntrack"][0] >= 1
    status = t.dp.status()
    assert status["loaded"] and set(status["attached"]) == {client.endpoint_id, server.endpoint_id}
    assert status["policy_revision"] >= 4
    assert set(status["programs"]) == {"from_endpoint", "to_endpoint", "from_netdev", "to_netdev"}


def test_replies_pass_an_enforced_ingress_of_the_initiator(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client", ingress=True)  # nothing may come in, except replies
    t.attach("server")
    t.serve("server", 8080)
    conn = t.connect("client", server.ip, 8080)
    assert echo(conn, b"reply me") == b"reply me"
    # While the server cannot open anything towards the client.
    t.serve("client", 8080)
    assert not t.can_connect("server", client.ip, 8080, DROP_TIMEOUT)


def test_identity_change_revokes_established_flow(pair):
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.serve("server", 8080)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 8080)])
    conn = t.connect("client", server.ip, 8080)
    assert echo(conn, b"before") == b"before"

    t.dp.set_endpoint(dataclasses.replace(t.info("client"), identity=7777))
    conn.settimeout(DROP_TIMEOUT)
    with pytest.raises(TimeoutError):
        echo(conn, b"after")
    events = drops_until(t.dp, lambda e: e.src_identity == 7777)
    assert events and events[0].reason == "default-deny"


def test_ipv6_is_dropped_at_enforced_endpoints(pair):
    t = pair
    client = t["client"]
    t.attach("client")
    listener = socket.socket(socket.AF_INET6)
    try:
        listener.bind(("::", 0))
        listener.listen()
        port = listener.getsockname()[1]
        host_ll = wait_for(lambda: netns.link_local_v6(client.ifindex), timeout=5)
        assert host_ll, "the host veth never got a usable link-local address"
        scope = netns.link_index_in(client.ns, "eth0")

        def connect_v6(timeout):
            s = netns.open_socket_in_netns(client.ns, socket.AF_INET6)
            try:
                s.settimeout(timeout)
                s.connect((host_ll, port, 0, scope))
                return True
            except OSError:
                return False
            finally:
                s.close()

        # Not enforced: IPv6 passes (once duplicate address detection is done).
        assert wait_for(lambda: connect_v6(0.5), timeout=5)
        t.dp.set_endpoint(t.info("client", egress=True))
        assert not connect_v6(DROP_TIMEOUT)
        assert t.dp.counters()["total"]["unsupported"] >= 1
    finally:
        listener.close()


def test_a_restarted_instance_replaces_the_filters_of_a_crashed_one():
    with topology(["client", "server"]) as t:
        server = t["server"]
        t.attach("client")
        t.attach("server", ingress=True)  # default deny by the first instance
        t.serve("server", 8080)
        assert not t.can_connect("client", server.ip, 8080, DROP_TIMEOUT)

        from l7proxy.datapath.loader import Datapath

        second = Datapath(
            proxy_mark=t.proxy_mark, redirect_mark=t.redirect_mark, instance=t.dp.instance
        )
        try:
            second.load()
            second.attach(t.info("client"))
            second.attach(t.info("server"))  # the new run does not enforce
            assert sorted(netns.tc_bpf_filters(server.ifindex)) == [
                f"l7p-{t.dp.instance}-from_endpoint",
                f"l7p-{t.dp.instance}-to_endpoint",
            ]
            assert t.can_connect("client", server.ip, 8080)
            assert second.counters()["total"]["allowed"] >= 1
        finally:
            # The first instance "crashed": forget its attachments without detaching.
            t.dp._attached.clear()
            second.close()
        assert netns.tc_bpf_filters(server.ifindex) == []


def test_cleanup_happens_when_the_test_body_fails():
    with pytest.raises(RuntimeError, match="boom"):
        with topology(["a"]) as t:
            t.attach("a", ingress=True)
            tag, table, mark = t.tag, t.table, t.redirect_mark
            programs = list(t.dp.program_ids().values())
            raise RuntimeError("boom")
    assert netns.list_namespaces(f"l7t-{tag}") == []
    assert netns.list_links(f"l7t{tag}") == []
    assert not netns.proxy_routing_installed(mark, table)
    deadline = time.monotonic() + 2
    while any(_prog_exists(p) for p in programs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_prog_exists(p) for p in programs)


def test_icmp_errors_of_a_tracked_flow_reach_the_sender(pair):
    t = pair
    server = t["server"]
    t.attach("client", ingress=True)  # no ICMP may come in on its own
    t.attach("server")
    sender = t.socket_in("client", socket.SOCK_DGRAM)
    sender.settimeout(2)
    sender.connect((str(server.ip), 5999))  # nothing listens there
    sender.send(b"anyone?")
    # The server's port-unreachable belongs to the tracked UDP flow.
    with pytest.raises(ConnectionRefusedError):
        sender.recv(100)
    assert not drops_until(t.dp, lambda e: e.proto == 1, timeout=0.3)


def test_a_flood_of_denied_syns_is_reported_once_per_flow_and_interval_with_exact_counts(pair):
    """Drop reports are aggregated per flow in the kernel (issue 14, finding 7): the
    first drop is reported at once, the rest counted and reported with their count
    at most once per interval, so a flood costs the agent a few events, not one per
    packet. Every dropped packet is in exactly one report's count and in the
    verdict counter."""
    t = pair
    client, server = t["client"], t["server"]
    t.attach("client")
    t.attach("server", ingress=True)
    t.dp.sync_policy([allow(server, "ingress", client.identity, 9090)])
    before = t.dp.counters()["endpoints"].get(server.endpoint_id, {}).get("denied", 0)

    for _ in range(300):  # 300 SYNs from as many source ports, within a moment
        s = t.socket_in("client")
        s.setblocking(False)
        try:
            s.connect((str(server.ip), 8080))
        except BlockingIOError:
            pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # no SYN retransmission: exactly one packet per socket

    reports: list = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reports += [e for e in t.dp.poll_drops(100) if e.dst_port == 8080]
        if sum(e.count for e in reports) >= 300:
            break
    denied = t.dp.counters()["endpoints"][server.endpoint_id]["denied"] - before

    assert denied == 300
    assert sum(e.count for e in reports) == 300
    assert reports[0].count == 1  # the first drop is reported at once
    assert len(reports) <= 5
    assert all(
        (e.src_ip, e.dst_ip, e.reason) == (client.ip, server.ip, "default-deny") for e in reports
    )
