"""The policy in force, and what one proxied connection asks of it.

``PolicyState.current`` is swapped atomically on reload. A
``ConnectionPolicy`` re-reads it on every request, so an open connection's
next request is judged by the new policy while the connection stays open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from l7proxy.identity import Identity
from l7proxy.policy.engine import CompiledPolicy, Endpoint
from l7proxy.policy.model import EGRESS, INGRESS
from parsers.base import Decision


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a connection, as the policy sees it."""

    ip: str
    port: int
    identity: int
    endpoint: Endpoint | None

    def describe(self, identities) -> dict[str, Any]:
        ident: Identity | None = identities.get(self.identity)
        return {
            "ip": self.ip,
            "port": self.port,
            "identity": self.identity,
            "endpoint": self.endpoint.name if self.endpoint else None,
            "labels": ident.label_map if ident else {},
        }


NO_LOCAL_ENDPOINT = Decision(True, reason="no local endpoint on either side")


class PolicyState:
    def __init__(self, compiled: CompiledPolicy):
        self.current = compiled

    def swap(self, compiled: CompiledPolicy) -> None:
        self.current = compiled

    def side(self, ip: str, port: int, endpoint: Endpoint | None = None) -> Side:
        policy = self.current
        if endpoint is None:
            endpoint = policy.endpoints_by_ip.get(ip)
        identity = endpoint.identity.number if endpoint else policy.ipcache.lookup(ip)
        return Side(ip, port, identity, endpoint)

    def connection(self, src: Side, dst: Side) -> ConnectionPolicy:
        return ConnectionPolicy(self, src, dst)


class ConnectionPolicy:
    """Decides every request of one connection from ``src`` to ``dst``."""

    __slots__ = ("state", "src", "dst", "l4", "parser", "_policy", "_matchers")

    def __init__(self, state: PolicyState, src: Side, dst: Side):
        self.state = state
        self.src = src
        self.dst = dst
        self.l4, self.parser = self._l4()
        self._policy = None
        self._matchers: list = []

    def _l4(self):
        policy = self.state.current
        verdicts = []
        if self.dst.endpoint is not None:
            verdicts.append(policy.port_verdict(self.dst.endpoint.id, INGRESS, self.src.identity, self.dst.port))
        if self.src.endpoint is not None:
            verdicts.append(policy.port_verdict(self.src.endpoint.id, EGRESS, self.dst.identity, self.dst.port))
        denied = [v for v in verdicts if not v.allowed]
        if denied:
            return denied[0], None
        parsers = [v.parser for v in verdicts if v.parser]
        audited = [v for v in verdicts if v.audit]
        chosen = audited[0] if audited else (verdicts[0] if verdicts else None)
        return chosen, (parsers[0] if parsers else None)

    def decide(self, request: Any, trace: list | None = None) -> Decision:
        policy = self.state.current
        if trace is not None:
            return self._decide_traced(policy, request, trace)
        if policy is not self._policy:
            self._policy = policy
            self._matchers = self._current_matchers(policy)
        decision = None
        for matcher in self._matchers:
            d = matcher.decide(request)
            if not d.allowed:
                return d
            if decision is None or (d.audit and not decision.audit) or (d.edits and not decision.edits):
                decision = d
        return decision if decision is not None else NO_LOCAL_ENDPOINT

    def _current_matchers(self, policy) -> list:
        out = []
        if self.dst.endpoint is not None:
            out.append(policy.l7_matcher(self.dst.endpoint.id, INGRESS, self.src.identity, self.dst.port))
        if self.src.endpoint is not None:
            out.append(policy.l7_matcher(self.src.endpoint.id, EGRESS, self.dst.identity, self.dst.port))
        return out

    def _decide_traced(self, policy, request: Any, trace: list) -> Decision:
        decisions = []
        if self.dst.endpoint is not None:
            trace.append(f"ingress of {self.dst.endpoint.name} from identity {self.src.identity}:")
            decisions.append(policy.l7_decide(self.dst.endpoint.id, INGRESS, self.src.identity, self.dst.port, request, trace))
        if self.src.endpoint is not None:
            trace.append(f"egress of {self.src.endpoint.name} to identity {self.dst.identity}:")
            decisions.append(policy.l7_decide(self.src.endpoint.id, EGRESS, self.dst.identity, self.dst.port, request, trace))
        if not decisions:
            return NO_LOCAL_ENDPOINT
        for d in decisions:
            if not d.allowed:
                return d
        return next((d for d in decisions if d.audit), None) or next((d for d in decisions if d.edits), decisions[0])

    __call__ = decide
