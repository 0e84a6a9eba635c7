"""Policy engine: compile once, decide fast, explain on demand.

``compile_policy`` turns the loaded policies plus the node's endpoints into a
``CompiledPolicy``: the kernel's map entries (L3/L4) and, per endpoint and
direction, the effective rules with their peers resolved to identity numbers.

A proxied connection asks ``connection_policy(...)`` once; each request then
goes through ``ConnectionPolicy.decide``. The same code path, given a
``trace`` list, records why every rule matched or not: ``policy trace`` and
real traffic share one implementation.

Semantics (Cilium's):
- An endpoint selected by any policy with rules in a direction is
  default-deny in that direction.
- Deny wins over allow, at L3/L4 and at L7.
- An empty peer list matches every peer; an empty L7 list allows all L7.
- Audit (policy annotation or global flag): a would-deny is logged as AUDIT
  and allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from l7proxy.policy.identity import HOST, WORLD, Identity, IdentityAllocator, IpCache
from l7proxy.policy.model import EGRESS, INGRESS, L7RuleRef, Peers, Policy, Rule
from parsers.base import Decision

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "ANY": 0}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What the engine needs to know about a local endpoint."""

    id: int
    name: str
    identity: Identity
    ip: ipaddress.IPv4Address | None

    @property
    def labels(self) -> dict[str, str]:
        return self.identity.label_map


@dataclass(frozen=True, slots=True)
class KernelEntry:
    """One L3/L4 policy-map entry (mirrors ``datapath.PolicyEntry``)."""

    endpoint_id: int
    direction: str
    identity: int  # 0 = any peer
    protocol: int  # 0 = any
    port_lo: int
    port_hi: int
    action: str  # allow | deny | redirect
    proxy_port: int = 0
    audit: bool = False


@dataclass(frozen=True, slots=True)
class EffectiveRule:
    policy: Policy
    rule: Rule
    peer_ids: frozenset[int] | None  # None = any peer

    def peer_matches(self, identity: int) -> bool:
        return self.peer_ids is None or identity in self.peer_ids

    @property
    def name(self) -> str:
        return f"{self.policy.key} {self.rule.path}"


@dataclass(slots=True)
class DirectionPolicy:
    enforced: bool = False
    audit: bool = False  # every policy that enforces this direction is in audit mode
    rules: list[EffectiveRule] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PortVerdict:
    """L3/L4 outcome for (endpoint, direction, peer, port)."""

    allowed: bool
    parser: str | None  # L7 parser family, if any matching rule has L7 rules
    reason: str
    audit: bool = False


@dataclass(frozen=True, slots=True)
class PortMatcher:
    """L7 rules for one (endpoint, direction, peer, port), with every possible
    decision built in advance: deciding a request allocates nothing unless a
    rule edits headers. The same loop records a trace when asked to."""

    denies: tuple[tuple[str, L7RuleRef, Decision], ...] = ()
    allows: tuple[tuple[str, L7RuleRef, Decision], ...] = ()
    allow_all: Decision | None = None
    allow_all_note: str = ""
    default: Decision | None = None
    first_policy: str = ""

    def decide(self, request: Any, trace: list | None = None) -> Decision:
        for policy, ref, denied in self.denies:  # deny wins
            hit = ref.rule.matches(request)
            if trace is not None:
                trace.append(
                    f"  deny {policy} {ref.path} [{ref.rule.describe()}]: "
                    f"{'MATCH' if hit else 'no match'} ({ref.rule.explain(request)})"
                )
            if hit:
                return denied
        if self.allow_all is not None:
            if trace is not None and self.allow_all_note:
                trace.append(self.allow_all_note)
            return self.allow_all
        for policy, ref, allowed in self.allows:
            hit = ref.rule.matches(request)
            if trace is not None:
                trace.append(
                    f"  allow {policy} {ref.path} [{ref.rule.describe()}]: "
                    f"{'MATCH' if hit else 'no match'} ({ref.rule.explain(request)})"
                )
            if hit:
                edits = getattr(ref.rule, "edits", None)
                found = edits(request) if edits is not None else ()
                return replace(allowed, edits=found) if found else allowed
        # Protocol-specific coverage across several rules (Kafka: every topic of
        # a request must be allowed, possibly by different rules).
        combined = _combined_allow([ref for _, ref, _ in self.allows], request)
        if combined is not None:
            if trace is not None:
                trace.append(f"  allow: covered jointly by {combined}")
            return Decision(
                True,
                policy=self.first_policy,
                rule=combined,
                reason="allowed jointly by several rules",
            )
        return self.default


@dataclass
class CompiledPolicy:
    revision: int
    policies: tuple[Policy, ...]
    endpoints: dict[int, Endpoint]
    directions: dict[tuple[int, str], DirectionPolicy]
    ipcache: IpCache
    identities: IdentityAllocator
    audit_all: bool = False
    endpoints_by_ip: dict[str, Endpoint] = field(default_factory=dict)
    _matchers: dict[tuple, PortMatcher] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ L3/L4

    def port_verdict(
        self,
        endpoint_id: int,
        direction: str,
        peer: int,
        port: int,
        protocol: str = "TCP",
        trace: list | None = None,
    ) -> PortVerdict:
        dp = self.directions.get((endpoint_id, direction))
        if dp is None or not dp.enforced:
            if trace is not None:
                trace.append(
                    f"{direction}: no policy selects this endpoint in this direction -> allowed"
                )
            return PortVerdict(True, None, "not enforced")
        allowed_by: list[str] = []
        parser = None
        for eff in dp.rules:
            ok_peer = eff.peer_matches(peer)
            port_rules = (
                [pr for pr in eff.rule.to_ports if pr.covers(port, protocol)]
                if eff.rule.to_ports
                else None
            )
            ok_port = port_rules is None or bool(port_rules)
            if trace is not None:
                what = "deny" if eff.rule.deny else "allow"
                trace.append(
                    f"  {what} {eff.name}: peer {'matches' if ok_peer else 'does not match'}, "
                    f"port {'matches' if ok_port else 'does not match'}"
                )
            if not (ok_peer and ok_port):
                continue
            if eff.rule.deny:
                if not port_rules or all(pr.parser is None for pr in port_rules):
                    audit = self.audit_all or eff.policy.audit
                    return PortVerdict(audit, None, f"denied by {eff.name}", audit)
                # An L7 deny rule is judged per request: the port needs its parser.
                parser = next(pr.parser for pr in port_rules if pr.parser)
                continue
            allowed_by.append(eff.name)
            for pr in port_rules or ():
                if pr.parser:
                    parser = pr.parser
        if not allowed_by:
            audit = self.audit_all or dp.audit
            return PortVerdict(
                audit, None, "default deny: no rule allows this peer and port", audit
            )
        return PortVerdict(True, parser, f"allowed by {', '.join(allowed_by)}")

    # ------------------------------------------------------------------ L7

    def l7_decide(
        self,
        endpoint_id: int,
        direction: str,
        peer: int,
        port: int,
        request: Any,
        trace: list | None = None,
    ) -> Decision:
        return self.l7_matcher(endpoint_id, direction, peer, port).decide(request, trace)

    def l7_matcher(self, endpoint_id: int, direction: str, peer: int, port: int) -> PortMatcher:
        """The L7 rules that apply to one (endpoint, direction, peer, port), compiled
        once per policy revision and shared by every connection that needs them."""
        key = (endpoint_id, direction, peer, port)
        matcher = self._matchers.get(key)
        if matcher is None:
            matcher = self._matchers[key] = self._build_matcher(endpoint_id, direction, peer, port)
        return matcher

    def _build_matcher(self, endpoint_id: int, direction: str, peer: int, port: int) -> PortMatcher:
        dp = self.directions.get((endpoint_id, direction))
        if dp is None or not dp.enforced:
            return PortMatcher(
                allow_all=Decision(True, reason="no policy in this direction"),
                allow_all_note="no policy in this direction",
            )
        denies = []
        for eff in dp.rules:
            if eff.rule.deny and eff.peer_matches(peer):
                for pr in eff.rule.to_ports:
                    if pr.covers(port, "TCP") and pr.parser is not None:
                        denies += [
                            (
                                eff.policy.key,
                                ref,
                                self._deny(
                                    eff.policy,
                                    ref.path,
                                    f"denied by L7 deny rule {ref.rule.describe()}",
                                    dp,
                                ),
                            )
                            for ref in pr.l7
                        ]
        allows = []
        allow_all = None
        note = ""
        first_policy = None
        for eff in dp.rules:
            if eff.rule.deny or not eff.peer_matches(peer):
                continue
            port_rules = (
                [None]
                if not eff.rule.to_ports
                else [pr for pr in eff.rule.to_ports if pr.covers(port, "TCP")]
            )
            for pr in port_rules:
                first_policy = first_policy or eff.policy
                if pr is None or not pr.l7:
                    if allow_all is None:
                        where = eff.rule.path if pr is None else pr.path
                        allow_all = Decision(
                            True, policy=eff.policy.key, rule=where, reason="L4 rule allows all L7"
                        )
                        note = (
                            f"  allow {eff.policy.key} {where}: no L7 rules -> all requests allowed"
                        )
                    continue
                allows += [
                    (
                        eff.policy.key,
                        ref,
                        Decision(
                            True,
                            policy=eff.policy.key,
                            rule=ref.path,
                            reason=f"allowed by {ref.rule.describe()}",
                        ),
                    )
                    for ref in pr.l7
                ]
        reason = "no L7 rule matches" if first_policy else "no rule allows this peer and port"
        return PortMatcher(
            denies=tuple(denies),
            allows=tuple(allows),
            allow_all=allow_all,
            allow_all_note=note,
            default=self._deny(first_policy, "", reason, dp),
            first_policy=first_policy.key if first_policy else "",
        )

    def _deny(self, policy: Policy | None, rule: str, reason: str, dp: DirectionPolicy) -> Decision:
        key = policy.key if policy else ""
        audit = self.audit_all or (policy.audit if policy else dp.audit)
        return Decision(audit, policy=key, rule=rule, reason=reason, audit=audit)

    # ------------------------------------------------------------------ kernel

    def kernel_entries(self, proxy_ports: dict[str, int]) -> list[KernelEntry]:
        out: list[KernelEntry] = []
        for (ep_id, direction), dp in self.directions.items():
            if not dp.enforced:
                continue
            for eff in dp.rules:
                peer_ids = [0] if eff.peer_ids is None else sorted(eff.peer_ids)
                audit = self.audit_all or eff.policy.audit
                if not eff.rule.to_ports:
                    ports = [(0, 0, 0, None)]
                else:
                    ports = [
                        (PROTO_NUMBERS[p.protocol], p.port, p.end_port, pr.parser)
                        for pr in eff.rule.to_ports
                        for p in (pr.ports or ())
                    ]
                    ports += [(0, 0, 0, pr.parser) for pr in eff.rule.to_ports if not pr.ports]
                for peer in peer_ids:
                    for proto, lo, hi, parser in ports:
                        if eff.rule.deny:
                            if parser is not None:
                                # An L7 deny rule: traffic must reach the proxy to be judged.
                                out.append(
                                    KernelEntry(
                                        ep_id,
                                        direction,
                                        peer,
                                        proto,
                                        lo,
                                        hi,
                                        "redirect",
                                        proxy_ports[parser],
                                        audit,
                                    )
                                )
                                continue
                            out.append(
                                KernelEntry(ep_id, direction, peer, proto, lo, hi, "deny", 0, audit)
                            )
                        elif parser is not None:
                            out.append(
                                KernelEntry(
                                    ep_id,
                                    direction,
                                    peer,
                                    proto,
                                    lo,
                                    hi,
                                    "redirect",
                                    proxy_ports[parser],
                                    False,
                                )
                            )
                        else:
                            out.append(
                                KernelEntry(
                                    ep_id, direction, peer, proto, lo, hi, "allow", 0, False
                                )
                            )
        return sorted(
            set(out),
            key=lambda e: (e.endpoint_id, e.direction, e.identity, e.protocol, e.port_lo, e.action),
        )

    def parsers_in_use(self) -> set[str]:
        return {
            pr.parser
            for dp in self.directions.values()
            for eff in dp.rules
            for pr in eff.rule.to_ports
            if pr.parser
        }


def _combined_allow(refs: list[L7RuleRef], request: Any) -> str | None:
    by_kind: dict[str, list[L7RuleRef]] = {}
    for ref in refs:
        by_kind.setdefault(ref.kind, []).append(ref)
    from l7proxy.policy import rules as l7rules

    for kind_name, group in by_kind.items():
        kind = l7rules.kind(kind_name)
        combine = getattr(kind, "combine", None) if kind else None
        if combine is not None and combine([r.rule for r in group], request):
            return " + ".join(r.path for r in group)
    return None


# ---------------------------------------------------------------------------
# Compilation


def compile_policy(
    policies: Iterable[Policy],
    endpoints: Iterable[Endpoint],
    identities: IdentityAllocator,
    *,
    revision: int = 1,
    audit_all: bool = False,
    host_prefixes: Iterable[ipaddress.IPv4Network] = (),
) -> CompiledPolicy:
    policies = tuple(policies)
    endpoints = {ep.id: ep for ep in endpoints}
    # CIDR identities for every prefix that a policy names (and its excepts).
    cidr_ids: dict[ipaddress.IPv4Network, Identity] = {}
    for pol in policies:
        for rule in pol.rules:
            for c in rule.peers.cidrs:
                for net in (c.cidr, *c.excepts):
                    cidr_ids[net] = identities.for_cidr(net)
    endpoint_identities = {ep.identity.number: ep.identity for ep in endpoints.values()}
    all_identities = {**endpoint_identities, **{i.number: i for i in cidr_ids.values()}}
    from l7proxy.policy.identity import RESERVED_IDENTITIES

    all_identities.update(RESERVED_IDENTITIES)

    directions: dict[tuple[int, str], DirectionPolicy] = {}
    for ep in endpoints.values():
        for direction in (INGRESS, EGRESS):
            directions[(ep.id, direction)] = DirectionPolicy()
        for pol in policies:
            if not pol.selector.matches(ep.labels):
                continue
            for rule in pol.rules:
                dp = directions[(ep.id, rule.direction)]
                if not dp.enforced:
                    dp.enforced, dp.audit = True, True
                dp.audit = dp.audit and pol.audit
                if not rule.to_ports and rule.peers.any_peer:
                    continue  # `ingress: [{}]`: default-deny, allows nothing
                dp.rules.append(
                    EffectiveRule(pol, rule, _resolve_peers(rule.peers, all_identities))
                )

    ipcache: dict[ipaddress.IPv4Network, int] = {net: HOST for net in host_prefixes}
    ipcache.update({net: ident.number for net, ident in cidr_ids.items() if net.prefixlen})
    for ep in endpoints.values():
        if ep.ip is not None:
            ipcache[ipaddress.IPv4Network(f"{ep.ip}/32")] = ep.identity.number
    return CompiledPolicy(
        revision=revision,
        policies=policies,
        endpoints=endpoints,
        directions=directions,
        ipcache=IpCache(ipcache),
        identities=identities,
        audit_all=audit_all,
        endpoints_by_ip={str(ep.ip): ep for ep in endpoints.values() if ep.ip is not None},
    )


def _resolve_peers(peers: Peers, identities: dict[int, Identity]) -> frozenset[int] | None:
    if peers.any_peer or "all" in peers.entities:
        return None
    out: set[int] = set()
    for ident in identities.values():
        if ident.kind == "endpoint":
            if any(sel.matches(ident.label_map) for sel in peers.endpoints):
                out.add(ident.number)
            if "cluster" in peers.entities:
                out.add(ident.number)
        elif ident.kind == "reserved":
            name = "host" if ident.number == HOST else "world"
            if name in peers.entities or (name == "host" and "cluster" in peers.entities):
                out.add(ident.number)
            # Selectors naming reserved labels (reserved:host) select reserved identities.
            if any(sel.match_labels and sel.matches(ident.label_map) for sel in peers.endpoints):
                out.add(ident.number)
            if ident.number == WORLD and any(c.contains(ident.cidr) for c in peers.cidrs):
                out.add(ident.number)
        elif ident.kind == "cidr":
            if "world" in peers.entities or any(c.contains(ident.cidr) for c in peers.cidrs):
                out.add(ident.number)
    return frozenset(out)
