"""The service map's bounds: whatever the traffic, the map's size is fixed, the
heaviest L7 entries stay, and what is not drawn is counted."""

from __future__ import annotations

import json

from l7proxy.ui.flows import FilterError, FlowFilter, kafka_role, l7_keys, peer_of
from l7proxy.ui.servicemap import ServiceMap

SERVICE = {"ip": "10.0.0.1", "port": 80, "identity": 300, "endpoint": "api", "labels": {}}


def http(path: str, source: dict, verdict: str = "FORWARDED", method: str = "GET") -> dict:
    return {
        "time": 1.0,
        "type": "l7",
        "protocol": "http",
        "verdict": verdict,
        "source": source,
        "destination": SERVICE,
        "l7": {"method": method, "path": path, "host": "api"},
    }


def world(ip: str) -> dict:
    return {"ip": ip, "port": 5000, "identity": 2, "endpoint": None, "labels": {}}


def test_a_scan_from_ten_thousand_addresses_is_one_world_node():
    m = ServiceMap()
    for n in range(10_000):
        m.add(http("/", world(f"198.51.{n // 256}.{n % 256}")))
    snapshot = m.snapshot()
    assert [n["id"] for n in snapshot["nodes"]] == ["ep:api", "world"]
    assert snapshot["edges"][0]["verdicts"] == {"FORWARDED": 10_000}


def test_ten_thousand_distinct_paths_keep_the_heavy_ones_and_a_bounded_summary():
    m = ServiceMap(max_l7=12)
    client = world("203.0.113.5")
    for n in range(10_000):
        m.add(http(f"/items/{n}", client))
        if n % 10 == 0:  # 1,000 logins, spread through the flood
            m.add(http("/login", client, "DENIED", "POST"))
    (edge,) = m.snapshot()["edges"]
    assert len(edge["l7"]) == 12
    top = edge["l7"][0]
    # Space-Saving: the heavy entry is kept, its count at least its true count and
    # at most that plus its possible overcount.
    assert top["key"] == "POST /login"
    assert top["count"] - top["overcount"] <= 1000 <= top["count"]
    assert top["verdicts"]["DENIED"] <= 1000
    assert sum(e["verdicts"].get("FORWARDED", 0) for e in edge["l7"]) <= 10_000
    assert len(json.dumps(m.snapshot())) < 8_000


def test_nodes_and_edges_beyond_the_bounds_are_counted_not_drawn():
    m = ServiceMap(max_nodes=10, max_edges=5)
    for n in range(50):
        source = {"ip": f"10.1.0.{n}", "port": 1, "identity": 1000 + n, "labels": {"app": f"a{n}"}}
        m.add(http("/", source))
    snapshot = m.snapshot()
    assert len(snapshot["nodes"]) <= 10
    assert len(snapshot["edges"]) == 5
    assert snapshot["flows"] == 50
    assert snapshot["flows_not_drawn"] == 45


def test_peers_are_grouped_by_namespace_with_the_outside_apart():
    ns = {"k8s:io.kubernetes.pod.namespace": "shop", "k8s:app": "cart"}
    assert (peer_of({"endpoint": "cart-1", "labels": ns}).group) == "ns:shop"
    assert peer_of({"identity": 4000, "labels": {"io.kubernetes.pod.namespace": "db"}}).group == (
        "ns:db"
    )
    assert peer_of({"endpoint": "x", "labels": {"app": "x"}}).group == "endpoints"
    cidr = peer_of({"ip": "192.0.2.7", "identity": 16777217, "labels": {"cidr:192.0.2.0/24": ""}})
    assert (cidr.key, cidr.group) == ("cidr:192.0.2.0/24", "outside")
    assert peer_of({"ip": "8.8.8.8", "identity": 2}).key == "world"
    assert peer_of({"ip": "127.0.0.1", "identity": 1}).key == "host"


def test_l7_summaries_name_what_each_protocol_asks():
    def record(protocol: str, l7: dict) -> dict:
        return {"type": "l7", "protocol": protocol, "l7": l7}

    assert l7_keys(record("grpc", {"service": "pkg.Greeter", "method": "Hello"})) == [
        "pkg.Greeter/Hello"
    ]
    assert l7_keys(record("kafka", {"api_key": 0, "topics": ["orders", "refunds"]})) == [
        "produce orders",
        "produce refunds",
    ]
    assert l7_keys(record("kafka", {"api_key": 1, "topics": ["orders"]})) == ["consume orders"]
    # Metadata belongs to both roles: named as itself.
    assert l7_keys(record("kafka", {"api_key": 3, "topics": ["orders"]})) == ["metadata orders"]
    assert kafka_role(11) == "consume"  # JoinGroup
    assert l7_keys(record("cassandra", {"action": "select", "table": "shop.carts"})) == [
        "select shop.carts"
    ]
    assert l7_keys(record("tls", {"sni": "api.example.com"})) == ["sni api.example.com"]
    assert l7_keys({"type": "drop", "protocol": "tcp"}) == []


def test_filters_refuse_what_they_cannot_apply():
    for query, reason in (
        ({"verdict": "DENIED,LOST"}, "unknown verdict 'LOST'"),
        ({"protocol": "smtp"}, "unknown protocol 'smtp'"),
        ({"until": "noon"}, "until='noon': expected Unix seconds"),
    ):
        try:
            FlowFilter.from_query(query)
        except FilterError as err:
            assert str(err).startswith(reason)
        else:
            raise AssertionError(f"{query} was accepted")
