"""The CiliumNetworkPolicy model: frozen dataclasses, built only by ``load``.

Only what the loader has validated can exist here, so the engine never
re-checks shapes. Selectors and CIDRs are plain values; L7 rules are
already compiled (``CompiledRule``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from l7proxy.policy.rules import CompiledRule, L7Kind

INGRESS = "ingress"
EGRESS = "egress"

# Cilium's reserved entity names that this node understands.
ENTITIES = ("world", "host", "all", "cluster")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        present = labels.get(self.key)
        if self.operator == "In":
            return present is not None and present in self.values
        return present is None or present not in self.values  # NotIn


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes label selector. The empty selector matches every endpoint."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.match_expressions)

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        parts += [f"{r.key} {r.operator} {sorted(r.values)}" for r in self.match_expressions]
        return "{" + ", ".join(parts) + "}" if parts else "{}"


@dataclass(frozen=True, slots=True)
class CidrRule:
    cidr: ipaddress.IPv4Network
    excepts: tuple[ipaddress.IPv4Network, ...] = ()

    def contains(self, net: ipaddress.IPv4Network) -> bool:
        if not net.subnet_of(self.cidr):
            return False
        return not any(net.subnet_of(ex) for ex in self.excepts)


@dataclass(frozen=True, slots=True)
class Peers:
    """Who the remote side may be. ``any_peer`` means no L3 restriction was written."""

    endpoints: tuple[LabelSelector, ...] = ()
    cidrs: tuple[CidrRule, ...] = ()
    entities: tuple[str, ...] = ()

    @property
    def any_peer(self) -> bool:
        return not (self.endpoints or self.cidrs or self.entities)


@dataclass(frozen=True, slots=True)
class PortProtocol:
    port: int  # 0 = any port
    end_port: int  # inclusive; == port for a single port
    protocol: str  # TCP | UDP | ANY

    def covers(self, port: int, protocol: str) -> bool:
        if self.protocol != "ANY" and self.protocol != protocol:
            return False
        return self.port == 0 or self.port <= port <= self.end_port

    def __str__(self) -> str:
        ports = (
            "*"
            if self.port == 0
            else str(self.port)
            if self.end_port == self.port
            else f"{self.port}-{self.end_port}"
        )
        return f"{ports}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class L7RuleRef:
    """One compiled L7 rule, with where it came from (for traces and flow logs)."""

    kind: L7Kind[Any, Any]  # http, grpc, kafka, cassandra...: which requests it judges
    rule: CompiledRule[Any]
    path: str  # YAML path, e.g. spec.ingress[0].toPorts[0].rules.http[1]


# The items a TLS secret holds when a policy names none (Cilium's, and a
# Kubernetes ``kubernetes.io/tls`` Secret's keys).
DEFAULT_CERTIFICATE = "tls.crt"
DEFAULT_PRIVATE_KEY = "tls.key"
DEFAULT_TRUSTED_CA = "ca.crt"


@dataclass(frozen=True, slots=True)
class TlsContextRef:
    """``toPorts[].terminatingTLS`` / ``originatingTLS``: Cilium's ``TLSContext``.

    Names a secret (``namespace/name``) and the items in it. An item left out is
    Cilium's default, used if the secret has it; an item given must exist. Where
    a secret lives (a directory of files on one node, a Kubernetes Secret) is the
    proxy's business (``l7proxy/proxy/tls.py``), not the policy's."""

    namespace: str
    name: str
    certificate: str | None  # None: DEFAULT_CERTIFICATE if present
    private_key: str | None
    trusted_ca: str | None
    path: str  # YAML path, for errors about the secret's files

    @property
    def secret(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PortTls:
    """The TLS a port's proxy speaks: to the client (terminating), to the server
    (originating). Either may be None: only terminating means cleartext upstream."""

    terminating: TlsContextRef | None
    originating: TlsContextRef | None
    # ``serverNames`` on the terminated port: the ClientHello is judged before the
    # handshake (its rule is among the port's L7 rules, beside those of the cleartext).
    server_names: bool = False


@dataclass(frozen=True, slots=True)
class PortRule:
    ports: tuple[PortProtocol, ...]  # empty = all ports
    parser: str | None  # L7 parser family; None = L4 only
    l7: tuple[L7RuleRef, ...]  # empty with parser set = explicit allow-all L7
    path: str
    tls: PortTls | None = None

    def covers(self, port: int, protocol: str) -> bool:
        return not self.ports or any(p.covers(port, protocol) for p in self.ports)


@dataclass(frozen=True, slots=True)
class Rule:
    """One element of spec.ingress / egress / ingressDeny / egressDeny."""

    direction: str  # ingress | egress
    deny: bool
    peers: Peers
    to_ports: tuple[PortRule, ...]  # empty = all ports, L4 only
    path: str


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str
    selector: LabelSelector
    rules: tuple[Rule, ...]
    source: str = "<string>"
    audit: bool = False
    labels: tuple[tuple[str, str], ...] = field(default=())

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name
