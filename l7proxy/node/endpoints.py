"""Endpoint lifecycle: a namespace, a veth pair, an address, routes, an identity.

The plumbing itself is ``netns`` (pyroute2); this module decides names and
addresses and records the result in the agent's state so that an agent
restart finds the endpoint again without re-creating it.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from l7proxy.node import netns
from l7proxy.node.store import POD, AgentState, EndpointRecord, Store

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class EndpointError(Exception):
    pass


def add_endpoint(
    store: Store, name: str, labels: dict[str, str], ip: str | None = None
) -> EndpointRecord:
    if not _NAME.match(name):
        raise EndpointError(
            f"invalid endpoint name {name!r}: use lower-case letters, digits and '-'"
        )
    if not labels:
        raise EndpointError("an endpoint needs at least one label")
    with store.locked() as state:
        if state.endpoint(name):
            raise EndpointError(f"endpoint {name!r} already exists")
        if not state.endpoints:
            state.subnet = _free_subnet(state.subnet)
        ep_id = state.next_id()
        address = ip or state.next_ip()
        if any(e.ip == address for e in state.endpoints):
            raise EndpointError(f"address {address} is already used")
        record = EndpointRecord(
            name=name,
            id=ep_id,
            labels=dict(labels),
            ip=address,
            netns=f"l7p-{state.instance}-{name}",
            host_ifname=f"l7p{state.instance}{ep_id:04x}",
        )
        netns.ensure_forwarding()
        netns.create_endpoint(record.netns, record.host_ifname, ipaddress.IPv4Address(address))
        alloc = state.allocator()
        alloc.for_labels(labels)
        state.identities = alloc.snapshot()
        state.endpoints.append(record)
        return record


def delete_endpoint(store: Store, name: str) -> EndpointRecord:
    with store.locked() as state:
        record = state.endpoint(name)
        if record is None:
            raise EndpointError(f"no endpoint named {name!r}")
        if record.kind != POD:  # a pod's namespace and veth are its CNI's
            netns.delete_endpoint(record.netns, record.host_ifname)
        state.endpoints.remove(record)
        _keep_identities(state)
        return record


def _keep_identities(state: AgentState) -> None:
    """Allocate for every endpoint's labels, release what no endpoint uses."""
    alloc = state.allocator()
    alloc.release_unused(alloc.for_labels(e.labels).number for e in state.endpoints)
    state.identities = alloc.snapshot()


class PodEndpoint(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def ip(self) -> str: ...


def sync_pod_endpoints(store: Store, pods: Sequence[PodEndpoint]) -> list[str]:
    """Make the store's pod endpoints ``pods``, as a CNI-chained plugin would: each
    pod is attached at the link its IP's /32 route goes out of (its host-side
    veth); a pod that is gone, or whose route is gone, is forgotten (its veth is
    left to its CNI). Writes the store only if something changed, so the agent
    reconciles only then. Returns the pods still waiting for their route."""
    links = {p.name: netns.route_link(p.ip) for p in pods}
    waiting = sorted(name for name, link in links.items() if link is None)
    state = store.read()
    others = {e.ip for e in state.endpoints if e.kind != POD}
    wanted = {
        p.name: (p.ip, link[0], dict(p.labels))
        for p in pods
        if (link := links[p.name]) is not None and p.ip not in others
    }
    waiting += sorted(p.name for p in pods if p.name not in wanted and p.name not in waiting)
    have = {e.name: (e.ip, e.host_ifname, e.labels) for e in state.endpoints if e.kind == POD}
    if have == wanted:
        return waiting
    with store.locked() as state:
        state.endpoints = [e for e in state.endpoints if e.kind != POD or e.name in wanted]
        for name, (ip, ifname, labels) in wanted.items():
            record = state.endpoint(name)
            if record is None:
                record = EndpointRecord(name, state.next_id(), labels, ip, "", ifname, POD)
                state.endpoints.append(record)
            record.ip, record.host_ifname, record.labels = ip, ifname, labels
        _keep_identities(state)
    return waiting


def delete_all(store: Store) -> list[str]:
    names = [e.name for e in store.read().endpoints]
    for name in names:
        delete_endpoint(store, name)
    return names


def _free_subnet(preferred: str) -> str:
    """The preferred /24 unless something on this host already routes into it."""
    candidate = ipaddress.IPv4Network(preferred)
    rng = random.Random()
    for _ in range(50):
        if not netns.routes_in(candidate):
            return str(candidate)
        candidate = ipaddress.IPv4Network(
            f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24"
        )
    raise EndpointError("could not find a free /24 in 10.0.0.0/8")
