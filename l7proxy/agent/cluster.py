"""The agent in a cluster: its endpoints' identities and addresses in etcd, and
every other node's in its policy.

``ClusterLink`` sits between the agent and ``l7proxy.cluster.ClusterStore``:

- ``sync(endpoints)`` makes etcd hold what this node runs: each distinct label
  set of a local endpoint gets its cluster-wide identity (256-65535, through the
  store's allocator: the same number on every node), label sets no endpoint uses
  any more are released, and each endpoint's address is published under the
  ipcache prefix on the node's lease (a dead node's entries expire with it).
  A label set that cannot get its number yet (etcd unreachable) leaves its
  endpoints waiting; ``sync`` is called again until none wait.
- ``identities()`` and ``ipcache()`` are what the store's watches hold, every
  node's, in the shape the policy compiler takes. Each change the watches
  deliver calls ``on_change``, and the agent recompiles: maps are updated in
  place, so a re-list (etcd restarted or compacted) that finds the same keys
  changes nothing, and one that finds keys gone removes exactly those.

Labels: local endpoints carry their labels without a source (``app``), as
policy selectors match them; in etcd they carry Cilium's ``k8s:`` source, as a
Cilium agent writes them (``keys.with_source``/``without_source``).

CIDR identities stay node-local (``policy.identity.IdentityAllocator.for_cidr``).

A takeover on the node (docs/restarts.md): the old agent's ``hand_over()`` stops its
writes and returns its lease; the new agent's ``take_over(leases)`` keeps that lease
alive, and the first ``sync`` that reaches etcd in full moves every key the new agent
owns off it and revokes it (``ClusterStore.complete_takeover``). Until then the old
lease holds whatever the new agent has not written yet, so no other node sees this
node's pods go.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml

from l7proxy.cluster.keys import (
    DEFAULT_CLUSTER,
    DEFAULT_PREFIX,
    EncodingError,
    encode_labels,
    with_source,
    without_source,
)
from l7proxy.cluster.kv import KvError
from l7proxy.cluster.store import (
    Change,
    ClusterConfig,
    ClusterStore,
    IdentityChange,
    IpChange,
    Renumbered,
)
from l7proxy.policy.identity import Identity, IdentityAllocator
from l7proxy.policy.namespaces import NAMESPACE_LABEL

log = logging.getLogger("l7proxy.agent.cluster")

ETCD_PORT = 2379


class ClusterSettingsError(ValueError):
    """A bad ``--etcd`` value or etcd config file: the message says where and why."""


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """Where etcd is and where our keys live in it: ``--etcd``/``--etcd-config``,
    ``--kvstore-prefix``, ``--cluster-name``."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    cluster: str = DEFAULT_CLUSTER


def parse_endpoint(text: str) -> tuple[str, int]:
    """``http://10.0.0.1:2379``, ``10.0.0.1:2379`` or ``etcd-0`` -> (host, port)."""
    raw = text.strip()
    if not raw:
        raise ClusterSettingsError("empty etcd endpoint")
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "https"):
        raise ClusterSettingsError(f"etcd endpoint {raw!r}: scheme must be http or https")
    if parts.scheme == "https":
        raise ClusterSettingsError(f"etcd endpoint {raw!r}: TLS to etcd is not supported yet")
    try:
        port = parts.port or ETCD_PORT
    except ValueError as e:
        raise ClusterSettingsError(f"etcd endpoint {raw!r}: {e}") from None
    if not parts.hostname:
        raise ClusterSettingsError(f"etcd endpoint {raw!r}: no host")
    return parts.hostname, port


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """``--etcd``: endpoints separated by commas."""
    return tuple(parse_endpoint(p) for p in text.split(",") if p.strip())


def read_etcd_config(path: Path) -> EtcdSettings:
    """Cilium's etcd config file (``endpoints:`` a list of URLs), as the deploy
    ConfigMap mounts it, with our two optional keys ``prefix`` and ``cluster``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterSettingsError(f"{path}: {e}") from None
    if not isinstance(doc, dict):
        raise ClusterSettingsError(f"{path}: expected a mapping with 'endpoints'")
    endpoints = doc.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise ClusterSettingsError(f"{path}: endpoints: expected a non-empty list of URLs")
    try:
        parsed = tuple(parse_endpoint(str(e)) for e in endpoints)
    except ClusterSettingsError as e:
        raise ClusterSettingsError(f"{path}: endpoints: {e}") from None
    unknown = set(doc) - {"endpoints", "prefix", "cluster"}
    if unknown:
        raise ClusterSettingsError(f"{path}: unknown keys {sorted(unknown)}")
    return EtcdSettings(
        parsed,
        prefix=str(doc.get("prefix") or DEFAULT_PREFIX),
        cluster=str(doc.get("cluster") or DEFAULT_CLUSTER),
    )


def identities_digest(identities: Mapping[int, Mapping[str, str]]) -> str:
    """A short digest of an identity table (number -> labels, as stored in etcd):
    nodes that hold the same table show the same digest in ``l7proxy status``."""
    h = hashlib.sha256()
    for number, labels in sorted(identities.items()):
        h.update(f"{number}={encode_labels(labels)}\n".encode())
    return h.hexdigest()[:16]


def ipcache_digest(ipcache: Mapping[str, int]) -> str:
    """The same for the ipcache (address -> identity)."""
    h = hashlib.sha256()
    for ip, identity in sorted(ipcache.items()):
        h.update(f"{ip}={identity}\n".encode())
    return h.hexdigest()[:16]


class LocalEndpoint(Protocol):
    """What ``sync`` reads of an endpoint record (``node.store.EndpointRecord``)."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def ip(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _Published:
    identity: int
    namespace: str
    pod: str


@dataclass
class SyncReport:
    waiting: list[str] = field(default_factory=list)  # endpoints with no identity yet
    error: str | None = None


class ClusterLink:
    def __init__(self, config: ClusterConfig, on_change: Callable[[], None]) -> None:
        self.config = config
        self.store = ClusterStore(config)
        self._on_change = on_change
        self._held: dict[str, dict[str, str]] = {}  # our label keys -> labels (with source)
        self._published: dict[str, _Published] = {}  # our ipcache entries, by address
        self.last = SyncReport()
        self.syncs = 0
        self.renumbered = 0
        self._unsubscribe: Callable[[], None] | None = None
        # What the compiler takes, kept up to date change by change: converting 100,000
        # addresses on every recompile cost a second (bench/cluster_kvstore.py).
        self._identities: dict[int, Identity] = {}
        self._prefixes: dict[str, tuple[ipaddress.IPv4Network, int]] = {}

    async def start(self, timeout: float = 30.0) -> None:
        self._unsubscribe = self.store.subscribe(self._changed)
        await self.store.start(timeout)

    async def stop(self, *, revoke: bool = True) -> None:
        """With ``revoke`` (a clean stop) our keys go at once; without (a takeover that
        failed: the agent we were taking over from keeps running), they stay until the
        lease expires, and that agent's upkeep puts them back on its own lease."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.store.stop(revoke=revoke)

    async def hand_over(self) -> list[int]:
        """A successor on this node takes our keys over: write no more, and give it
        our lease (``ClusterStore.hand_over``)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return await self.store.hand_over()

    async def take_over(self, leases: list[int]) -> None:
        """The leases of the agent we took over from: kept alive until a sync has
        written everything we want, then emptied of our keys and revoked."""
        await self.store.take_over(leases)

    @property
    def taking_over(self) -> bool:
        return self.store.taking_over

    def _changed(self, change: Change) -> None:
        if isinstance(change, IpChange):
            if change.entry is None:
                self._prefixes.pop(change.ip, None)
            else:
                addr = ipaddress.ip_address(change.ip)
                if isinstance(addr, ipaddress.IPv4Address):
                    net = ipaddress.IPv4Network((int(addr), 32))
                    self._prefixes[change.ip] = (net, change.entry.identity)
        elif isinstance(change, IdentityChange):
            if change.labels is None:
                self._identities.pop(change.number, None)
            else:
                labels = tuple(sorted(without_source(change.labels).items()))
                self._identities[change.number] = Identity(change.number, labels, "endpoint")
        elif isinstance(change, Renumbered):
            self.renumbered += 1
            log.warning(
                "identity of %s renumbered %d -> %d (collected while our lease was gone)",
                encode_labels(change.labels),
                change.old,
                change.new,
            )
        self._on_change()

    # ------------------------------------------------------------------ writes

    async def sync(self, endpoints: Sequence[LocalEndpoint], timeout: float = 5.0) -> SyncReport:
        """etcd := this node's endpoints (identities referenced, addresses published)."""
        self.syncs += 1
        report = SyncReport()
        wanted: dict[str, dict[str, str]] = {}
        for ep in endpoints:
            labels = with_source(ep.labels)
            try:
                wanted[encode_labels(labels)] = labels
            except EncodingError as e:
                report.waiting.append(ep.name)
                report.error = f"endpoint {ep.name}: {e}"
        try:
            await self._publish(endpoints, wanted, timeout)
            # Everything we want is in etcd now: what is left on the old agent's lease
            # is what we no longer want, and may go with it.
            if self.store.taking_over:
                await asyncio.wait_for(self.store.complete_takeover(), timeout)
        except (KvError, TimeoutError, RuntimeError) as e:
            report.error = f"etcd: {str(e) or type(e).__name__}"
            log.warning("cluster sync incomplete (%s); trying again", report.error)
        report.waiting += [ep.name for ep in endpoints if self.number_for(ep.labels) is None]
        report.waiting = sorted(set(report.waiting))
        self.last = report
        return report

    async def _publish(
        self,
        endpoints: Sequence[LocalEndpoint],
        wanted: dict[str, dict[str, str]],
        timeout: float,
    ) -> None:
        """Reference each label set we want, release the others, publish each address."""
        for key, labels in wanted.items():
            if key not in self._held:
                await asyncio.wait_for(self.store.allocate(labels), timeout)
                self._held[key] = labels
        for key in [k for k in self._held if k not in wanted]:
            await asyncio.wait_for(self.store.release(self._held[key]), timeout)
            del self._held[key]
        published = {}
        for ep in endpoints:
            number = self.number_for(ep.labels)
            if number is None:
                continue
            namespace = ep.labels.get(NAMESPACE_LABEL, "")
            pod = ep.name.rpartition("/")[2] if namespace else ""
            published[str(ipaddress.ip_address(ep.ip))] = _Published(number, namespace, pod)
        for ip, entry in published.items():
            if self._published.get(ip) != entry:
                await asyncio.wait_for(
                    self.store.upsert_ip(
                        ip, entry.identity, namespace=entry.namespace, pod=entry.pod
                    ),
                    timeout,
                )
                self._published[ip] = entry
        for ip in [ip for ip in self._published if ip not in published]:
            await asyncio.wait_for(self.store.delete_ip(ip), timeout)
            del self._published[ip]

    # ------------------------------------------------------------------ reads

    def number_for(self, labels: Mapping[str, str]) -> int | None:
        """The cluster-wide number this node holds for an endpoint's labels."""
        try:
            ref = self.store.allocator.local.get(encode_labels(with_source(labels)))
        except EncodingError:
            return None
        return ref.number if ref is not None else None

    def identities(self) -> list[Identity]:
        """Every node's identities, labelled as selectors match them."""
        return list(self._identities.values())

    def ipcache(self) -> dict[ipaddress.IPv4Network, int]:
        """Every node's pod addresses (IPv4), as host prefixes -> identity."""
        return dict(self._prefixes.values())

    def allocator(self, node_local: IdentityAllocator) -> IdentityAllocator:
        """An allocator that knows every cluster identity (for flow logs and
        ``policy trace``) and this node's CIDR identities."""
        alloc = IdentityAllocator()
        alloc.restore(
            [i for i in node_local.snapshot() if i["kind"] == "cidr"]
            + [
                {"number": i.number, "kind": "endpoint", "labels": dict(i.labels), "cidr": None}
                for i in self.identities()
            ]
        )
        return alloc

    def status(self) -> dict[str, Any]:
        store = self.store.status()
        return {
            "node": self.config.node,
            "cluster": self.config.cluster,
            "prefix": self.config.prefix,
            "etcd": f"{self.config.etcd[0]}:{self.config.etcd[1]}",
            "synced": self.store.synced,
            "identities": len(self.store.identities),
            "ipcache": len(self.store.ipcache),
            "identities_digest": identities_digest(self.store.identities),
            "ipcache_digest": ipcache_digest(
                {ip: e.identity for ip, e in self.store.ipcache.items()}
            ),
            "nodes": sorted(self.store.nodes),
            "ipcache_by_node": dict(Counter(e.node for e in self.store.ipcache.values())),
            "own_identities": len(self._held),
            "own_ips": len(self._published),
            "waiting": self.last.waiting,
            "error": self.last.error,
            "renumbered": self.renumbered,
            "store": store,
        }
