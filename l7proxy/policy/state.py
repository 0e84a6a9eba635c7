"""The policy in force, and what one proxied connection asks of it.

``PolicyState.current`` is swapped atomically on reload. A
``ConnectionPolicy`` re-reads it on every request, so an open connection's
next request is judged by the new policy while the connection stays open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from l7proxy.policy.engine import CompiledPolicy, Endpoint, PortMatcher, PortVerdict
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.model import EGRESS, INGRESS, PortTls
from parsers.base import Decision
from parsers.registry import preload_engines
from parsers.requests import L7Request

# One direction that applies to a connection: (endpoint id, direction, peer identity).
Leg = tuple[int, str, int]


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a connection, as the policy sees it."""

    ip: str
    port: int
    identity: int
    endpoint: Endpoint | None

    def describe(self, identities: IdentityAllocator) -> dict[str, Any]:
        ident = identities.get(self.identity)
        return {
            "ip": self.ip,
            "port": self.port,
            "identity": self.identity,
            "endpoint": self.endpoint.name if self.endpoint else None,
            "labels": ident.label_map if ident else {},
        }


NO_LOCAL_ENDPOINT = Decision(True, reason="no local endpoint on either side")
NO_LOCAL_ENDPOINT_L4 = PortVerdict(True, None, "no local endpoint on either side")


class PolicyState:
    def __init__(self, compiled: CompiledPolicy):
        preload_engines(compiled.parser_families())
        self.current = compiled

    def swap(self, compiled: CompiledPolicy) -> None:
        # The engines the new revision's ports name are imported now, not by the
        # first connection that needs one: an import holds the event loop for a few
        # hundred milliseconds (every connection waits).
        preload_engines(compiled.parser_families())
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

    __slots__ = (
        "state",
        "src",
        "dst",
        "l4",
        "parser",
        "_policy",
        "_matchers",
        "_deciders",
        "_last_request",
        "_last_decision",
    )

    def __init__(self, state: PolicyState, src: Side, dst: Side):
        self.state = state
        self.src = src
        self.dst = dst
        self.l4, self.parser = self._l4()
        self._policy: CompiledPolicy | None = None
        self._matchers: list[PortMatcher] = []
        # With one leg, its matcher's deciders (``PortMatcher.deciders``): a request is
        # judged in one call. With two, none: both legs are asked and combined.
        self._deciders: Mapping[type, Callable[[Any], Decision]] = {}
        # The last request judged and its decision. A keep-alive client that repeats
        # a head gets the very request object again (the engines remember heads), and
        # a decision is a pure function of the policy and the request.
        self._last_request: L7Request | None = None
        self._last_decision = NO_LOCAL_ENDPOINT

    @property
    def tls(self) -> PortTls | None:
        """The TLS the proxy speaks on this connection (``terminatingTLS``, ``originatingTLS``)."""
        return self.l4.tls

    def _legs(self) -> tuple[Leg, ...]:
        """The directions that apply: the destination's ingress and the source's egress."""
        src, dst = self.src, self.dst
        if dst.endpoint is not None:
            ingress = (dst.endpoint.id, INGRESS, src.identity)
            if src.endpoint is not None:
                return (ingress, (src.endpoint.id, EGRESS, dst.identity))
            return (ingress,)
        if src.endpoint is not None:
            return ((src.endpoint.id, EGRESS, dst.identity),)
        return ()

    def _leg_header(self, leg: Leg) -> str:
        """How a trace names one leg."""
        if leg[1] == INGRESS:
            assert self.dst.endpoint is not None
            return f"ingress of {self.dst.endpoint.name} from identity {self.src.identity}:"
        assert self.src.endpoint is not None
        return f"egress of {self.src.endpoint.name} to identity {self.dst.identity}:"

    def _l4(self) -> tuple[PortVerdict, str | None]:
        legs = self._legs()
        if not legs:
            return NO_LOCAL_ENDPOINT_L4, None
        return self.state.current.connection_verdict(legs, self.dst.port)

    def decide(self, request: L7Request, trace: list[str] | None = None) -> Decision:
        policy = self.state.current
        if trace is not None:
            decisions = []
            for leg in self._legs():
                trace.append(self._leg_header(leg))
                ep, direction, peer = leg
                decisions.append(
                    policy.l7_decide(ep, direction, peer, self.dst.port, request, trace)
                )
            return _combine(decisions)
        if policy is not self._policy:
            self._policy = policy
            matchers = self._matchers = [
                policy.l7_matcher(ep, direction, peer, self.dst.port)
                for ep, direction, peer in self._legs()
            ]
            self._deciders = matchers[0].deciders if len(matchers) == 1 else {}
            self._last_request = None
        if request is self._last_request:
            return self._last_decision
        decider = self._deciders.get(type(request))
        if decider is not None:
            decision = decider(request)
        elif len(self._matchers) == 1:  # one local endpoint: nothing to combine
            decision = self._matchers[0].decide(request)
        else:
            decision = _combine([m.decide(request) for m in self._matchers])
        self._last_request = request
        self._last_decision = decision
        return decision

    __call__ = decide


def _combine(decisions: list[Decision]) -> Decision:
    """Both legs must allow: a denial wins, then an audit (so it is logged), then a
    decision carrying header edits."""
    if not decisions:
        return NO_LOCAL_ENDPOINT
    for d in decisions:
        if not d.allowed:
            return d
    return next((d for d in decisions if d.audit), None) or next(
        (d for d in decisions if d.edits), decisions[0]
    )
