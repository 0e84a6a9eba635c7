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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from l7proxy.policy.identity import (
    HOST,
    RESERVED_IDENTITIES,
    WORLD,
    Identity,
    IdentityAllocator,
    IpCache,
)
from l7proxy.policy.model import (
    EGRESS,
    INGRESS,
    L7RuleRef,
    Peers,
    Policy,
    PortRule,
    PortTls,
    Rule,
)
from l7proxy.policy.rules import CompiledRule, any_rule_matches
from parsers.base import Decision
from parsers.requests import REQUEST_TYPES, L7Request

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


ACTIONS = ("allow", "deny", "redirect")


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One L3/L4 rule for one endpoint and direction: what the engine compiles
    for the kernel and the datapath writes to its policy map (plain data, so
    the policy never imports the datapath).

    identity 0 = any peer; protocol 0 = any; port_lo=port_hi=0 = any port;
    port_hi 0 with port_lo set = the single port port_lo; otherwise the
    inclusive range. audit on a deny turns it into a counted, reported pass.
    """

    endpoint_id: int
    direction: str  # ingress | egress
    identity: int
    protocol: int
    port_lo: int
    port_hi: int
    action: str  # allow | deny | redirect
    proxy_port: int = 0
    audit: bool = False

    def port_range(self) -> tuple[int, int]:
        if self.port_lo == 0 and self.port_hi == 0:
            return 0, 65535
        return self.port_lo, self.port_hi or self.port_lo

    def validate(self) -> None:
        if self.direction not in (INGRESS, EGRESS):
            raise ValueError(f"direction must be ingress or egress: {self!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}: {self!r}")
        lo, hi = self.port_range()
        if not (0 <= lo <= hi <= 65535):
            raise ValueError(f"bad port range {self.port_lo}-{self.port_hi}: {self!r}")
        if not (0 <= self.protocol <= 255):
            raise ValueError(f"bad protocol: {self!r}")
        if self.action == "redirect" and not (0 < self.proxy_port <= 65535):
            raise ValueError(f"redirect needs a proxy port: {self!r}")
        if self.endpoint_id <= 0 or self.identity < 0:
            raise ValueError(f"bad endpoint or identity: {self!r}")


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
    # The TLS the proxy speaks on this port (the first allowing rule that names any).
    tls: PortTls | None = None


@dataclass(frozen=True, slots=True)
class Judge:
    """One L7 rule on a port, with the decision it gives when it matches."""

    policy: str
    ref: L7RuleRef
    decision: Decision
    # The rule's ``matches``, bound once: a request judged without a trace costs
    # one call per rule tried, not two.
    matches: Callable[[Any], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matches", self.ref.rule.matches)

    def __reduce__(self) -> tuple[type[Judge], tuple[Any, ...]]:
        # (Pickled for the workers: a rule's ``matches`` may be a closure, bound again.)
        return Judge, (self.policy, self.ref, self.decision)

    def hit(self, verb: str, request: L7Request, trace: list[str] | None) -> bool:
        rule = self.ref.rule
        hit = rule.matches(request)
        if trace is not None:
            trace.append(
                f"  {verb} {self.policy} {self.ref.path} [{rule.describe()}]: "
                f"{'MATCH' if hit else 'no match'} ({rule.explain(request)})"
            )
        return hit


@dataclass(frozen=True, slots=True)
class JointAllow:
    """The allow rules of one kind whose own ``combine`` may allow a request that no
    single rule allows (Kafka: every topic allowed, each by some rule)."""

    combine: Callable[[Sequence[CompiledRule[Any]], Any], bool]
    rules: tuple[CompiledRule[Any], ...]
    paths: str  # "path + path", for the decision and the trace


@dataclass(frozen=True, slots=True)
class TypedRules:
    """The L7 rules of one port that judge one request type, in policy order."""

    denies: tuple[Judge, ...] = ()
    allows: tuple[Judge, ...] = ()
    joint: tuple[JointAllow, ...] = ()
    # For traces: the port's rules that judge other request types, in words.
    skipped: str = ""


NO_RULES = TypedRules()


@dataclass(frozen=True, slots=True)
class PortMatcher:
    """L7 rules for one (endpoint, direction, peer, port), with every possible
    decision built in advance: deciding a request allocates nothing unless a
    rule edits headers. The rules are sorted by the request type they judge
    (each kind declares its types), so a request meets only rules written for
    it. The same loop records a trace when asked to."""

    by_type: Mapping[type, TypedRules] = field(default_factory=dict)
    allow_all: Decision | None = None
    allow_all_note: str = ""
    default: Decision = Decision(False, reason="no L7 rule matches")
    first_policy: str = ""
    # ``decide`` without a trace, per request type, made for its rules (``_decider``):
    # what a connection calls for each request. A type whose rules need the whole loop
    # (header edits, joint rules) has none.
    deciders: Mapping[type, Callable[[Any], Decision]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        deciders = {}
        for request_type in (*REQUEST_TYPES, *self.by_type):
            rules = self.by_type.get(request_type, NO_RULES)
            decider = _decider(rules, self.allow_all, self.default)
            if decider is not None:
                deciders[request_type] = decider
        object.__setattr__(self, "deciders", deciders)

    def __reduce__(self) -> tuple[type[PortMatcher], tuple[Any, ...]]:
        # (Pickled for the workers: the deciders are closures, made again.)
        return PortMatcher, (
            self.by_type,
            self.allow_all,
            self.allow_all_note,
            self.default,
            self.first_policy,
        )

    def decide(self, request: L7Request, trace: list[str] | None = None) -> Decision:
        if trace is None:
            decider = self.deciders.get(type(request))
            if decider is not None:
                return decider(request)
        rules = self.by_type.get(type(request), NO_RULES)
        if trace is not None and rules.skipped:
            trace.append(rules.skipped)
        for judge in rules.denies:  # deny wins
            if judge.matches(request) if trace is None else judge.hit("deny", request, trace):
                return judge.decision
        if self.allow_all is not None:
            if trace is not None and self.allow_all_note:
                trace.append(self.allow_all_note)
            return self.allow_all
        for judge in rules.allows:
            if judge.matches(request) if trace is None else judge.hit("allow", request, trace):
                edits = judge.ref.rule.edits(request)
                return replace(judge.decision, edits=edits) if edits else judge.decision
        # No single rule allows it; a kind with its own combine rule may, jointly.
        for joint in rules.joint:
            if joint.combine(joint.rules, request):
                if trace is not None:
                    trace.append(f"  allow: covered jointly by {joint.paths}")
                return Decision(
                    True,
                    policy=self.first_policy,
                    rule=joint.paths,
                    reason="allowed jointly by several rules",
                )
        return self.default


def _decider(
    rules: TypedRules, allow_all: Decision | None, default: Decision
) -> Callable[[Any], Decision] | None:
    """``PortMatcher.decide`` for requests of one type, without a trace: the rules
    tried in its order (every deny, then, unless all is allowed, every allow), the
    first that matches giving its decision. None when a rule may edit headers or
    rules may allow jointly: ``decide``'s loop answers those."""
    if rules.joint or any(j.ref.rule.may_edit for j in rules.allows):
        return None
    tried = tuple((j.matches, j.decision) for j in rules.denies)
    if allow_all is None:
        tried += tuple((j.matches, j.decision) for j in rules.allows)
    otherwise = allow_all if allow_all is not None else default
    if not tried:
        return lambda request: otherwise
    if len(tried) == 1:
        ((test, hit),) = tried
        return lambda request: hit if test(request) else otherwise

    def first_match(request: Any) -> Decision:
        for test, hit in tried:
            if test(request):
                return hit
        return otherwise

    return first_match


def _typed_rules(request_type: type, denies: list[Judge], allows: list[Judge]) -> TypedRules:
    """The rules of ``denies`` and ``allows`` whose kind judges ``request_type``."""

    def judges(judge: Judge) -> bool:
        return request_type in judge.ref.kind.request_types

    mine_allows = [j for j in allows if judges(j)]
    by_kind: dict[str, list[Judge]] = {}
    for judge in mine_allows:
        by_kind.setdefault(judge.ref.kind.key, []).append(judge)
    # Rules one by one were tried already: only a kind's own combine rule adds anything.
    joint = tuple(
        JointAllow(
            group[0].ref.kind.combine,
            tuple(j.ref.rule for j in group),
            " + ".join(j.ref.path for j in group),
        )
        for group in by_kind.values()
        if group[0].ref.kind.combine is not any_rule_matches
    )
    others = sorted({j.ref.kind.key for j in (*denies, *allows) if not judges(j)})
    skipped = ""
    if others:
        skipped = (
            f"  {', '.join(others)} rules on this port do not judge "
            f"{request_type.__name__} requests: skipped"
        )
    return TypedRules(
        denies=tuple(j for j in denies if judges(j)),
        allows=tuple(mine_allows),
        joint=joint,
        skipped=skipped,
    )


# Connection shapes (legs and port) whose L4 verdict is remembered per revision.
MAX_REMEMBERED_CONNECTION_VERDICTS = 65536


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
    _matchers: dict[tuple[int, str, int, int], PortMatcher] = field(
        default_factory=dict, repr=False
    )
    _connection_verdicts: dict[
        tuple[tuple[tuple[int, str, int], ...], int], tuple[PortVerdict, str | None]
    ] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ L3/L4

    def connection_verdict(
        self, legs: tuple[tuple[int, str, int], ...], port: int
    ) -> tuple[PortVerdict, str | None]:
        """The L4 verdict on a TCP connection to ``port`` and the parser its L7 rules
        name, given the legs that apply, each (endpoint id, direction, peer identity):
        a denial on either leg wins, then an audit. Asked once per accepted
        connection, so it is remembered per policy revision: a burst of connections
        costs a lookup each (bounded: peers are identities, not addresses)."""
        key = (legs, port)
        known = self._connection_verdicts.get(key)
        if known is not None:
            return known
        verdicts = [self.port_verdict(ep, direction, peer, port) for ep, direction, peer in legs]
        denied = [v for v in verdicts if not v.allowed]
        if denied:
            known = denied[0], None
        else:
            parser = next((v.parser for v in verdicts if v.parser), None)
            chosen = next((v for v in verdicts if v.audit), verdicts[0])
            # Either leg may be the one that says the proxy terminates TLS here.
            tls = next((v.tls for v in verdicts if v.tls is not None), None)
            if tls is not chosen.tls:
                chosen = replace(chosen, tls=tls)
            known = chosen, parser
        if len(self._connection_verdicts) >= MAX_REMEMBERED_CONNECTION_VERDICTS:
            self._connection_verdicts.clear()
        self._connection_verdicts[key] = known
        return known

    def port_verdict(
        self,
        endpoint_id: int,
        direction: str,
        peer: int,
        port: int,
        protocol: str = "TCP",
        trace: list[str] | None = None,
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
        tls: PortTls | None = None
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
                if tls is None and pr.tls is not None:
                    tls = pr.tls
        if not allowed_by:
            audit = self.audit_all or dp.audit
            return PortVerdict(
                audit, None, "default deny: no rule allows this peer and port", audit
            )
        return PortVerdict(True, parser, f"allowed by {', '.join(allowed_by)}", tls=tls)

    # ------------------------------------------------------------------ L7

    def l7_decide(
        self,
        endpoint_id: int,
        direction: str,
        peer: int,
        port: int,
        request: L7Request,
        trace: list[str] | None = None,
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
        denies: list[Judge] = []
        for eff in dp.rules:
            if eff.rule.deny and eff.peer_matches(peer):
                for pr in eff.rule.to_ports:
                    if pr.covers(port, "TCP") and pr.parser is not None:
                        denies += [
                            Judge(
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
        allows: list[Judge] = []
        allow_all = None
        note = ""
        first_policy = None
        for eff in dp.rules:
            if eff.rule.deny or not eff.peer_matches(peer):
                continue
            # None stands for "all ports" (a rule without toPorts).
            port_rules: list[PortRule | None] = (
                [None]
                if not eff.rule.to_ports
                else [pr for pr in eff.rule.to_ports if pr.covers(port, "TCP")]
            )
            for port_rule in port_rules:
                first_policy = first_policy or eff.policy
                if port_rule is None or not port_rule.l7:
                    if allow_all is None:
                        where = eff.rule.path if port_rule is None else port_rule.path
                        allow_all = Decision(
                            True, policy=eff.policy.key, rule=where, reason="L4 rule allows all L7"
                        )
                        note = (
                            f"  allow {eff.policy.key} {where}: no L7 rules -> all requests allowed"
                        )
                    continue
                allows += [
                    Judge(
                        eff.policy.key,
                        ref,
                        Decision(
                            True,
                            policy=eff.policy.key,
                            rule=ref.path,
                            reason=f"allowed by {ref.rule.describe()}",
                        ),
                    )
                    for ref in port_rule.l7
                ]
        reason = "no L7 rule matches" if first_policy else "no rule allows this peer and port"
        return PortMatcher(
            by_type={t: _typed_rules(t, denies, allows) for t in REQUEST_TYPES},
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

    def parser_families(self) -> set[str]:
        """The L7 parser families some enforced rule names (``http``, ``kafka``, ...)."""
        return {
            pr.parser
            for dp in self.directions.values()
            for eff in dp.rules
            for pr in eff.rule.to_ports
            if pr.parser is not None
        }

    def kernel_entries(self, proxy_ports: dict[str, int]) -> list[PolicyEntry]:
        out: list[PolicyEntry] = []
        for (ep_id, direction), dp in self.directions.items():
            if not dp.enforced:
                continue
            for eff in dp.rules:
                peer_ids = [0] if eff.peer_ids is None else sorted(eff.peer_ids)
                audit = self.audit_all or eff.policy.audit
                # (protocol, first port, last port, parser family or None)
                ports: list[tuple[int, int, int, str | None]]
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
                                    PolicyEntry(
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
                                PolicyEntry(ep_id, direction, peer, proto, lo, hi, "deny", 0, audit)
                            )
                        elif parser is not None:
                            out.append(
                                PolicyEntry(
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
                                PolicyEntry(
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
    remote_identities: Iterable[Identity] = (),
    remote_ipcache: Mapping[ipaddress.IPv4Network, int] | None = None,
) -> CompiledPolicy:
    """``remote_identities`` and ``remote_ipcache`` are what other nodes hold (cluster
    mode, from etcd): peer selectors match those identities too, and traffic from
    their addresses carries them. Local endpoints win where both name an address."""
    policies = tuple(policies)
    by_id = {ep.id: ep for ep in endpoints}
    # CIDR identities for every prefix that a policy names (and its excepts).
    cidr_ids: dict[ipaddress.IPv4Network, Identity] = {}
    for pol in policies:
        for rule in pol.rules:
            for c in rule.peers.cidrs:
                for net in (c.cidr, *c.excepts):
                    cidr_ids[net] = identities.for_cidr(net)
    endpoint_identities = {ep.identity.number: ep.identity for ep in by_id.values()}
    all_identities = {i.number: i for i in remote_identities}
    all_identities.update(endpoint_identities)
    all_identities.update({i.number: i for i in cidr_ids.values()})
    all_identities.update(RESERVED_IDENTITIES)

    directions: dict[tuple[int, str], DirectionPolicy] = {}
    for ep in by_id.values():
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
    ipcache.update(remote_ipcache or {})
    for ep in by_id.values():
        if ep.ip is not None:
            ipcache[ipaddress.IPv4Network(f"{ep.ip}/32")] = ep.identity.number
    return CompiledPolicy(
        revision=revision,
        policies=policies,
        endpoints=by_id,
        directions=directions,
        ipcache=IpCache(ipcache),
        identities=identities,
        audit_all=audit_all,
        endpoints_by_ip={str(ep.ip): ep for ep in by_id.values() if ep.ip is not None},
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
            if ident.number == WORLD and _in_cidrs(ident, peers):
                out.add(ident.number)
        elif ident.kind == "cidr":
            if "world" in peers.entities or _in_cidrs(ident, peers):
                out.add(ident.number)
    return frozenset(out)


def _in_cidrs(ident: Identity, peers: Peers) -> bool:
    return ident.cidr is not None and any(c.contains(ident.cidr) for c in peers.cidrs)
