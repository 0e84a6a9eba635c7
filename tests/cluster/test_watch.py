"""Every agent's copy of identities, ipcache and nodes: remote changes arrive in
bounded time, and an etcd restart, a compaction or a partition ends in a
fresh list that also shows what was deleted meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from l7proxy.cluster.keys import IpEntry, Layout
from l7proxy.cluster.kv import Etcd, KvCompacted
from l7proxy.cluster.mirror import KeyChange, PrefixWatch
from l7proxy.cluster.protect import Backoff
from l7proxy.cluster.store import (
    Change,
    ClusterConfig,
    ClusterStore,
    IdentityChange,
    IpChange,
    NodeChange,
)
from tests.cluster.conftest import eventually, running
from tests.support.etcd import EtcdServer
from tests.support.tcp_cut import CuttableLink

pytestmark = pytest.mark.cluster

Config = Callable[..., ClusterConfig]
EVERY_NODE = {"node-a", "node-b", "node-c"}


async def test_a_remote_identity_and_ipcache_entry_reach_every_watcher(config: Config) -> None:
    async with running(config("node-a"), config("node-b"), config("node-c")) as (a, b, c):
        seen: list[Change] = []
        b.subscribe(seen.append)
        number = await a.allocate({"k8s:app": "deathstar"})
        await a.upsert_ip("10.1.0.5", number, namespace="empire", pod="deathstar-0")
        for store in (b, c):
            # two watches: the ipcache entry may arrive before its identity
            await eventually(lambda s=store: "10.1.0.5" in s.ipcache, 2.0, "ipcache entry")
            await eventually(lambda s=store: number in s.identities, 2.0, "identity")
            assert store.identities[number] == {"k8s:app": "deathstar"}
            assert store.ipcache["10.1.0.5"] == IpEntry(
                "10.1.0.5", number, a.config.node_ips[0], "node-a", "empire", "deathstar-0"
            )
            await eventually(lambda s=store: set(s.nodes) == EVERY_NODE, 2.0, "every node")
        assert IdentityChange(number, {"k8s:app": "deathstar"}) in seen
        assert any(isinstance(ch, IpChange) and ch.ip == "10.1.0.5" for ch in seen)
        # what the BPF ipcache sync will read, in the shape policy.identity.IpCache takes
        assert {str(k): v for k, v in c.ipcache_prefixes().items()} == {"10.1.0.5/32": number}

        await a.delete_ip("10.1.0.5")
        await eventually(lambda: "10.1.0.5" not in b.ipcache, 2.0, "ipcache delete")
        assert IpChange("10.1.0.5", None) in seen


async def test_changes_as_an_async_iterator(config: Config) -> None:
    async with running(config("node-a"), config("node-b")) as (a, b):
        stream = b.changes()
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the iterator is registered before anything happens
        number = await a.allocate({"app": "x"})
        first = await asyncio.wait_for(pending, 2.0)
        assert first == IdentityChange(number, {"app": "x"})
        await stream.aclose()


async def test_a_partitioned_agent_lists_again_and_sees_the_deletions_it_missed(
    config: Config, etcd: EtcdServer
) -> None:
    async with CuttableLink((etcd.host, etcd.port)) as link:
        async with running(config("node-a"), config("node-b", port=link.port)) as (a, b):
            n1 = await a.allocate({"app": "one"})
            await a.upsert_ip("10.1.0.1", n1)
            await a.upsert_ip("10.1.0.2", n1)
            await eventually(lambda: {"10.1.0.1", "10.1.0.2"} <= set(b.ipcache), 2.0)
            lists_before = b.watches["ipcache"].lists
            seen: list[Change] = []
            b.subscribe(seen.append)

            link.cut()
            await a.delete_ip("10.1.0.1")  # b cannot see this happen
            await a.upsert_ip("10.1.0.3", n1)
            await asyncio.sleep(0.3)
            assert "10.1.0.1" in b.ipcache  # still its old view
            link.heal()

            took = await eventually(lambda: "10.1.0.1" not in b.ipcache, 5.0, "re-list")
            await eventually(lambda: "10.1.0.3" in b.ipcache, 2.0)
            assert b.watches["ipcache"].lists > lists_before
            assert b.watches["ipcache"].errors >= 1
            assert IpChange("10.1.0.1", None, relisted=True) in seen
            assert took < 5.0


async def test_etcd_restarts_are_survived_with_a_fresh_list(
    config: Config, etcd: EtcdServer
) -> None:
    async with running(config("node-a"), config("node-b")) as (a, b):
        n1 = await a.allocate({"app": "before"})
        await eventually(lambda: n1 in b.identities, 2.0)
        lists_before = b.watches["identities"].lists

        await asyncio.to_thread(etcd.restart, kill=True)

        # a writes as soon as etcd answers again; b's watch broke and lists again
        async def allocate_after() -> int:
            for _ in range(100):
                try:
                    return await a.allocate({"app": "after"})
                except Exception:  # noqa: BLE001 - etcd still coming back
                    await asyncio.sleep(0.05)
            raise AssertionError("etcd never came back for node-a")

        n2 = await allocate_after()
        await eventually(lambda: n2 in b.identities, 5.0, "identity after restart")
        assert b.identities[n1] == {"app": "before"}
        assert b.watches["identities"].lists > lists_before
        await eventually(lambda: "node-a" in b.nodes and "node-b" in a.nodes, 2.0)


async def test_a_compaction_between_list_and_watch_ends_in_a_new_list(
    etcd: EtcdServer, prefix: str
) -> None:
    """The watch from the listed revision finds it compacted, fails, and the loop
    lists again from a fresh revision: the key deleted meanwhile is reported gone."""
    layout = Layout(prefix)
    writer = Etcd(etcd.host, etcd.port, rate=0)
    await writer.connect()
    await writer.put(layout.ip_key("10.9.0.1"), b"{}")
    await writer.put(layout.ip_key("10.9.0.2"), b"{}")

    class CompactAfterFirstList(Etcd):
        async def list_prefix(self, prefix: bytes, **kw: object) -> tuple[list, int]:  # type: ignore[override]
            kvs, revision = await super().list_prefix(prefix)
            if self.requests["range"] == 1:
                await writer.delete(layout.ip_key("10.9.0.1"))
                await writer.put(layout.ip_key("10.9.0.3"), b"{}")
                await asyncio.to_thread(etcd.compact)
            return kvs, revision

    kv = CompactAfterFirstList(etcd.host, etcd.port, rate=0)
    await kv.connect()
    delivered: list[tuple[list[KeyChange], bool]] = []
    watch = PrefixWatch(
        kv, layout.ips, lambda ch, r: delivered.append((ch, r)), Backoff(0.01, 0.05)
    )
    task = asyncio.create_task(watch.run())
    try:
        await eventually(lambda: watch.lists == 2, 5.0, "a second list")
        assert "compacted" in watch.last_error
        assert sorted(watch.mirror.kvs) == [layout.ip_key("10.9.0.2"), layout.ip_key("10.9.0.3")]
        second_list = delivered[1]
        assert second_list[1] is True
        assert KeyChange(layout.ip_key("10.9.0.1"), None, b"{}") in second_list[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()
        await writer.close()


async def test_a_watch_from_a_compacted_revision_raises(etcd: EtcdServer, prefix: str) -> None:
    kv = Etcd(etcd.host, etcd.port, rate=0)
    await kv.connect()
    try:
        key = f"{prefix}/x".encode()
        first = await kv.put(key, b"1")
        await kv.put(key, b"2")
        await asyncio.to_thread(etcd.compact)
        with pytest.raises(KvCompacted):
            async for _ in kv.watch(key, first):
                pass
    finally:
        await kv.close()


async def test_lists_are_paginated_at_one_revision(etcd: EtcdServer, prefix: str) -> None:
    kv = Etcd(etcd.host, etcd.port, rate=0)
    await kv.connect()
    try:
        base = f"{prefix}/many/".encode()
        for i in range(10):
            await kv.put(base + str(i).encode(), b"v")
        before = kv.requests["range"]
        kvs, revision = await kv.list_prefix(base, page=3)
        assert [x.key for x in kvs] == sorted(base + str(i).encode() for i in range(10))
        assert kv.requests["range"] - before == 4
        assert revision >= max(x.mod_revision for x in kvs)
    finally:
        await kv.close()


async def test_nodes_are_registered_and_leave_with_their_agent(config: Config) -> None:
    async with running(config("node-a", alloc_cidr="10.1.0.0/16"), config("node-b")) as (a, b):
        await eventually(lambda: "node-a" in b.nodes, 2.0)
        assert b.nodes["node-a"].alloc_cidr == "10.1.0.0/16"
        seen: list[Change] = []
        b.subscribe(seen.append)
        await a.stop()  # a clean stop revokes the lease: the node key goes at once
        await eventually(lambda: "node-a" not in b.nodes, 2.0)
        assert NodeChange("node-a", None) in seen


async def test_the_request_budget_holds_against_the_real_etcd(
    etcd: EtcdServer, prefix: str
) -> None:
    kv = Etcd(etcd.host, etcd.port, rate=20, burst=2)
    await kv.connect()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(kv.put(f"{prefix}/b/{i}".encode(), b"v") for i in range(12)))
        assert loop.time() - started >= 0.45  # 2 at once, then 10 at 20 a second
        assert kv.requests["put"] == 12 and kv.bucket.waited > 0
    finally:
        await kv.close()


async def test_status_tells_what_the_store_did(config: Config) -> None:
    store = ClusterStore(config("node-a"))
    with pytest.raises(RuntimeError, match="start"):
        await store.allocate({"app": "x"})
    async with running(config("node-b")) as (b,):
        number = await b.allocate({"app": "x"})
        await eventually(lambda: number in b.identities, 2.0)
        status = b.status()
        assert status["synced"] is True and status["node"] == "node-b"
        assert status["identities"] == 1 and status["nodes"] == 1
        assert status["requests"]["txn"] == 1 and status["requests"]["watch"] == 3
        assert status["allocator"]["created"] == 1
        assert set(status["watches"]) == {"identities", "ipcache", "nodes"}
