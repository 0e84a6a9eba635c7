"""Replay observations through the real decision code, with the suggestion enforced.

The suggested YAML is read back by the policy loader (``load_text``), its audit
annotation set aside (the question is what enforcement would do), and each
(endpoint, peer, direction, port) is set up the way ``policy trace`` sets a
scenario up (``trace.build_scenario``: the same compilation, identities and
ipcache). Each observed request then goes through ``ConnectionPolicy.decide``,
the call the proxy makes per request, with both ends' policies in force; an
L3/L4-only observation through the port verdict. Whatever is not allowed
outright is a failure, with the trace of why. What is allowed is counted for
the rule of the observation's own end (``CompiledPolicy.l7_decide`` of that leg).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from l7proxy.policy import trace as tracing
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.model import INGRESS, Policy
from l7proxy.policy.state import ConnectionPolicy, PolicyState
from l7proxy.policy.suggest.observed import Observation, Peer, Target

_DOCUMENT = re.compile(r"^document\[[0-9]+\]\.")


@dataclass(frozen=True, slots=True)
class Denial:
    observation: Observation
    count: int  # records that showed it
    reason: str
    trace: tuple[str, ...] = ()


@dataclass(slots=True)
class Replay:
    """Per policy: requests allowed by each rule path alone, and jointly; denials."""

    allowed: int = 0
    alone: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    jointly: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    denials: list[Denial] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.denials

    @property
    def denied(self) -> int:
        return sum(d.count for d in self.denials)


def enforced(text: str, source: str = "<suggestion>") -> list[Policy]:
    """The suggestion as the loader reads it, judged as if enforced."""
    return [replace(p, audit=False) for p in load_text(text, source=source)]


def replay(policies: Sequence[Policy], observed: Mapping[Observation, int]) -> Replay:
    result = Replay()
    groups: dict[tuple[Target, Peer, str, int], list[Observation]] = defaultdict(list)
    for obs in observed:
        groups[(obs.target, obs.peer, obs.direction, obs.port)].append(obs)
    host_prefixes = [tracing.LOOPBACK] + sorted(
        {
            ipaddress.IPv4Network(f"{p.ip}/32")
            for _, p, _, _ in groups
            if p.kind == "host" and _ipv4(p.ip)
        }
    )
    for (target, peer, direction, port), seen in groups.items():
        mine = tracing.PeerSpec(target.name, labels=target.label_map)
        other = _peer_spec(peer)
        src, dst = (other, mine) if direction == INGRESS else (mine, other)
        scenario = tracing.build_scenario(
            list(policies), [], IdentityAllocator(), src, dst, port, host_prefixes=host_prefixes
        )
        conn = ConnectionPolicy(PolicyState(scenario.compiled), scenario.src, scenario.dst)
        for obs in seen:
            _judge(result, scenario, conn, obs, observed[obs])
    return result


def _judge(
    result: Replay, scenario: tracing.Scenario, conn: ConnectionPolicy, obs: Observation, n: int
) -> None:
    """Allowed is what the proxy would do (both ends' policies, ``conn``); the rule it
    is counted for is the one of this observation's end."""
    mine, other = (
        (scenario.dst, scenario.src) if obs.direction == INGRESS else (scenario.src, scenario.dst)
    )
    assert mine.endpoint is not None
    compiled, request = scenario.compiled, obs.request
    if request is None or obs.transport != "TCP":
        verdict = compiled.port_verdict(
            mine.endpoint.id, obs.direction, other.identity, obs.port, obs.transport
        )
        both = conn.l4 if obs.transport == "TCP" else verdict
        if both.allowed and not both.audit and verdict.allowed and not verdict.audit:
            result.allowed += n
            policy, _, path = (
                verdict.reason.removeprefix("allowed by ").partition(", ")[0].partition(" ")
            )
            result.alone[policy][_in_document(path)] += n
            return
        reason = verdict.reason if not verdict.allowed or verdict.audit else both.reason
        result.denials.append(Denial(obs, n, f"L3/L4: {reason}"))
        return
    if not conn.l4.allowed or conn.l4.audit:
        result.denials.append(Denial(obs, n, f"L3/L4: {conn.l4.reason}"))
        return
    if conn.parser is not None and conn.parser != request.family:
        result.denials.append(
            Denial(obs, n, f"the port is parsed as {conn.parser}, not {request.family}")
        )
        return
    decision = conn.decide(request)
    if not decision.allowed or decision.audit:
        lines = tracing.trace(scenario, [request])["l7"][0]["trace"]
        result.denials.append(Denial(obs, n, decision.reason, tuple(lines)))
        return
    result.allowed += n
    decision = compiled.l7_decide(
        mine.endpoint.id, obs.direction, other.identity, obs.port, request
    )
    if " + " in decision.rule:
        for path in decision.rule.split(" + "):
            result.jointly[decision.policy][_in_document(path)] += n
    else:
        result.alone[decision.policy][_in_document(decision.rule)] += n


def _in_document(path: str) -> str:
    """A rule's path within its own document (a file of several prefixes them)."""
    return _DOCUMENT.sub("", path)


def _peer_spec(peer: Peer) -> tracing.PeerSpec:
    if peer.kind == "endpoint":
        labels = dict(peer.labels)
        return tracing.PeerSpec(",".join(f"{k}={v}" for k, v in peer.labels), labels=labels)
    ip = peer.ip if _ipv4(peer.ip) else ""
    if not ip and peer.kind == "host":
        ip = "127.0.0.1"
    if not ip and peer.kind == "cidr":
        ip = str(ipaddress.IPv4Network(peer.cidr).network_address)
    return tracing.PeerSpec(ip or "unknown", ip=ip)


def _ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
