"""The service map, aggregated on the server: nodes, edges with counts by verdict,
and per edge an L7 summary (HTTP methods and paths, gRPC methods, Kafka roles and
topics, CQL actions and tables, TLS server names).

Every dimension is bounded, whatever the traffic: at most ``max_nodes`` nodes
and ``max_edges`` edges (flows beyond them are counted, not drawn), and at most
``max_l7`` summary entries per edge, kept by the Space-Saving algorithm
(Metwally et al.): a new entry takes the place of the least counted one and
inherits its count as a possible overcount, so the heaviest entries stay and a
flood of distinct paths costs no memory. The browser gets a snapshot, never the
records themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from l7proxy.observe.flowlog import Record
from l7proxy.ui.flows import Peer, l7_keys, peer_of

MAX_NODES = 200
MAX_EDGES = 600
MAX_L7 = 12
MAX_PORTS = 8


@dataclass(slots=True)
class L7Entry:
    count: int = 0
    overcount: int = 0  # Space-Saving: at most this much of ``count`` belongs to evicted keys
    verdicts: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Edge:
    source: str
    target: str
    verdicts: dict[str, int] = field(default_factory=dict)
    protocols: dict[str, int] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)
    l7: dict[str, L7Entry] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass(slots=True)
class Node:
    peer: Peer
    flows: int = 0
    last_seen: float = 0.0


class ServiceMap:
    def __init__(
        self, max_nodes: int = MAX_NODES, max_edges: int = MAX_EDGES, max_l7: int = MAX_L7
    ):
        self.max_nodes, self.max_edges, self.max_l7 = max_nodes, max_edges, max_l7
        self.nodes: dict[str, Node] = {}
        self.edges: dict[tuple[str, str], Edge] = {}
        self.flows = 0  # records counted (a kernel report of many dropped packets is one)
        self.flows_not_drawn = 0  # beyond the node or edge bound
        self.records_missed = 0  # lost before they reached the map (the tap's bound)
        self.version = 0  # grows with every change; a snapshot is resent only when it moved
        self.since: float | None = None

    def add(self, record: Record) -> None:
        when = record.get("time")
        when = float(when) if isinstance(when, (int, float)) else 0.0
        self.flows += 1
        self.version += 1
        if self.since is None or when < self.since:
            self.since = when
        source = self._node(peer_of(record.get("source") or {}), when)
        target = self._node(peer_of(record.get("destination") or {}), when)
        if source is None or target is None:
            self.flows_not_drawn += 1
            return
        edge = self.edges.get((source, target))
        if edge is None:
            if len(self.edges) >= self.max_edges:
                self.flows_not_drawn += 1
                return
            edge = self.edges[(source, target)] = Edge(source, target, first_seen=when)
        verdict = str(record.get("verdict") or "")
        edge.verdicts[verdict] = edge.verdicts.get(verdict, 0) + 1
        protocol = str(record.get("protocol") or "")
        edge.protocols[protocol] = edge.protocols.get(protocol, 0) + 1
        port = (record.get("destination") or {}).get("port")
        if isinstance(port, int) and port and len(edge.ports) < MAX_PORTS:
            edge.ports.add(port)
        edge.last_seen = max(edge.last_seen, when)
        for key in l7_keys(record):
            self._count_l7(edge, key, verdict)

    def missed(self, count: int) -> None:
        if count:
            self.records_missed += count
            self.version += 1

    def _node(self, peer: Peer, when: float) -> str | None:
        node = self.nodes.get(peer.key)
        if node is None:
            if len(self.nodes) >= self.max_nodes:
                return None
            node = self.nodes[peer.key] = Node(peer)
        node.flows += 1
        node.last_seen = max(node.last_seen, when)
        return peer.key

    def _count_l7(self, edge: Edge, key: str, verdict: str) -> None:
        entry = edge.l7.get(key)
        if entry is None:
            if len(edge.l7) < self.max_l7:
                entry = edge.l7[key] = L7Entry()
            else:  # Space-Saving: replace the least counted entry, inherit its count
                least_key = min(edge.l7, key=lambda k: edge.l7[k].count)
                least = edge.l7.pop(least_key)
                entry = edge.l7[key] = L7Entry(least.count, least.count)
        entry.count += 1
        entry.verdicts[verdict] = entry.verdicts.get(verdict, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON for the browser: groups, nodes and edges, each edge's L7
        entries heaviest first."""
        groups: dict[str, dict[str, Any]] = {}
        for node in self.nodes.values():
            peer = node.peer
            groups.setdefault(
                peer.group,
                {"id": peer.group, "kind": peer.group_kind, "label": _group_label(peer)},
            )
        return {
            "version": self.version,
            "since": self.since,
            "flows": self.flows,
            "flows_not_drawn": self.flows_not_drawn,
            "records_missed": self.records_missed,
            "bounds": {"nodes": self.max_nodes, "edges": self.max_edges, "l7": self.max_l7},
            "groups": sorted(groups.values(), key=lambda g: (g["kind"], g["label"])),
            "nodes": [
                {
                    "id": key,
                    "label": n.peer.label,
                    "kind": n.peer.kind,
                    "group": n.peer.group,
                    "labels": dict(n.peer.labels),
                    "flows": n.flows,
                    "last_seen": n.last_seen,
                }
                for key, n in sorted(self.nodes.items())
            ],
            "edges": [
                {
                    "id": f"{e.source}->{e.target}",
                    "source": e.source,
                    "target": e.target,
                    "verdicts": dict(e.verdicts),
                    "protocols": dict(e.protocols),
                    "ports": sorted(e.ports),
                    "l7": [
                        {
                            "key": key,
                            "count": entry.count,
                            "overcount": entry.overcount,
                            "verdicts": dict(entry.verdicts),
                        }
                        for key, entry in sorted(
                            e.l7.items(), key=lambda item: (-item[1].count, item[0])
                        )
                    ],
                    "first_seen": e.first_seen,
                    "last_seen": e.last_seen,
                }
                for _, e in sorted(self.edges.items())
            ],
        }


def _group_label(peer: Peer) -> str:
    if peer.group.startswith("ns:"):
        return f"namespace {peer.group[3:]}"
    return {
        "endpoints": "endpoints (no namespace label)",
        "node": "this node",
        "outside": "outside: world and CIDRs",
    }.get(peer.group, peer.group)
