"""A new agent on a node takes the node's keys over from the running one
(docs/restarts.md, docs/cluster.md): no other node ever sees the node's keys go.

Both agents of the node hold the same keys (same node name), each on its own lease,
and a key belongs to the lease of its last put. The old agent's upkeep puts every key
it finds missing from its lease back on it, so it takes the successor's writes back;
revoking its lease then deleted them (the flaky
``test_an_agent_taken_over_on_its_node_keeps_its_keys``). Here the old store's upkeep
runs every 50 ms, so it has always taken the keys back before the handover.

Every test reads etcd's own event stream under its prefix, from before the successor
starts until a marker key written after the handover has come through it, so not one
event can be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from l7proxy.agent.cluster import ClusterLink
from l7proxy.cluster.keys import Layout, with_source
from l7proxy.cluster.kv import Etcd
from l7proxy.cluster.store import ClusterConfig, ClusterStore, HandedOver, IpChange
from tests.cluster.conftest import eventually, running
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.cluster

Config = Callable[..., ClusterConfig]
TIE = {"app": "tiefighter"}


@dataclass(frozen=True)
class KeyEvent:
    deleted: bool
    key: bytes
    lease: int


class EtcdEvents:
    """Every event etcd reports under ``prefix`` from the moment ``watching`` returns."""

    def __init__(self, etcd: EtcdServer, prefix: str) -> None:
        self.kv = Etcd(etcd.host, etcd.port, rate=0)
        self.prefix = prefix.encode()
        self.events: list[KeyEvent] = []
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[EtcdEvents]:
        await self.kv.connect()
        _, revision = await self.kv.list_prefix(self.prefix, keys_only=True)
        created = asyncio.Event()

        async def watch() -> None:
            async for batch in self.kv.watch(self.prefix, revision + 1):
                created.set()  # the first reply is the watch's creation
                self.events += [KeyEvent(e.deleted, e.kv.key, e.kv.lease) for e in batch]

        self._task = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(created.wait(), 5)
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            await self.kv.close()

    async def all_seen(self) -> list[KeyEvent]:
        """Every event up to now: a marker put now is the last one etcd sends us."""
        markers = self.prefix + b"/zz-marker-"
        marker = markers + str(len(self.events)).encode()
        await self.kv.put(marker, b"", 0)
        await eventually(lambda: any(e.key == marker for e in self.events), 5, "the marker")
        return [e for e in self.events if not e.key.startswith(markers)]

    async def keys_put_on(self, lease: int) -> set[bytes]:
        """The keys some put up to now attached to ``lease``."""
        events = await self.all_seen()
        return {e.key for e in events if not e.deleted and e.lease == lease}

    async def lease_of(self, key: bytes) -> int | None:
        kv = await self.kv.get(key)
        return kv.lease if kv is not None else None

    async def keys_on(self, lease: int) -> set[bytes] | None:
        """The keys attached to ``lease``; None once it is gone."""
        ttl, keys = await self.kv.lease_keys(lease)
        return keys if ttl > 0 else None


def deleted(events: list[KeyEvent]) -> list[bytes]:
    return [e.key for e in events if e.deleted]


async def node_keys(store: ClusterStore, ip: str) -> set[bytes]:
    """The three keys of a node with one pod: node, the pod's address, its reference."""
    layout = store.layout
    return {
        layout.node_key(store.config.node),
        layout.ip_key(ip),
        *store.allocator.ref_keys(),
    }


async def test_a_takeover_deletes_no_key_though_the_old_upkeep_took_them_back(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    async with running(config("node-2", sync_every=0.05)) as (old,):
        await old.upsert_ip("10.2.0.5", await old.allocate(TIE))
        keys = await node_keys(old, "10.2.0.5")
        async with (
            EtcdEvents(etcd, prefix).watching() as etcd_events,
            running(config("node-2")) as (new,),
        ):
            await new.upsert_ip("10.2.0.5", await new.allocate(TIE))
            # The successor put all three on its lease (read from the event stream: the
            # old upkeep may already have put some back by the time a get would run).
            assert await etcd_events.keys_put_on(new.session.lease) == keys
            # Within 50 ms the old upkeep finds them missing from its lease and puts them
            # back on it: revoking that lease now would delete all three.
            async with asyncio.timeout(5):
                while await etcd_events.keys_on(old.session.lease) != keys:
                    await asyncio.sleep(0.01)

            old_lease = old.session.lease
            assert await old.hand_over() == [old_lease]
            with pytest.raises(HandedOver):
                await old.upsert_ip("10.2.0.6", 300)
            await new.take_over([old_lease])
            assert new.taking_over
            assert await new.complete_takeover()

            assert not new.taking_over
            assert await etcd_events.keys_on(old_lease) is None  # revoked
            assert {await etcd_events.lease_of(k) for k in keys} == {new.session.lease}
            await asyncio.sleep(0.2)  # four periods of the old upkeep: it writes no more
            await old.stop()  # and revokes nothing
            events = await etcd_events.all_seen()
            assert deleted(events) == []
            assert {e.key for e in events} == keys  # moved between leases, by puts only
            assert {await etcd_events.lease_of(k) for k in keys} == {new.session.lease}
            assert new.counters.keys_taken_over == 3


async def test_the_keys_the_successor_no_longer_wants_go_with_the_old_lease(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    """The pod 10.2.0.6 was deleted while the agents changed: only its address goes."""
    async with (
        running(config("node-1"), config("node-2", sync_every=0.05)) as (other, old),
        EtcdEvents(etcd, prefix).watching() as etcd_events,
    ):
        number = await old.allocate(TIE)
        await old.upsert_ip("10.2.0.5", number)
        await old.upsert_ip("10.2.0.6", number)
        await eventually(lambda: {"10.2.0.5", "10.2.0.6"} <= set(other.ipcache), 2)
        seen_by_other: list[IpChange] = []
        other.subscribe(lambda ch: seen_by_other.append(ch) if isinstance(ch, IpChange) else None)
        async with running(config("node-2")) as (new,):
            await new.upsert_ip("10.2.0.5", await new.allocate(TIE))
            await new.take_over(await old.hand_over())
            assert await new.complete_takeover()
            events = await etcd_events.all_seen()
            assert deleted(events) == [Layout(prefix).ip_key("10.2.0.6")]
            await eventually(lambda: "10.2.0.6" not in other.ipcache, 2)
            assert [ch.ip for ch in seen_by_other if ch.entry is None] == ["10.2.0.6"]
            assert other.ipcache["10.2.0.5"].node == "node-2"
            assert new.counters.keys_not_wanted == 1
        await old.stop()


async def test_the_old_lease_outlives_its_ttl_until_the_successor_has_written_its_keys(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    """A successor whose writes are late keeps the old lease alive: until it has
    written the node's keys, they stay in etcd on that lease."""
    async with (
        running(config("node-2", lease_ttl=2, sync_every=0.05)) as (old,),
        EtcdEvents(etcd, prefix).watching() as etcd_events,
    ):
        await old.upsert_ip("10.2.0.5", await old.allocate(TIE))
        keys = await node_keys(old, "10.2.0.5")
        async with running(config("node-2", lease_ttl=30)) as (new,):
            old_lease = old.session.lease
            await new.take_over(await old.hand_over())
            await asyncio.sleep(3.0)  # past the old lease's 2 s: the successor renews it
            on_old = await etcd_events.keys_on(old_lease)
            assert on_old is not None and keys - {new.layout.node_key("node-2")} <= on_old

            await new.upsert_ip("10.2.0.5", await new.allocate(TIE))
            assert await new.complete_takeover()
            assert await etcd_events.keys_on(old_lease) is None
            assert {await etcd_events.lease_of(k) for k in keys} == {new.session.lease}
            assert deleted(await etcd_events.all_seen()) == []


@dataclass(frozen=True)
class Pod:
    """What ``ClusterLink.sync`` reads of an endpoint (``node.store.EndpointRecord``)."""

    name: str
    labels: dict[str, str]
    ip: str


async def test_an_agent_completes_the_takeover_only_after_a_sync_that_wrote_everything(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    """The successor's request budget (10 a second, 10 saved up) is spent: its first sync
    of twelve pods (24 writes) gives up half-way, each write allowed 50 ms. The takeover
    waits for a sync that wrote them all; the old lease holds the rest meanwhile."""
    pods = [Pod(f"ns/pod-{i}", {"app": f"a{i}"}, f"10.2.0.{10 + i}") for i in range(12)]
    async with (
        running(config("node-1"), config("node-2", sync_every=0.05)) as (other, old),
        EtcdEvents(etcd, prefix).watching() as etcd_events,
    ):
        for pod in pods:
            await old.upsert_ip(pod.ip, await old.allocate(with_source(pod.labels)))
        await eventually(lambda: {p.ip for p in pods} <= set(other.ipcache), 2)
        went: list[IpChange] = []
        other.subscribe(
            lambda ch: went.append(ch) if isinstance(ch, IpChange) and not ch.entry else None
        )
        link = ClusterLink(config("node-2", rate=10, burst=10), lambda: None)
        await link.start(timeout=10)
        try:
            old_lease = old.session.lease
            await link.take_over(await old.hand_over())
            report = await link.sync(pods, timeout=0.05)
            assert report.error is not None and "TimeoutError" in report.error
            assert link.taking_over
            assert await etcd_events.keys_on(old_lease)  # the lease holds what is not moved

            report = await link.sync(pods, timeout=5.0)
            assert report.error is None and report.waiting == []
            assert not link.taking_over
            assert await etcd_events.keys_on(old_lease) is None
            assert deleted(await etcd_events.all_seen()) == []
            assert went == []
            for pod in pods:
                assert await etcd_events.lease_of(Layout(prefix).ip_key(pod.ip)) == (
                    link.store.session.lease
                )
        finally:
            await link.stop()
        await old.stop()
