"""``ClusterStore``: what the agent (and later the BPF ipcache sync) calls.

    store = ClusterStore(ClusterConfig(node="node-1", etcd=("127.0.0.1", 2379)))
    await store.start()                         # lease, node key, three watches synced
    number = await store.allocate({"k8s:app": "web"})
    await store.upsert_ip("10.0.1.5", number, namespace="default", pod="web-0")
    store.identities[number]                    # every node's identities, from the watch
    store.ipcache_prefixes()                    # {IPv4Network: identity}, for IpCache
    async for change in store.changes(): ...    # or store.subscribe(callback)
    await store.stop()                          # revokes the lease: our keys go at once

A new agent on the same node takes over from a running one (docs/restarts.md):

    leases = await old.hand_over()              # old: stops writing; its lease is left alive
    await new.take_over(leases)                 # new: keeps that lease alive meanwhile
    await new.complete_takeover()               # once new has written all it wants: moves what
                                                # it owns off that lease, then revokes it

It owns one etcd connection (rate limited), one lease with the keys on it,
one allocator, three ``PrefixWatch`` loops (identities, ipcache, nodes) and a
maintenance loop that keeps the lease alive and writes back whatever of ours
is found gone. Optionally it also sweeps unreferenced identities (``gc.py``).

A key belongs to the lease of its last put, so when two agents of one node hold
the same keys on two leases, revoking either lease deletes whatever was last
put on it, and both upkeeps put keys missing from their own lease back on it.
A takeover is therefore a handshake: the old store stops writing before the
new one revokes the old lease, and the new one revokes it only after it has
moved every key it owns off it (lease ids compared, not values).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from l7proxy.cluster.allocator import ClusterAllocator, IdentityTable
from l7proxy.cluster.gc import IdentityGc
from l7proxy.cluster.keys import (
    DEFAULT_CLUSTER,
    DEFAULT_PREFIX,
    EncodingError,
    IpEntry,
    Layout,
    NodeInfo,
    decode_labels,
    encode_labels,
)
from l7proxy.cluster.kv import Etcd, KvError
from l7proxy.cluster.mirror import KeyChange, PrefixWatch
from l7proxy.cluster.protect import Backoff
from l7proxy.cluster.session import Session

log = logging.getLogger("l7proxy.cluster")


@dataclass(frozen=True)
class ClusterConfig:
    node: str
    etcd: tuple[str, int] = ("127.0.0.1", 2379)
    prefix: str = DEFAULT_PREFIX
    cluster: str = DEFAULT_CLUSTER
    node_ips: tuple[str, ...] = ()
    alloc_cidr: str = ""
    lease_ttl: int = 900  # Cilium's 15 minutes: a dead node's keys live this long
    keepalive_every: float | None = None  # default: a third of the TTL
    sync_every: float = 60.0  # compare the keys on our lease with ours
    gc_every: float | None = None  # None: this node does not sweep identities
    gc_grace: float = 900.0
    rate: float = 20.0  # etcd requests a second (Cilium's etcd.qps default)
    burst: float = 20.0
    backoff_base: float = 0.1
    backoff_cap: float = 30.0
    timeout: float = 5.0


# --------------------------------------------------------------------- changes


@dataclass(frozen=True, slots=True)
class IdentityChange:
    number: int
    labels: Mapping[str, str] | None  # None: the identity was deleted
    relisted: bool = False


@dataclass(frozen=True, slots=True)
class IpChange:
    ip: str
    entry: IpEntry | None
    relisted: bool = False


@dataclass(frozen=True, slots=True)
class NodeChange:
    name: str
    node: NodeInfo | None
    relisted: bool = False


@dataclass(frozen=True, slots=True)
class Renumbered:
    """One of our label sets has a new number (its identity was collected while
    our lease was gone). The agent moves its endpoints to ``new``."""

    labels: Mapping[str, str]
    old: int
    new: int


Change = IdentityChange | IpChange | NodeChange | Renumbered


class HandedOver(RuntimeError):
    """This store handed its keys over to a successor on the node: it writes no more."""


# --------------------------------------------------------------------- the store


@dataclass
class _Counters:
    bad_values: int = 0
    restores: int = 0
    maintenance_errors: int = 0
    keys_taken_over: int = 0  # keys moved off a predecessor's lease onto ours
    keys_not_wanted: int = 0  # keys left on it, deleted with it


class ClusterStore:
    def __init__(self, config: ClusterConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.layout = Layout(config.prefix, config.cluster)
        self.kv = Etcd(
            *config.etcd,
            rate=config.rate,
            burst=config.burst,
            timeout=config.timeout,
            reconnect_cap=config.backoff_cap,
        )
        self.session = Session(self.kv, config.lease_ttl)
        self.table = IdentityTable()
        self.allocator = ClusterAllocator(
            self.kv,
            self.layout,
            config.node,
            self.table,
            lambda: self.session.lease,
            rng=rng or random.Random(),
        )
        self.gc = IdentityGc(self.kv, self.layout, config.gc_grace) if config.gc_every else None
        self.identities: dict[int, dict[str, str]] = {}
        self.ipcache: dict[str, IpEntry] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.counters = _Counters()
        self.watches = {
            "identities": PrefixWatch(self.kv, self.layout.ids, self._on_ids, self._backoff()),
            "ipcache": PrefixWatch(self.kv, self.layout.ips, self._on_ips, self._backoff()),
            "nodes": PrefixWatch(self.kv, self.layout.nodes, self._on_nodes, self._backoff()),
        }
        self._subscribers: list[Callable[[Change], None]] = []
        self._queues: list[asyncio.Queue[Change]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._missing: set[bytes] = set()
        self._wake = asyncio.Event()
        self._own_ips: dict[str, IpEntry] = {}
        # Takeover: leases of the agent we took over from (lease -> its keepalive period),
        # kept alive until we have moved what we own off them; and, on the old side, the
        # writes in flight that ``hand_over`` waits for.
        self._predecessors: dict[int, float] = {}
        self._handed_over = False
        self._writes = 0
        self._no_writes = asyncio.Event()
        self._no_writes.set()

    def _backoff(self) -> Backoff:
        return Backoff(self.config.backoff_base, self.config.backoff_cap)

    # -- life cycle

    async def start(self, timeout: float = 30.0) -> None:
        """Connect, take a lease, register the node, and wait until every watch has listed."""
        deadline = time.monotonic() + timeout
        backoff = self._backoff()
        while True:
            try:
                await self.kv.connect()
                await self.session.start()
                break
            except KvError as e:
                if time.monotonic() > deadline:
                    raise
                delay = backoff.next()
                log.warning("etcd %s: %s; trying again in %.2f s", self.kv.endpoint, e, delay)
                await asyncio.sleep(delay)
        try:
            await self.session.put(
                self.layout.node_key(self.config.node), self._node_info().to_json()
            )
            for name, watch in self.watches.items():
                self._spawn(watch.run(), f"watch {name}")
            self._spawn(self._maintain(), "lease")
            if self.gc is not None:
                self._spawn(self._sweep(), "identity gc")
            waits = [w.synced.wait() for w in self.watches.values()]
            await asyncio.wait_for(asyncio.gather(*waits), max(0.1, deadline - time.monotonic()))
        except BaseException:
            await self.stop()
            raise

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop every loop. With ``revoke`` our keys go now (and those still on the
        lease of an agent we were taking over from); without, they expire with the
        lease, as if the node had died. After ``hand_over`` nothing is revoked: the
        successor owns our lease."""
        await self._stop_loops()
        if revoke and not self._handed_over:
            with contextlib.suppress(KvError):
                await self.session.revoke()
            for lease in list(self._predecessors):
                with contextlib.suppress(KvError):
                    await self.kv.revoke(lease)
            self._predecessors.clear()
        await self.kv.close()

    async def _stop_loops(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- takeover by a new agent on this node

    async def hand_over(self) -> list[int]:
        """Give this node's keys to a successor on the same node (same node name, so
        the same keys): stop writing, wait for the writes in flight, stop every loop,
        and return our lease (and any predecessor's we still held), renewed and not
        revoked. The successor passes them to ``take_over``.

        Writing no more is what makes the successor's revoke safe: our upkeep puts
        every key it finds missing from our lease back on it, so a key the successor
        had moved to its lease could come back to ours, and go with it."""
        if self._handed_over:
            return []
        self._handed_over = True  # every write from now on raises HandedOver
        self._wake.set()  # the upkeep wakes up and ends
        try:
            await asyncio.wait_for(self._no_writes.wait(), self.config.timeout)
        except TimeoutError:
            log.warning("handing over with %d etcd writes still in flight", self._writes)
        await self._stop_loops()
        leases = [lease for lease in (self.session.lease, *self._predecessors) if lease]
        for lease in leases:  # a full TTL for the successor to take them over
            try:
                await self.kv.keepalive(lease)
            except KvError as e:
                log.warning("lease %x not renewed for the successor: %s", lease, e)
        self._predecessors.clear()
        log.info("handed over leases %s to a successor", ", ".join(f"{x:x}" for x in leases))
        return leases

    async def take_over(self, leases: list[int]) -> None:
        """The agent we take over from on this node handed us ``leases`` (``hand_over``):
        keep them alive until ``complete_takeover``, so that the keys on them stay in
        etcd for as long as we may not have written ours yet."""
        self._started()
        for lease in leases:
            if lease and lease != self.session.lease:
                ttl = await self.kv.keepalive(lease)
                if ttl > 0:
                    self._predecessors[lease] = max(0.5, ttl / 3)
                else:
                    log.warning("the predecessor's lease %x was already gone", lease)
        self._wake.set()  # the upkeep plans its keepalives

    @property
    def taking_over(self) -> bool:
        """A predecessor's lease is still held: ``complete_takeover`` has work left."""
        return bool(self._predecessors)

    async def complete_takeover(self) -> bool:
        """Move every key we own that is still on a predecessor's lease to ours, then
        revoke that lease: what is left on it (keys we no longer want) goes with it.

        Call it once every key we want is written (the agent calls it after a sync
        that reached etcd in full): a key we have not written yet would go with the
        revoke. A key's lease is the lease of its last put, so keys are moved by what
        the lease holds now, whatever their value. True when no lease is left to
        take over; False if ours keep coming back to a lease (its agent still
        writes), which is then kept alive and tried again later."""
        async with self._write():
            for lease in list(self._predecessors):
                if await self._adopt(lease):
                    self._predecessors.pop(lease, None)
        return not self._predecessors

    async def _adopt(self, lease: int) -> bool:
        for _ in range(3):
            ttl, attached = await self.kv.lease_keys(lease)
            if ttl <= 0:
                log.warning("the predecessor's lease %x expired before the takeover ended", lease)
                return True  # its keys went with it: our upkeep writes back what we own
            plain = sorted(k for k in attached if k in self.session.owned)
            refs = {k: label for k, label in self.allocator.ref_keys().items() if k in attached}
            if not plain and not refs:
                await self.kv.revoke(lease)
                self.counters.keys_not_wanted += len(attached)
                log.info(
                    "took over from lease %x: revoked it with %d keys we do not own",
                    lease,
                    len(attached),
                )
                return True
            await self.session.rewrite(plain)
            await self._rereference(list(refs.values()))
            self.counters.keys_taken_over += len(plain) + len(refs)
        log.warning("keys we own keep coming back to lease %x: its agent still writes", lease)
        return False

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """Count one write (or one round of upkeep) in flight, for ``hand_over``."""
        if self._handed_over:
            raise HandedOver(f"node {self.config.node}: handed over to a successor")
        self._writes += 1
        self._no_writes.clear()
        try:
            yield
        finally:
            self._writes -= 1
            if not self._writes:
                self._no_writes.set()

    async def __aenter__(self) -> ClusterStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"cluster {name}"))

    def _node_info(self) -> NodeInfo:
        c = self.config
        return NodeInfo(c.node, c.cluster, c.node_ips, c.alloc_cidr)

    # -- writes

    def _started(self) -> None:
        if not self.session.lease:
            raise RuntimeError("ClusterStore: start() first (keys are written on the lease)")

    async def allocate(self, labels: Mapping[str, str]) -> int:
        self._started()
        async with self._write():
            return await self.allocator.allocate(labels)

    async def release(self, labels: Mapping[str, str]) -> None:
        async with self._write():
            await self.allocator.release(labels)

    async def upsert_ip(
        self, ip: str, identity: int, *, namespace: str = "", pod: str = ""
    ) -> None:
        self._started()
        async with self._write():
            await self._put_ip(ip, identity, namespace, pod)

    async def _put_ip(self, ip: str, identity: int, namespace: str, pod: str) -> None:
        host_ip = self.config.node_ips[0] if self.config.node_ips else ""
        entry = IpEntry(ip, identity, host_ip, self.config.node, namespace, pod)
        self._own_ips[entry.ip] = entry
        await self.session.put(self.layout.ip_key(ip), entry.to_json())

    async def delete_ip(self, ip: str) -> None:
        async with self._write():
            self._own_ips.pop(str(ipaddress.ip_address(ip)), None)
            await self.session.delete(self.layout.ip_key(ip))

    # -- reads

    @property
    def synced(self) -> bool:
        return all(w.synced.is_set() for w in self.watches.values())

    def number_for(self, labels: Mapping[str, str]) -> int | None:
        return self.table.number_for(encode_labels(labels))

    def ipcache_prefixes(self) -> dict[ipaddress.IPv4Network, int]:
        """The ipcache as host prefixes, what ``policy.identity.IpCache`` takes."""
        out = {}
        for ip, entry in self.ipcache.items():
            addr = ipaddress.ip_address(ip)
            if isinstance(addr, ipaddress.IPv4Address):
                out[ipaddress.IPv4Network(f"{addr}/32")] = entry.identity
        return out

    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback`` with every change, in order, from the event loop; returns
        the function that unsubscribes. Callbacks must not block."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def changes(self) -> AsyncIterator[Change]:
        """Every change from now on, in order."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "etcd": self.kv.endpoint,
            "lease": f"{self.session.lease:x}",
            "taking_over": [f"{lease:x}" for lease in self._predecessors],
            "keys_taken_over": self.counters.keys_taken_over,
            "synced": self.synced,
            "identities": len(self.identities),
            "ipcache": len(self.ipcache),
            "nodes": len(self.nodes),
            "watches": {
                name: {
                    "lists": w.lists,
                    "errors": w.errors,
                    "last_error": w.last_error,
                    "revision": w.mirror.revision,
                }
                for name, w in self.watches.items()
            },
            "requests": dict(self.kv.requests),
            "rate_limit_waited_s": round(self.kv.bucket.waited, 3),
            "leases_lost": self.session.leases_lost,
            "keys_rewritten": self.session.rewritten,
            "allocator": vars(self.allocator.stats),
            "gc_collected": list(self.gc.collected) if self.gc else None,
            "bad_values": self.counters.bad_values,
        }

    # -- watch deliveries

    def _emit(self, change: Change) -> None:
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:  # noqa: BLE001 - one bad subscriber must not stop the others
                log.exception("cluster change subscriber failed")
        for queue in self._queues:
            queue.put_nowait(change)

    def _on_ids(self, changes: list[KeyChange], relisted: bool) -> None:
        for ch in changes:
            number = self.layout.number_of(ch.key)
            if number is None:
                continue
            labels = None
            if ch.value is not None:
                try:
                    labels = decode_labels(ch.value.decode())
                except (EncodingError, UnicodeDecodeError) as e:
                    self.counters.bad_values += 1
                    log.warning("identity %d: %s", number, e)
                    continue
            self.table.update(number, ch.value.decode() if ch.value is not None else None)
            if labels is None:
                self.identities.pop(number, None)
            else:
                self.identities[number] = labels
            self._emit(IdentityChange(number, labels, relisted))

    def _on_ips(self, changes: list[KeyChange], relisted: bool) -> None:
        for ch in changes:
            ip = self.layout.ip_of(ch.key)
            if ip is None:
                continue
            entry = None
            if ch.value is not None:
                try:
                    entry = IpEntry.from_json(ch.value)
                except EncodingError as e:
                    self.counters.bad_values += 1
                    log.warning("ipcache %s: %s", ip, e)
                    continue
                self.ipcache[ip] = entry
            else:
                self.ipcache.pop(ip, None)
                self._lost(ch.key)
            self._emit(IpChange(ip, entry, relisted))

    def _on_nodes(self, changes: list[KeyChange], relisted: bool) -> None:
        for ch in changes:
            name = self.layout.node_of(ch.key)
            if name is None:
                continue
            node = None
            if ch.value is not None:
                try:
                    node = NodeInfo.from_json(ch.value)
                except EncodingError as e:
                    self.counters.bad_values += 1
                    log.warning("node %s: %s", name, e)
                    continue
                self.nodes[name] = node
            else:
                self.nodes.pop(name, None)
                self._lost(ch.key)
            self._emit(NodeChange(name, node, relisted))

    def _lost(self, key: bytes) -> None:
        """One of our keys was seen deleted: the maintenance loop writes it again."""
        if key in self.session.owned:
            self._missing.add(key)
            self._wake.set()

    # -- maintenance: lease, our keys, identity collection

    async def _maintain(self) -> None:
        c = self.config
        keepalive_every = c.keepalive_every or max(0.5, c.lease_ttl / 3)
        next_keepalive = time.monotonic() + keepalive_every
        next_sync = time.monotonic() + c.sync_every
        predecessors_kept = time.monotonic()
        backoff = self._backoff()
        while True:
            # A predecessor's lease is renewed at its own pace (its TTL may be shorter).
            next_predecessors = predecessors_kept + min(self._predecessors.values(), default=1e9)
            wake_at = min(next_keepalive, next_sync, next_predecessors)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            if self._handed_over:
                return  # the successor owns our keys now: not one more write
            try:
                async with self._write():
                    if self._missing:
                        missing, self._missing = self._missing, set()
                        await self.session.rewrite(sorted(missing))
                    now = time.monotonic()
                    if now >= next_keepalive:
                        if not await self.session.keepalive():
                            await self._restore_refs(None)
                        next_keepalive = now + keepalive_every
                    if now >= next_predecessors:
                        await self._keep_predecessors_alive()
                        predecessors_kept = now
                    if now >= next_sync:
                        await self._sync()
                        next_sync = now + c.sync_every
                backoff.reset()
            except Exception as e:  # noqa: BLE001 - the upkeep must go on whatever failed
                self.counters.maintenance_errors += 1
                # Never wait longer than a keepalive period: a back-off past the lease's
                # TTL would let our keys expire while etcd is already back.
                delay = min(backoff.next(), keepalive_every)
                log.warning(
                    "cluster lease upkeep failed (%s); again in %.2f s",
                    e,
                    delay,
                    exc_info=not isinstance(e, KvError),
                )
                await asyncio.sleep(delay)

    async def _keep_predecessors_alive(self) -> None:
        for lease in list(self._predecessors):
            if await self.kv.keepalive(lease) <= 0:
                # Its keys went with it; the watches see ours go and we write them again.
                log.warning("the predecessor's lease %x expired before the takeover ended", lease)
                self._predecessors.pop(lease, None)

    async def _sync(self) -> None:
        """Compare the keys on our lease with the keys we own; write back what is missing."""
        attached = await self.session.attached()
        if attached is None:
            await self.session.renew()
            await self._restore_refs(None)
            return
        missing_plain = [k for k in self.session.owned if k not in attached]
        if missing_plain:
            await self.session.rewrite(missing_plain)
        refs = self.allocator.ref_keys()
        missing_refs = [label_key for key, label_key in refs.items() if key not in attached]
        if missing_refs:
            await self._restore_refs(missing_refs)

    async def _restore_refs(self, label_keys: list[str] | None) -> None:
        if label_keys is None:
            label_keys = list(self.allocator.local)
        self.counters.restores += 1
        await self._rereference(label_keys)

    async def _rereference(self, label_keys: list[str]) -> None:
        """Write our references to these label sets again, on our lease."""
        renumbered = await self.allocator.restore(label_keys)
        for label_key, (old, new) in renumbered.items():
            for entry in list(self._own_ips.values()):
                if entry.identity == old:
                    await self._put_ip(entry.ip, new, entry.namespace, entry.pod)
            self._emit(Renumbered(decode_labels(label_key), old, new))

    async def _sweep(self) -> None:
        assert self.gc is not None and self.config.gc_every
        backoff = self._backoff()
        while True:
            await asyncio.sleep(self.config.gc_every)
            try:
                gone = await self.gc.sweep()
                if gone:
                    log.info("collected unreferenced identities %s", gone)
                backoff.reset()
            except Exception as e:  # noqa: BLE001 - a failed sweep waits for the next
                delay = backoff.next()
                log.warning(
                    "identity gc failed (%s); again in %.2f s",
                    e,
                    delay,
                    exc_info=not isinstance(e, KvError),
                )
                await asyncio.sleep(delay)
