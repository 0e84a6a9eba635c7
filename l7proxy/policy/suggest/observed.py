"""Flow-log records -> typed observations: who asked what of which endpoint.

A record is the plain dict the flow log writes (``l7proxy/observe/flowlog.py``):
``source`` and ``destination`` with ``ip``, ``port``, ``identity``, ``endpoint``
and ``labels``; ``protocol``; ``l7`` with the request's flow fields; ``verdict``;
``time``. L7 records (``type: l7``) become typed requests again, the same types
the engines hand to ``decide``, so the suggestion is checked by the decision
code itself. Kernel reports of a connection let through in audit mode
(``type: drop``, verdict ``AUDIT``) are L3/L4 observations without a request.
Anything else (limits, denials, records of another layout) is not an
observation and is counted as skipped.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from l7proxy.policy.model import EGRESS, INGRESS
from parsers.requests import KafkaRequest, L7Request, from_flow_fields

# What was let through: forwarded, or forwarded in audit mode where enforcement
# would have denied it. A suggestion allows these by default.
LET_THROUGH = frozenset({"FORWARDED", "AUDIT"})
VERDICTS = frozenset({"FORWARDED", "AUDIT", "DENIED", "DROPPED"})

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Peer:
    """The remote side of an observed flow, as a policy can name it.

    ``kind``: ``endpoint`` (its labels), ``host``, ``world`` (its address), or
    ``cidr`` (a prefix some policy names: ``cidr`` holds it).
    """

    kind: str
    labels: Labels = ()
    ip: str = ""
    cidr: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """The local endpoint that received the flow."""

    name: str
    labels: Labels

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class Observation:
    """What was asked, without when: equal requests are counted, not kept apart (a
    flow log holds hundreds of thousands of records, and a few thousand kinds)."""

    target: Target  # the local endpoint whose policy this is
    peer: Peer  # the other end
    direction: str  # ingress (the peer connected to the target) | egress (the other way)
    port: int  # the destination port
    transport: str  # TCP | UDP
    request: L7Request | None  # None: L3/L4 only


# Each distinct observation and how many records showed it.
Observed = Counter[Observation]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which records a suggestion is made from."""

    verdicts: frozenset[str] = LET_THROUGH
    since: float | None = None  # epoch seconds
    until: float | None = None
    endpoint: str | None = None  # an endpoint name, or labels k=v,... it must carry
    directions: frozenset[str] = frozenset({INGRESS})

    def wants_target(self, target: Target) -> bool:
        if self.endpoint is None:
            return True
        if "=" not in self.endpoint:
            return target.name == self.endpoint
        wanted = dict(
            item.split("=", 1) for item in self.endpoint.split(",") if "=" in item.strip()
        )
        have = target.label_map
        return all(have.get(k.strip()) == v.strip() for k, v in wanted.items())


class SkippedCount(dict[str, int]):
    """Records left out, by reason (for the report)."""

    def add(self, reason: str) -> None:
        self[reason] = self.get(reason, 0) + 1


def select(
    records: Iterable[Mapping[str, Any]], selection: Selection, skipped: SkippedCount
) -> Observed:
    """The records ``selection`` wants, as counted observations (in order first seen)."""
    out: Observed = Counter()
    for record in records:
        out.update(observations(record, selection, skipped))
    return out


def observations(
    record: Mapping[str, Any], selection: Selection, skipped: SkippedCount
) -> list[Observation]:
    """One record as observations: the destination's ingress and the source's egress,
    those of them that ``selection`` wants and that are local endpoints. None: counted
    in ``skipped`` with the reason."""
    kind = record.get("type")
    if kind not in ("l7", "drop"):
        skipped.add(f"type {kind}")
        return []
    verdict = str(record.get("verdict", ""))
    if kind == "drop" and verdict != "AUDIT":
        verdict = "DROPPED"
    if verdict not in selection.verdicts:
        skipped.add(f"verdict {verdict}")
        return []
    when = record.get("time")
    if not isinstance(when, (int, float)):
        when = 0.0
    if selection.since is not None and when < selection.since:
        skipped.add("before --since")
        return []
    if selection.until is not None and when > selection.until:
        skipped.add("after --until")
        return []
    src, dst = record.get("source"), record.get("destination")
    if not isinstance(src, Mapping) or not isinstance(dst, Mapping):
        skipped.add("no source or destination")
        return []
    # A kernel report names the direction whose policy dropped it; an L7 decision
    # was made for both ends, each that is a local endpoint.
    directions = selection.directions
    if kind == "drop":
        transport = str(record.get("protocol", "tcp")).upper()
        if transport not in ("TCP", "UDP"):
            skipped.add(f"{transport} drop report")
            return []
        directions &= {str(record.get("direction") or INGRESS).lower()}
        request = None
    else:
        transport = "TCP"
        request = _request(str(record.get("protocol", "")), record.get("l7"))
        if request is None:
            skipped.add(f"unreadable {record.get('protocol')} request")
            return []
    port = dst.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        skipped.add("no destination port")
        return []
    ends = [(INGRESS, dst, src), (EGRESS, src, dst)]
    local = []
    for direction, mine, other in ends:
        target = _target(mine) if direction in directions else None
        if target is not None:
            local.append((direction, target, other))
    if not local:
        skipped.add(
            "destination is not a local endpoint"
            if directions == {INGRESS}
            else "no local endpoint in the directions asked"
        )
        return []
    wanted = [
        Observation(target, _peer(peer), direction, port, transport, request)
        for direction, target, peer in local
        if selection.wants_target(target)
    ]
    if not wanted:
        skipped.add("another endpoint")
    return wanted


def _labels(node: Any) -> Labels:
    if not isinstance(node, Mapping):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in node.items()))


def _target(dst: Mapping[str, Any]) -> Target | None:
    labels = _labels(dst.get("labels"))
    name = dst.get("endpoint")
    if not name or not labels or any(k.startswith(("reserved:", "cidr:")) for k, _ in labels):
        return None
    return Target(str(name), labels)


def _peer(src: Mapping[str, Any]) -> Peer:
    labels = _labels(src.get("labels"))
    ip = str(src.get("ip") or "")
    keys = [k for k, _ in labels]
    if "reserved:host" in keys:
        return Peer("host", ip=ip)
    cidrs = [k.removeprefix("cidr:") for k in keys if k.startswith("cidr:")]
    if cidrs:
        return Peer("cidr", ip=ip, cidr=str(ipaddress.IPv4Network(cidrs[0], strict=False)))
    if labels and "reserved:world" not in keys:
        return Peer("endpoint", labels=labels)
    return Peer("world", ip=ip)


def _request(protocol: str, fields: Any) -> L7Request | None:
    """The typed request a flow record describes (None if the record does not say)."""
    try:
        request = from_flow_fields(protocol, fields)
    except ValueError:
        return None
    if isinstance(request, KafkaRequest):
        # No rule reads the correlation id; left out, equal requests are one observation.
        request = replace(request, correlation_id=0)
    return request
