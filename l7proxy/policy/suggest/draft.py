"""Observations -> suggested policies (plain data, before they are written out).

One policy per local endpoint: ``ingress`` from what it received, and with
``egress`` in the selection, ``egress`` from what it sent. Its rules name each
peer as narrowly as the flow log knows it: an endpoint by all of its labels (its
identity) but those that change with every roll-out (``pod-template-hash``...),
the host as the ``host`` entity, a prefix some policy named as that CIDR, and
outside addresses as ``/32`` CIDRs, or as the ``world`` entity once more than
``max_cidrs`` of them were seen. Per port, the L7 rules are built from what each
peer asked; peers that asked for the same rules share one element.

L7 rules per protocol:

* HTTP: method and path, the paths generalised by ``paths.generalise``.
* gRPC: service and method, exact.
* Kafka: ``role: produce`` for the topics produced to, ``role: consume`` for those
  fetched from (each role also covers the metadata, coordinator and group calls
  its clients make); any other API by ``apiKey``. Topics are exact, or a
  ``topicPrefix`` ending at a ``.``, ``-`` or ``_`` once ``min_samples`` distinct
  topics share it. The rules are then judged by the Kafka rule code itself, and a
  request they do not cover gets a rule of its own.
* CQL: ``query_action`` and ``query_table`` (exact).
* TLS: ``serverNames``, the names seen.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.model import EGRESS, INGRESS
from l7proxy.policy.rules.kafka import ROLES, KafkaRule, allowed
from l7proxy.policy.rules.kafka import compile_rule as compile_kafka_rule
from l7proxy.policy.suggest.observed import Labels, Observation, Peer, Target
from l7proxy.policy.suggest.paths import Bounds, escape, generalise
from parsers.kafka.apis import ApiKey, policy_name
from parsers.requests import (
    CqlRequest,
    GrpcCall,
    HttpRequest,
    KafkaRequest,
    TlsClientHello,
)

_GRPC_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KAFKA_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_TOPIC_SEPARATORS = ".-_"
# Labels that change with every roll-out of the same workload (Kubernetes writes
# them on pods): a selector naming them would stop matching the next pods.
VOLATILE_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "controller-uid",
        "batch.kubernetes.io/controller-uid",
    }
)
# APIs only a consumer sends (Fetch, ListOffsets, offsets, groups).
_CONSUMER_ONLY = ROLES["consume"] - ROLES["produce"]


class SuggestError(Exception):
    """The data cannot be written as a policy within the bounds given."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on a suggestion: how general (``bounds``), how many outside addresses
    are named before ``world`` stands for them, how many paths one method may have."""

    bounds: Bounds = Bounds()
    max_cidrs: int = 16
    max_paths: int = 200


@dataclass(frozen=True, slots=True)
class RuleDraft:
    """One L7 rule: its YAML fields in order, and what it came from (for comments)."""

    fields: tuple[tuple[str, str], ...]
    examples: tuple[str, ...] = ()


@dataclass(slots=True)
class PortDraft:
    port: int
    transport: str
    http: list[RuleDraft] = field(default_factory=list)
    grpc: list[RuleDraft] = field(default_factory=list)
    kafka: list[RuleDraft] = field(default_factory=list)
    cassandra: list[RuleDraft] = field(default_factory=list)
    server_names: list[str] = field(default_factory=list)
    requests_seen: bool = False  # L7 requests were seen here, not only connections

    @property
    def has_l7_rules(self) -> bool:
        return bool(self.http or self.grpc or self.kafka or self.cassandra or self.server_names)

    def signature(self) -> tuple[object, ...]:
        """What the rule says, so peers asking the same things can share it."""
        return (
            self.port,
            self.transport,
            tuple(r.fields for r in self.http),
            tuple(r.fields for r in self.grpc),
            tuple(r.fields for r in self.kafka),
            tuple(r.fields for r in self.cassandra),
            tuple(self.server_names),
        )


@dataclass(frozen=True, slots=True, order=True)
class PeerKey:
    """How a policy names one peer: ``endpoint`` labels, an ``entity`` or a ``cidr``."""

    kind: str
    labels: Labels = ()
    value: str = ""


@dataclass(slots=True)
class PeerRuleDraft:
    """One element of ``ingress`` or ``egress``: peers and what they may ask."""

    peers: list[PeerKey]
    ports: list[PortDraft]


@dataclass(slots=True)
class PolicyDraft:
    name: str
    target: Target
    ingress: list[PeerRuleDraft]
    egress: list[PeerRuleDraft]
    observations: int
    directions: frozenset[str]  # those observed: each gets a section, maybe deny-all

    def section(self, direction: str) -> list[PeerRuleDraft]:
        return self.ingress if direction == INGRESS else self.egress


# ----------------------------------------------------------------------------- policies


def draft_policies(
    observed: Mapping[Observation, int], limits: Limits, name_prefix: str = "suggested"
) -> list[PolicyDraft]:
    # A policy selects by labels: endpoints that share them (one endpoint under two
    # names, a firewall restarted with another upstream) share one policy.
    by_labels: dict[Labels, dict[Observation, int]] = defaultdict(dict)
    targets: dict[Labels, Target] = {}
    for obs, n in observed.items():
        labels = selector_labels(obs.target.labels)
        by_labels[labels][obs] = n
        targets.setdefault(labels, Target(obs.target.name, labels))
    drafts: list[PolicyDraft] = []
    names: set[str] = set()
    for labels in sorted(by_labels, key=lambda ls: (targets[ls].name, ls)):
        seen, target = by_labels[labels], targets[labels]
        name = _unique(f"{name_prefix}-{_slug(target)}", names)
        ingress = _peer_rules({o: n for o, n in seen.items() if o.direction == INGRESS}, limits)
        egress = _peer_rules({o: n for o, n in seen.items() if o.direction == EGRESS}, limits)
        directions = frozenset(o.direction for o in seen)
        drafts.append(PolicyDraft(name, target, ingress, egress, sum(seen.values()), directions))
    return drafts


def selector_labels(labels: Labels) -> Labels:
    """The labels a selector names: all of them but the volatile ones."""
    return tuple((k, v) for k, v in labels if k not in VOLATILE_LABELS)


def peer_keys(observations: Iterable[Observation], max_cidrs: int) -> dict[Peer, PeerKey]:
    """How each peer is named, for one target and direction (outside addresses depend
    on how many)."""
    peers = set(o.peer for o in observations)
    world = {p.ip for p in peers if p.kind == "world"}
    keys = {}
    for peer in peers:
        if peer.kind == "endpoint":
            keys[peer] = PeerKey("endpoint", selector_labels(peer.labels))
        elif peer.kind == "host":
            keys[peer] = PeerKey("entity", value="host")
        elif peer.kind == "cidr":
            keys[peer] = PeerKey("cidr", value=peer.cidr)
        elif len(world) <= max_cidrs and peer.ip:
            keys[peer] = PeerKey("cidr", value=f"{peer.ip}/32")
        else:
            keys[peer] = PeerKey("entity", value="world")
    return keys


def _peer_rules(observed: Mapping[Observation, int], limits: Limits) -> list[PeerRuleDraft]:
    keys = peer_keys(observed, limits.max_cidrs)
    grouped: dict[tuple[int, str], dict[PeerKey, dict[Observation, int]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for obs, n in observed.items():
        grouped[(obs.port, obs.transport)][keys[obs.peer]][obs] = n
    # (peer set) -> ports, each port drafted once per distinct rule set
    by_peers: dict[tuple[PeerKey, ...], list[PortDraft]] = defaultdict(list)
    for (port, transport), by_peer in sorted(grouped.items()):
        shared: dict[tuple[object, ...], tuple[list[PeerKey], PortDraft]] = {}
        for peer in sorted(by_peer, key=_peer_order):
            draft = port_draft(port, transport, by_peer[peer], limits, peer)
            if draft.requests_seen and not draft.has_l7_rules:
                # No rule can name what was asked (a topic no Kafka rule may hold, a
                # ClientHello without a name): a port rule without L7 rules would
                # allow every request, so there is none, and the replay reports them.
                continue
            entry = shared.setdefault(draft.signature(), ([], draft))
            entry[0].append(peer)
        for peers, draft in shared.values():
            by_peers[tuple(peers)].append(draft)
    ordered = sorted(by_peers.items(), key=lambda kv: [_peer_order(p) for p in kv[0]])
    return [PeerRuleDraft(list(peers), ports) for peers, ports in ordered]


_KIND_ORDER = {"endpoint": 0, "entity": 1, "cidr": 2}


def _peer_order(peer: PeerKey) -> tuple[int, PeerKey]:
    """Endpoints first, then entities, then addresses: the order a reader expects."""
    return _KIND_ORDER[peer.kind], peer


def port_draft(
    port: int,
    transport: str,
    observed: Mapping[Observation, int],
    limits: Limits,
    peer: PeerKey,
) -> PortDraft:
    counted = [(o.request, n) for o, n in observed.items() if o.request is not None]
    requests = [r for r, _ in counted]
    draft = PortDraft(port, transport, requests_seen=bool(requests))
    families = {r.family for r in requests}
    if len(families) > 1 or ("tls" in families and transport != "TCP"):
        raise SuggestError(
            f"port {port}: {', '.join(sorted(families))} requests seen on one port from "
            f"{describe_peer(peer)}; a port is parsed as one protocol"
        )
    http = [(r, n) for r, n in counted if isinstance(r, HttpRequest)]
    grpc = [r for r in requests if isinstance(r, GrpcCall)]
    kafka = [r for r in requests if isinstance(r, KafkaRequest)]
    cql = [r for r in requests if isinstance(r, CqlRequest)]
    tls = [r for r in requests if isinstance(r, TlsClientHello)]
    draft.http = http_rules(http, limits, f"port {port} from {describe_peer(peer)}")
    draft.grpc = grpc_rules(grpc)
    draft.kafka = kafka_rules(kafka, limits.bounds)
    draft.cassandra = cql_rules(cql)
    draft.server_names = sorted({r.sni for r in tls if r.sni})
    return draft


# ----------------------------------------------------------------------------- per protocol


def http_rules(
    requests: Sequence[tuple[HttpRequest, int]], limits: Limits, where: str
) -> list[RuleDraft]:
    by_method: dict[str, Counter[str]] = defaultdict(Counter)
    for r, n in requests:
        by_method[r.method][r.path] += n
    rules = []
    for method in sorted(by_method):
        patterns = generalise(by_method[method], limits.bounds)
        if len(patterns) > limits.max_paths:
            raise SuggestError(
                f"{where}: {method} has {len(patterns)} distinct paths after generalising "
                f"(--max-paths {limits.max_paths}); the data shows no variable segment that "
                "would fold them (--min-samples, --max-literals), or narrow the records "
                "(--since, --endpoint)"
            )
        for p in patterns:
            examples = () if p.literal else p.targets[:3]
            rules.append(RuleDraft((("method", escape(method)), ("path", p.regex)), examples))
    return rules


def grpc_rules(calls: Sequence[GrpcCall]) -> list[RuleDraft]:
    seen = sorted({(c.service, c.method) for c in calls})
    return [
        RuleDraft(
            (
                ("service", _grpc_name(service, _GRPC_SERVICE)),
                ("method", _grpc_name(method, _GRPC_METHOD)),
            )
        )
        for service, method in seen
    ]


def _grpc_name(name: str, exact: re.Pattern[str]) -> str:
    """An exact name as the gRPC rule reads one, or, for a name that is not a protobuf
    identifier, a regex matching only it (the rule treats metacharacters as a regex)."""
    if exact.fullmatch(name):
        return name
    return f"(?:{escape(name)})"


def cql_rules(requests: Sequence[CqlRequest]) -> list[RuleDraft]:
    seen = sorted({(r.action, r.table) for r in requests})
    return [
        RuleDraft(
            (("query_action", action), ("query_table", escape(table)))
            if table
            else (("query_action", action),)
        )
        for action, table in seen
    ]


def topic_groups(topics: Iterable[str], min_samples: int) -> list[tuple[str, str]]:
    """("topic" | "topicPrefix", value) covering ``topics``: the longest prefix that ends
    at a separator and is shared by ``min_samples`` distinct topics, first."""
    left = set(topics)
    out: list[tuple[str, str]] = []
    while min_samples and len(left) >= min_samples:
        sharing: dict[str, set[str]] = defaultdict(set)
        for topic in left:
            for i, char in enumerate(topic[:-1]):
                if char in _TOPIC_SEPARATORS:
                    sharing[topic[: i + 1]].add(topic)
        candidates = [p for p, members in sharing.items() if len(members) >= min_samples]
        if not candidates:
            break
        prefix = max(candidates, key=lambda p: (len(p), p))
        out.append(("topicPrefix", prefix))
        left -= sharing[prefix]
    out += [("topic", t) for t in sorted(left)]
    return sorted(out, key=lambda kv: kv[1])


def kafka_rules(requests: Sequence[KafkaRequest], bounds: Bounds) -> list[RuleDraft]:
    topics_of_role: dict[str, set[str]] = {"produce": set(), "consume": set()}
    for r in requests:
        if r.api_key == ApiKey.Produce:
            topics_of_role["produce"].update(_legal(r.topics))
        elif r.api_key in _CONSUMER_ONLY:
            topics_of_role["consume"].update(_legal(r.topics))
    drafts: list[RuleDraft] = [
        RuleDraft((("role", role), group))
        for role, topics in topics_of_role.items()
        for group in topic_groups(topics, bounds.min_samples)
    ]
    # What the role rules leave out (admin APIs, metadata of other topics, a role
    # whose clients named no topic), judged by the Kafka rule code itself.
    compiled = [_compile_kafka(d) for d in drafts]
    missing_topics: dict[int, set[str]] = defaultdict(set)
    missing_any: set[int] = set()
    for r in requests:
        if allowed(compiled, r):
            continue
        if r.topics:
            missing_topics[r.api_key].update(_legal(r.topics))
        else:
            missing_any.add(r.api_key)
    for api in sorted(missing_any):
        drafts.append(RuleDraft((("apiKey", policy_name(api)),)))
    for api, topics in sorted(missing_topics.items()):
        if api in missing_any:
            continue  # the rule without a topic covers them all
        for key, value in topic_groups(topics, bounds.min_samples):
            drafts.append(RuleDraft((("apiKey", policy_name(api)), (key, value))))
    return drafts


def _legal(names: Iterable[str]) -> set[str]:
    """Names a Kafka rule can hold (a request naming any other is not covered)."""
    return {n for n in names if _KAFKA_NAME.fullmatch(n)}


def _compile_kafka(draft: RuleDraft) -> KafkaRule:
    return compile_kafka_rule(dict(draft.fields), YamlPath())


# ----------------------------------------------------------------------------- names


def describe_peer(peer: PeerKey) -> str:
    if peer.kind == "endpoint":
        return ",".join(f"{k}={v}" for k, v in peer.labels) or "any endpoint"
    return peer.value


def _slug(target: Target) -> str:
    raw = target.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", raw):
        raw = "-".join(v for _, v in target.labels) or "endpoint"
    slug = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    return (slug or "endpoint")[:48].rstrip("-")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate
