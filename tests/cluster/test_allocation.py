"""Cluster-wide allocation against a real etcd: agents racing for the same and
for different label sets, on separate connections and in separate processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from l7proxy.cluster.allocator import AllocationError
from l7proxy.cluster.keys import LAST_CLUSTER_IDENTITY, Layout
from l7proxy.cluster.kv import Etcd
from l7proxy.cluster.store import ClusterConfig
from tests.cluster.conftest import running
from tests.support import REPO
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.cluster

Config = Callable[..., ClusterConfig]


async def keys_under(etcd: EtcdServer, prefix: bytes) -> dict[bytes, bytes]:
    kv = Etcd(etcd.host, etcd.port, rate=0)
    await kv.connect()
    try:
        kvs, _ = await kv.list_prefix(prefix)
        return {x.key: x.value for x in kvs}
    finally:
        await kv.close()


async def test_eight_agents_allocating_one_label_set_at_once_get_one_number(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    labels = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default"}
    async with running(*(config(f"node-{i}") for i in range(8))) as stores:
        numbers = await asyncio.gather(*(s.allocate(labels) for s in stores))
        assert len(set(numbers)) == 1
        number = numbers[0]
        assert 256 <= number <= LAST_CLUSTER_IDENTITY
        layout = Layout(prefix)
        ids = await keys_under(etcd, layout.ids)
        refs = await keys_under(etcd, layout.values)
        assert ids == {
            layout.id_key(number): b"k8s:app=web;k8s:io.kubernetes.pod.namespace=default;"
        }
        assert sorted(refs) == sorted(
            layout.ref_key("k8s:app=web;k8s:io.kubernetes.pod.namespace=default;", f"node-{i}")
            for i in range(8)
        )
        assert set(refs.values()) == {str(number).encode()}
        # one agent created the id key; the others lost the race and joined it
        assert sum(s.allocator.stats.created for s in stores) == 1


async def test_many_label_sets_from_many_agents_never_share_a_number(config: Config) -> None:
    label_sets = [{"app": f"svc-{i}", "tier": str(i % 3)} for i in range(120)]
    async with running(*(config(f"node-{i}") for i in range(4))) as stores:
        # every agent allocates every label set, each from its own starting point, all at once
        orders = [label_sets[i * 30 :] + label_sets[: i * 30] for i in range(4)]
        results = await asyncio.gather(
            *(
                asyncio.gather(*(s.allocate(ls) for ls in order))
                for s, order in zip(stores, orders, strict=True)
            )
        )
        by_set = [
            {tuple(sorted(ls.items())): n for ls, n in zip(order, got, strict=True)}
            for order, got in zip(orders, results, strict=True)
        ]
        assert all(m == by_set[0] for m in by_set), "a label set got two numbers"
        assert len(set(by_set[0].values())) == len(label_sets), "two label sets share a number"


ALLOCATE_IN_A_PROCESS = """
import asyncio, json, sys
from l7proxy.cluster.store import ClusterConfig, ClusterStore
host, port, prefix, node = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def main():
    store = ClusterStore(ClusterConfig(node=node, etcd=(host, port), prefix=prefix, rate=0))
    await store.start(timeout=20)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # go
    sets = [{"app": f"p-{i}"} for i in range(30)]
    numbers = await asyncio.gather(*(store.allocate(s) for s in sets))
    print(json.dumps(numbers))
    await store.stop(revoke=False)
asyncio.run(main())
"""


def test_agents_in_separate_processes_agree(etcd: EtcdServer, prefix: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                ALLOCATE_IN_A_PROCESS,
                etcd.host,
                str(etcd.port),
                prefix,
                f"p{i}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # as close to "at once" as three processes get
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    numbers = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert numbers[0] == numbers[1] == numbers[2]
    assert len(set(numbers[0])) == 30


async def test_a_node_refers_once_however_many_local_users_and_releases_at_the_last(
    config: Config, etcd: EtcdServer, prefix: str
) -> None:
    labels = {"app": "web"}
    async with running(config("node-1")) as (store,):
        a = await store.allocate(labels)
        b = await store.allocate(labels)
        assert a == b and store.allocator.stats.transactions == 1
        layout = Layout(prefix)
        ref = layout.ref_key("app=web;", "node-1")
        await store.release(labels)
        assert ref in await keys_under(etcd, layout.values)
        await store.release(labels)
        assert ref not in await keys_under(etcd, layout.values)
        # the id key stays until the collector takes it
        assert layout.id_key(a) in await keys_under(etcd, layout.ids)


async def test_a_full_range_is_an_error_not_a_duplicate(config: Config) -> None:
    async with running(config("node-1")) as (store,):
        store.allocator.first, store.allocator.last = 256, 258
        got = [await store.allocate({"app": str(i)}) for i in range(3)]
        assert sorted(got) == [256, 257, 258]
        with pytest.raises(AllocationError, match="full"):
            await store.allocate({"app": "one-too-many"})
