"""Suggested policies -> CiliumNetworkPolicy YAML, with comments a reviewer reads.

Written by hand rather than by a YAML dumper, because the comments are the point:
each rule says how many observed requests it allowed when the suggestion was
replayed (``counts``, keyed by the rule's YAML path, which is also what flow
records and ``policy trace`` name), and generalised paths show targets they
came from. Every scalar is written plain only if YAML reads it back as the same
string; otherwise it is quoted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from l7proxy.policy.load import AUDIT_ANNOTATION
from l7proxy.policy.model import EGRESS, INGRESS
from l7proxy.policy.suggest.draft import PeerKey, PeerRuleDraft, PolicyDraft, PortDraft, RuleDraft


@dataclass(frozen=True, slots=True)
class Counts:
    """What the replay found, per rule: requests allowed by the rule alone, and
    requests allowed by it together with other rules (Kafka topics)."""

    alone: Mapping[str, int]
    jointly: Mapping[str, int]

    def text(self, path: str) -> str:
        alone, jointly = self.alone.get(path, 0), self.jointly.get(path, 0)
        text = plural(alone, "request")
        return text + (f" (+{jointly} with other rules)" if jointly else "")


NO_COUNTS = Counts({}, {})


def scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain where YAML reads it back unchanged."""
    try:
        plain_ok = (
            text == text.strip()
            and "\n" not in text
            and not text.startswith(("'", '"'))
            and yaml.safe_load(text) == text
        )
    except yaml.YAMLError:
        plain_ok = False
    if plain_ok:
        return text
    if text.isprintable():
        return "'" + text.replace("'", "''") + "'"
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def rule_path(direction: str, i: int, j: int, kind: str, k: int | None = None) -> str:
    """The YAML path of an L7 rule, as the loader names it."""
    base = f"spec.{direction}[{i}].toPorts[{j}]"
    if kind == "serverNames":
        return f"{base}.serverNames"
    key = "l7" if kind == "cassandra" else kind
    return f"{base}.rules.{key}[{k}]"


def section_path(direction: str, i: int) -> str:
    return f"spec.{direction}[{i}]"


# How a peer is written in each direction.
_PEER_KEYS = {
    INGRESS: ("fromEndpoints", "fromCIDR", "fromEntities"),
    EGRESS: ("toEndpoints", "toCIDR", "toEntities"),
}


def render(
    drafts: Sequence[PolicyDraft],
    *,
    counts: Mapping[str, Counts] | None = None,
    header: Sequence[str] = (),
    audit: bool = False,
) -> str:
    """Every policy as one YAML document; ``counts`` per policy name."""
    docs = []
    for n, draft in enumerate(drafts):
        lines = [f"# {line}" if line else "#" for line in header] if n == 0 else []
        lines += _policy(draft, (counts or {}).get(draft.name, NO_COUNTS), audit)
        docs.append("\n".join(lines) + "\n")
    return "---\n".join(docs)


def _policy(draft: PolicyDraft, counts: Counts, audit: bool) -> list[str]:
    who = draft.target.name
    out = [
        f"# {who}: {plural(draft.observations, 'observed request')}",
        "apiVersion: cilium.io/v2",
        "kind: CiliumNetworkPolicy",
        "metadata:",
        f"  name: {scalar(draft.name)}",
    ]
    if audit:
        out += ["  annotations:", f"    {AUDIT_ANNOTATION}: 'true'"]
    out += ["spec:", "  endpointSelector:", "    matchLabels:"]
    out += [f"      {scalar(k)}: {scalar(v)}" for k, v in draft.target.labels]
    for direction in (INGRESS, EGRESS):
        rules = draft.section(direction)
        if direction not in draft.directions:
            continue
        out.append(f"  {direction}:")
        for i, rule in enumerate(rules):
            out += _peer_rule(direction, i, rule, counts)
        if not rules:
            out += ["  # no rule can name what was seen here: every peer is denied", "  - {}"]
    return out


def _peer_rule(direction: str, i: int, rule: PeerRuleDraft, counts: Counts) -> list[str]:
    out: list[str] = []
    endpoints = [p for p in rule.peers if p.kind == "endpoint"]
    cidrs = [p for p in rule.peers if p.kind == "cidr"]
    entities = [p for p in rule.peers if p.kind == "entity"]
    k_endpoints, k_cidr, k_entities = _PEER_KEYS[direction]
    first = True

    def item(line: str) -> str:
        nonlocal first
        lead = "  - " if first else "    "
        first = False
        return lead + line

    l4 = counts.alone.get(section_path(direction, i), 0)
    if l4:
        out.append(f"  # {plural(l4, 'connection')} seen at L3/L4 only")
    if endpoints:
        out.append(item(f"{k_endpoints}:"))
        for peer in endpoints:
            out.append("    - matchLabels:")
            out += [f"        {scalar(k)}: {scalar(v)}" for k, v in peer.labels]
    if cidrs:
        out.append(item(f"{k_cidr}:"))
        out += [f"    - {scalar(p.value)}" for p in cidrs]
    if entities:
        out.append(item(f"{k_entities}:"))
        out += [f"    - {scalar(p.value)}" for p in entities]
    out.append(item("toPorts:"))
    for j, port in enumerate(rule.ports):
        out += _port(direction, i, j, port, counts)
    return out


def _port(direction: str, i: int, j: int, port: PortDraft, counts: Counts) -> list[str]:
    out = []
    if not port.has_l7_rules:
        out += [
            "    # only connections were seen on this port, no request was parsed:",
            "    # without L7 rules this allows every request (review)",
        ]
    out += [
        "    - ports:",
        f"      - port: {scalar(str(port.port))}",
        f"        protocol: {port.transport}",
    ]
    if port.server_names:
        path = rule_path(direction, i, j, "serverNames")
        out.append(f"      # {counts.text(path)}")
        out.append("      serverNames:")
        out += [f"      - {scalar(name)}" for name in port.server_names]
    kinds = [("http", port.http), ("grpc", port.grpc), ("kafka", port.kafka)]
    if not any(rules for _, rules in kinds) and not port.cassandra:
        return out
    out.append("      rules:")
    for kind, rules in kinds:
        if rules:
            out.append(f"        {kind}:")
            paths = [rule_path(direction, i, j, kind, k) for k in range(len(rules))]
            out += _rules(rules, paths, counts)
    if port.cassandra:
        out += ["        l7proto: cassandra", "        l7:"]
        paths = [rule_path(direction, i, j, "cassandra", k) for k in range(len(port.cassandra))]
        out += _rules(port.cassandra, paths, counts)
    return out


def _rules(rules: Sequence[RuleDraft], paths: Sequence[str], counts: Counts) -> list[str]:
    out = []
    for rule, path in zip(rules, paths, strict=True):
        note = counts.text(path)
        if rule.examples:
            note += ", e.g. " + ", ".join(rule.examples)
        out.append(f"        # {note}")
        for n, (key, value) in enumerate(rule.fields):
            lead = "        - " if n == 0 else "          "
            out.append(f"{lead}{key}: {scalar(value)}")
    return out


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def describe_peers(peers: Sequence[PeerKey]) -> str:
    return ", ".join(
        ",".join(f"{k}={v}" for k, v in p.labels) if p.kind == "endpoint" else p.value
        for p in peers
    )
