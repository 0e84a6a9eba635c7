"""Lease loss and lost keys: an agent that finds its keys gone writes them again;
an agent that dies leaves its keys to expire; unreferenced identities are
collected after a grace period, and never while referenced."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from l7proxy.cluster.gc import collect_txn
from l7proxy.cluster.keys import Layout
from l7proxy.cluster.kv import Etcd, KeyValue
from l7proxy.cluster.store import Change, ClusterConfig, IdentityChange, IpChange, Renumbered
from tests.cluster.conftest import eventually, running
from tests.support.etcd import EtcdServer
from tests.support.tcp_cut import CuttableLink

pytestmark = pytest.mark.cluster

Config = Callable[..., ClusterConfig]


async def direct(etcd: EtcdServer) -> Etcd:
    kv = Etcd(etcd.host, etcd.port, rate=0)
    await kv.connect()
    return kv


async def test_a_partition_longer_than_the_lease_ends_with_the_keys_written_again(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    async with CuttableLink((etcd.host, etcd.port)) as link:
        b_config = config("node-b", port=link.port, lease_ttl=2, keepalive_every=0.3)
        async with running(config("node-a"), b_config) as (a, b):
            number = await b.allocate({"app": "web"})
            await b.upsert_ip("10.2.0.7", number)
            await eventually(lambda: "10.2.0.7" in a.ipcache and "node-b" in a.nodes, 2.0)

            link.cut()  # b's lease runs out: etcd deletes its keys
            await eventually(lambda: "10.2.0.7" not in a.ipcache, 6.0, "b's keys to expire")
            await eventually(lambda: "node-b" not in a.nodes, 1.0)
            layout = Layout(prefix)
            kv = await direct(etcd)
            try:
                refs, _ = await kv.list_prefix(layout.values)
                assert refs == []  # b's reference went with its lease; the id key stays
                assert await kv.get(layout.id_key(number)) is not None
            finally:
                await kv.close()

            link.heal()  # b finds its lease gone, takes a new one, writes everything again
            await eventually(lambda: "10.2.0.7" in a.ipcache and "node-b" in a.nodes, 6.0)
            assert a.ipcache["10.2.0.7"].identity == number
            assert b.session.leases_lost == 1
            await eventually(lambda: b.allocator.stats.restored == 1, 2.0)
            kv = await direct(etcd)
            try:
                ref = await kv.get(layout.ref_key("app=web;", "node-b"))
                assert ref is not None and ref.value == str(number).encode()
                assert ref.lease == b.session.lease
            finally:
                await kv.close()


async def test_an_outage_shorter_than_the_lease_loses_nothing_whatever_the_back_off(
    config: Config, etcd: EtcdServer
) -> None:
    """The upkeep backs off after failures, but never past a keepalive period: a long
    back-off (here up to 30 s) would let the lease expire after etcd is back."""
    async with CuttableLink((etcd.host, etcd.port)) as link:
        # With the back-off capped at a keepalive (0.5 s), the lease is renewed at worst
        # 0.5 s before the cut, and after the heal once the gRPC channel has connected
        # again: its own reconnect back-off (1 s growing 1.6 times, with jitter) adds up
        # to about 2.5 s after a 4 s outage, so at worst about 7.5 s of the lease's 9.
        # Uncapped, a 4 s outage grows the upkeep's back-off (full jitter, 1 s doubling)
        # to seconds more, and the lease most often expires before the next attempt.
        b_config = config(
            "node-b",
            port=link.port,
            lease_ttl=9,
            keepalive_every=0.5,
            backoff_base=1.0,
            backoff_cap=30,
            timeout=0.25,
        )
        async with running(config("node-a"), b_config) as (a, b):
            await b.upsert_ip("10.2.0.8", await b.allocate({"app": "web"}))
            await eventually(lambda: "10.2.0.8" in a.ipcache, 2.0)
            gone: list[Change] = []
            a.subscribe(lambda ch: gone.append(ch) if isinstance(ch, IpChange) else None)
            link.cut()
            await asyncio.sleep(4.0)  # several failed keepalives: the back-off has grown
            link.heal()
            await asyncio.sleep(9.0)  # past the TTL the lease had when the link was cut
            assert b.counters.maintenance_errors >= 1
            assert b.session.leases_lost == 0
            assert gone == []  # a never saw b's address go
            assert "10.2.0.8" in a.ipcache


async def test_an_ipcache_key_deleted_by_someone_else_is_written_again(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    async with running(config("node-a"), config("node-b")) as (a, b):
        await b.upsert_ip("10.2.0.8", 300)
        await eventually(lambda: "10.2.0.8" in a.ipcache, 2.0)
        seen: list[Change] = []
        a.subscribe(seen.append)
        kv = await direct(etcd)
        try:
            await kv.delete(Layout(prefix).ip_key("10.2.0.8"))
        finally:
            await kv.close()
        await eventually(lambda: IpChange("10.2.0.8", None) in seen, 2.0)
        await eventually(lambda: "10.2.0.8" in a.ipcache, 2.0, "b to write it again")


async def test_a_reference_deleted_by_someone_else_is_written_again(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    async with running(config("node-b", sync_every=0.2)) as (b,):
        number = await b.allocate({"app": "web"})
        ref_key = Layout(prefix).ref_key("app=web;", "node-b")
        kv = await direct(etcd)
        try:
            await kv.delete(ref_key)
            await eventually(lambda: b.allocator.stats.restored == 1, 3.0)
            ref = await kv.get(ref_key)
            assert ref is not None and ref.value == str(number).encode()
        finally:
            await kv.close()


async def test_a_dead_agents_identity_is_collected_after_the_grace_period(
    config: Config,
) -> None:
    sweeper = config("node-a", gc_every=0.1, gc_grace=0.5)
    async with running(sweeper, config("node-b", lease_ttl=1)) as (a, b):
        number = await b.allocate({"app": "short-lived"})
        await eventually(lambda: number in a.identities, 2.0)
        seen: list[Change] = []
        a.subscribe(seen.append)
        await b.stop(revoke=False)  # b dies: its reference expires with its lease (~1-2 s)

        took = await eventually(lambda: number not in a.identities, 6.0, "collection")
        assert took >= 0.5  # not before the grace period
        assert IdentityChange(number, None) in seen
        # by our collector (its watch may show the delete before its txn returns)
        gc = a.gc
        assert gc is not None
        await eventually(lambda: gc.collected == [number], 2.0, "collected by node-a")


async def test_an_identity_in_use_is_never_collected(config: Config, etcd: EtcdServer) -> None:
    sweeper = config("node-a", gc_every=0.05, gc_grace=0.1)
    async with running(sweeper, config("node-b")) as (a, b):
        number = await b.allocate({"app": "long-lived"})
        await asyncio.sleep(1.0)  # twenty sweeps, ten grace periods
        assert number in a.identities and a.gc is not None and a.gc.collected == []
        # and the collector's transaction itself refuses while a reference exists
        layout = Layout(a.config.prefix)
        kv = await direct(etcd)
        try:
            id_kv = await kv.get(layout.id_key(number))
            assert id_kv is not None
            assert not (await kv.txn(collect_txn(layout, id_kv))).succeeded
            stale = KeyValue(id_kv.key, id_kv.value, id_kv.create_revision, id_kv.mod_revision - 1)
            assert not (await kv.txn(collect_txn(layout, stale))).succeeded
        finally:
            await kv.close()


async def test_an_unreferenced_identity_is_reused_before_it_is_collected(config: Config) -> None:
    async with running(config("node-b", lease_ttl=1), config("node-c")) as (b, c):
        number = await b.allocate({"app": "comes-back"})
        await eventually(lambda: number in c.identities, 2.0)
        await b.stop(revoke=True)  # its reference goes; the id key waits for collection
        assert await c.allocate({"app": "comes-back"}) == number


async def test_an_identity_collected_during_a_partition_is_taken_again_or_renumbered(
    config: Config, etcd: EtcdServer
) -> None:
    """b is cut off long enough for its lease to expire and its identities to be
    collected. On its return it takes the same numbers again where they are still
    free; where another label set took the number meanwhile, b gets a new one,
    says so (``Renumbered``) and moves its ipcache entries to it."""
    async with CuttableLink((etcd.host, etcd.port)) as link:
        sweeper = config("node-a", gc_every=0.1, gc_grace=0.2)
        b_config = config("node-b", port=link.port, lease_ttl=1, keepalive_every=0.2)
        async with running(sweeper, b_config) as (a, b):
            kept = await b.allocate({"app": "kept"})
            moved = await b.allocate({"app": "moved"})
            await b.upsert_ip("10.3.0.1", moved)
            await eventually(lambda: {kept, moved} <= set(a.identities), 2.0)
            renumbered: list[Change] = []
            b.subscribe(lambda ch: renumbered.append(ch) if isinstance(ch, Renumbered) else None)

            link.cut()
            await eventually(lambda: not {kept, moved} & set(a.identities), 8.0, "collection")
            a.allocator.first = a.allocator.last = moved  # someone else takes that number
            assert await a.allocate({"app": "thief"}) == moved
            link.heal()

            await eventually(lambda: renumbered != [], 8.0, "b to restore its identities")
            (change,) = renumbered
            assert change == Renumbered({"app": "moved"}, moved, change.new)
            assert change.new != moved and b.allocator.local["app=moved;"].number == change.new
            await eventually(lambda: a.identities.get(kept) == {"app": "kept"}, 2.0)
            await eventually(
                lambda: (
                    a.ipcache.get("10.3.0.1") is not None
                    and a.ipcache["10.3.0.1"].identity == change.new
                ),
                2.0,
            )
