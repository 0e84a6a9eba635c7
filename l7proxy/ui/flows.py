"""What the UI shows of one flow record: the peer it names on each side (a node of
the service map), its L7 summary, a table row, and the filters of the flow table.

Plain functions of a record (the flow log's JSON dict), no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from l7proxy.observe.flowlog import Record
from l7proxy.policy.identity import HOST, WORLD, labels_key
from l7proxy.policy.rules.kafka import ROLES
from parsers.kafka.apis import policy_name

# The labels that name an endpoint's namespace: Cilium's (with its source
# prefix, as cluster mode keeps labels) and the same key without the prefix.
NAMESPACE_LABELS = ("k8s:io.kubernetes.pod.namespace", "io.kubernetes.pod.namespace")

VERDICTS = ("FORWARDED", "DENIED", "DROPPED", "AUDIT", "PAUSED")
PROTOCOLS = ("http", "grpc", "kafka", "cassandra", "tls", "tcp", "udp")

# Group kinds of the service map: endpoints by namespace, endpoints with none,
# this node, and the outside (world and CIDR peers), which is drawn apart.
NAMESPACE, NO_NAMESPACE, NODE, OUTSIDE = "namespace", "endpoints", "node", "outside"


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a flow as a node of the map."""

    key: str  # "ep:NAME", "id:N", "cidr:NET", "world", "host" or "ip:ADDR"
    label: str
    group: str  # the group's key: "ns:NAME", "endpoints", "node" or "outside"
    group_kind: str
    kind: str  # endpoint | identity | cidr | world | host | ip
    labels: tuple[tuple[str, str], ...] = ()


def namespace_of(labels: Mapping[str, str]) -> str | None:
    for key in NAMESPACE_LABELS:
        if labels.get(key):
            return labels[key]
    return None


def peer_of(side: Mapping[str, Any]) -> Peer:
    """The map node a record's ``source`` or ``destination`` stands for. World and
    CIDR peers are one node per identity, never one per address, so a scan from
    the internet does not grow the map."""
    labels: dict[str, str] = dict(side.get("labels") or {})
    identity = side.get("identity") or 0
    endpoint = side.get("endpoint")
    ns = namespace_of(labels)
    group, group_kind = (f"ns:{ns}", NAMESPACE) if ns else (NO_NAMESPACE, NO_NAMESPACE)
    shown = tuple(sorted(labels.items()))
    if endpoint:
        return Peer(f"ep:{endpoint}", str(endpoint), group, group_kind, "endpoint", shown)
    if identity == HOST:
        return Peer("host", "host", NODE, NODE, "host")
    if identity == WORLD:
        return Peer("world", "world", OUTSIDE, OUTSIDE, "world")
    cidr = next((k[len("cidr:") :] for k in labels if k.startswith("cidr:")), None)
    if cidr is not None:
        return Peer(f"cidr:{cidr}", cidr, OUTSIDE, OUTSIDE, "cidr")
    if identity:
        name = labels_key(labels) or f"identity {identity}"
        return Peer(f"id:{identity}", name, group, group_kind, "identity", shown)
    ip = str(side.get("ip") or "?")
    return Peer(f"ip:{ip}", ip, OUTSIDE, OUTSIDE, "ip")


def kafka_role(api_key: int) -> str:
    """``produce`` or ``consume`` for an API only that role has; else the API's name."""
    roles = [role for role, keys in ROLES.items() if api_key in keys]
    return roles[0] if len(roles) == 1 else policy_name(api_key)


def l7_keys(record: Record) -> list[str]:
    """The L7 summary entries of a record: ``GET /v1/x`` (the query left out),
    ``pkg.Svc/Method``, ``produce orders`` (one per topic), ``select ks.t``,
    ``sni api.example.com``. None for records without a request."""
    if record.get("type") != "l7":
        return []
    l7 = record.get("l7") or {}
    protocol = record.get("protocol")
    if protocol == "http":
        return [f"{l7.get('method')} {str(l7.get('path') or '').partition('?')[0]}"]
    if protocol == "grpc":
        return [f"{l7.get('service')}/{l7.get('method')}"]
    if protocol == "kafka":
        role = kafka_role(int(l7.get("api_key", -1)))
        names = l7.get("topics") or [f"group {g}" for g in l7.get("groups") or []]
        return [f"{role} {name}" for name in names] or [role]
    if protocol == "cassandra":
        return [f"{l7.get('action')} {l7.get('table') or '-'}".rstrip()]
    if protocol == "tls":
        return [f"sni {l7.get('sni') or '(none)'}"]
    return []


def summary(record: Record) -> str:
    """One line saying what the flow was, for the table."""
    kind = record.get("type")
    if kind == "drop":
        count = int(record.get("count", 1) or 1)
        return f"reason={record.get('reason')}" + (f" x{count}" if count > 1 else "")
    if kind == "limit":
        return f"limit={record.get('limit')}"
    l7 = record.get("l7") or {}
    protocol = record.get("protocol")
    if protocol == "http":
        host = l7.get("host") or ""
        return f"{l7.get('method')} {host}{l7.get('path')}"
    if protocol == "kafka":
        resources = l7.get("topics") or l7.get("groups") or l7.get("transactional_ids") or []
        return f"{policy_name(int(l7.get('api_key', -1)))} {','.join(resources)}".rstrip()
    keys = l7_keys(record)
    return keys[0] if keys else ""


def side_text(side: Mapping[str, Any]) -> str:
    """``deathstar:80``, ``10.0.0.7:43210``; a firewall's service is named with its port."""
    port = side.get("port")
    who = str(side.get("endpoint") or side.get("ip") or "?")
    return f"{who}:{port}" if port and not who.endswith(f":{port}") else who


def row(flow_id: str, record: Record) -> dict[str, Any]:
    """A flow table row: what the browser shows, nothing it does not."""
    src, dst = record.get("source") or {}, record.get("destination") or {}
    reply = record.get("reply") or {}
    return {
        "id": flow_id,
        "time": record.get("time"),
        "time_iso": record.get("time_iso", ""),
        "type": record.get("type", ""),
        "verdict": record.get("verdict", ""),
        "protocol": record.get("protocol", ""),
        "source": side_text(src),
        "source_node": peer_of(src).key,
        "destination": side_text(dst),
        "destination_node": peer_of(dst).key,
        "summary": summary(record),
        "reply": " ".join(f"{k}={v}" for k, v in reply.items()),
        "latency_ms": record.get("latency_ms"),
        "policy": record.get("policy") or "",
        "rule": record.get("rule") or "",
        "reason": record.get("reason") or "",
    }


class FilterError(ValueError):
    """A filter the flow table cannot apply, with the reason."""


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """The flow table's filters. Empty sets and None match everything."""

    verdicts: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()
    endpoint: str = ""  # a node key ("ep:deathstar", "world") or text in either side
    since: float | None = None
    until: float | None = None
    source: str = ""  # node keys: one edge of the map
    destination: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FlowFilter:
        """From URL query parameters: ``verdict=DENIED,AUDIT``, ``protocol=http``,
        ``endpoint=...``, ``since``/``until`` (Unix seconds), ``source``/``destination``
        (node keys, an edge of the map)."""
        verdicts = frozenset(v.upper() for v in _items(query.get("verdict", "")))
        unknown = verdicts - set(VERDICTS)
        if unknown:
            raise FilterError(f"unknown verdict {sorted(unknown)[0]!r} (one of {VERDICTS})")
        protocols = frozenset(p.lower() for p in _items(query.get("protocol", "")))
        unknown = protocols - set(PROTOCOLS)
        if unknown:
            raise FilterError(f"unknown protocol {sorted(unknown)[0]!r} (one of {PROTOCOLS})")
        return cls(
            verdicts,
            protocols,
            query.get("endpoint", "").strip(),
            _seconds(query, "since"),
            _seconds(query, "until"),
            query.get("source", "").strip(),
            query.get("destination", "").strip(),
        )

    def matches(self, record: Record) -> bool:
        if self.verdicts and record.get("verdict") not in self.verdicts:
            return False
        if self.protocols and record.get("protocol") not in self.protocols:
            return False
        when = record.get("time")
        if self.since is not None and (not isinstance(when, (int, float)) or when < self.since):
            return False
        if self.until is not None and (not isinstance(when, (int, float)) or when > self.until):
            return False
        src, dst = record.get("source") or {}, record.get("destination") or {}
        if self.source and peer_of(src).key != self.source:
            return False
        if self.destination and peer_of(dst).key != self.destination:
            return False
        if self.endpoint:
            return self._names(src) or self._names(dst)
        return True

    def _names(self, side: Mapping[str, Any]) -> bool:
        if peer_of(side).key == self.endpoint:
            return True
        text = self.endpoint.lower()
        return any(
            text in str(value).lower()
            for value in (side.get("endpoint"), side.get("ip"))
            if value is not None
        )


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seconds(query: Mapping[str, str], name: str) -> float | None:
    text = query.get(name, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise FilterError(f"{name}={text!r}: expected Unix seconds") from None
