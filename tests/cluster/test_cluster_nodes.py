"""Three nodes on one machine (``tests/support/cluster_nodes.py``), each with its real
agent, one real etcd and the Kubernetes API double: what a cluster of agents
must agree on, enforce and survive.

One cluster serves the whole module (starting three agents takes a while); the tests
run in file order, and the last one kills an agent.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes_asyncio import client

from l7proxy.agent.cluster import identities_digest, ipcache_digest
from l7proxy.cluster.keys import IpEntry, Layout, decode_labels, encode_labels, with_source
from l7proxy.cluster.kv import Etcd
from tests.kube.objects import ccnp, cnp
from tests.support.cluster_nodes import Pod, TestCluster, test_cluster

pytestmark = [pytest.mark.root, pytest.mark.cluster]

# Cilium's Star Wars rule: only the empire may land, and only by POST /v1/request-landing.
LANDING = {
    "endpointSelector": {"matchLabels": {"class": "deathstar"}},
    "ingress": [
        {
            "fromEndpoints": [{"matchLabels": {"org": "empire"}}],
            "toPorts": [
                {
                    "ports": [{"port": "80", "protocol": "TCP"}],
                    "rules": {"http": [{"method": "POST", "path": "/v1/request-landing"}]},
                }
            ],
        }
    ],
}
# L3/L4 only: the xwing's port 80 is open to tiefighters, whatever namespace, and to no one else.
XWING_L4 = {
    "endpointSelector": {"matchLabels": {"class": "xwing"}},
    "ingress": [
        {
            "fromEndpoints": [{"matchLabels": {"class": "tiefighter"}}],
            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
        }
    ],
}


class Fleet:
    def __init__(self, cluster: TestCluster):
        self.cluster = cluster
        self.deathstar = cluster.add_pod(
            "node-1", "deathstar", {"org": "empire", "class": "deathstar"}, namespace="empire"
        )
        self.tiefighter = cluster.add_pod(
            "node-2", "tiefighter", {"org": "empire", "class": "tiefighter"}, namespace="empire"
        )
        self.xwing = cluster.add_pod(
            "node-3", "xwing", {"org": "alliance", "class": "xwing"}, namespace="empire"
        )
        self.pods = [self.deathstar, self.tiefighter, self.xwing]


@pytest.fixture(scope="module")
def cluster() -> Iterator[TestCluster]:
    # node-1 also collects identities no node refers to any more (after 2 s).
    gc = ["--identity-gc-interval", "1", "--identity-gc-grace", "2"]
    with test_cluster(3, {"node-1": gc}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def fleet(cluster: TestCluster) -> Fleet:
    fleet = Fleet(cluster)
    for pod in fleet.pods:
        cluster.serve_http(pod)
    custom = client.CustomObjectsApi(cluster.kubeclient)
    cluster.run(
        custom.create_namespaced_custom_object(
            "cilium.io", "v2", "empire", "ciliumnetworkpolicies", cnp("landing", LANDING)
        )
    )
    cluster.run(
        custom.create_cluster_custom_object(
            "cilium.io", "v2", "ciliumclusterwidenetworkpolicies", ccnp("xwing-l4", XWING_L4)
        )
    )
    cluster.wait_attached(*fleet.pods)
    for node in cluster.nodes.values():  # every node has read both policies
        node.agent.wait_status(
            lambda s: (
                {p["name"] for p in s["policies"]} == {"empire/landing", "xwing-l4"}
                and s["maps_in_sync"]
            ),
            15,
            f"the policies in force on {node.name}",
        )
    return fleet


def etcd_view(cluster: TestCluster) -> tuple[dict[int, dict[str, str]], dict[str, IpEntry]]:
    """Identities and ipcache, read from etcd by the test itself."""
    assert cluster.etcd is not None
    layout = Layout(cluster.prefix, "default")
    kv = Etcd(cluster.etcd.host, cluster.etcd.port, rate=0)

    async def read() -> tuple[list, list]:
        await kv.connect()
        try:
            ids, _ = await kv.list_prefix(layout.ids)
            ips, _ = await kv.list_prefix(layout.ips)
            return ids, ips
        finally:
            await kv.close()

    ids, ips = cluster.run(read())
    identities = {int(layout.number_of(i.key) or 0): decode_labels(i.value.decode()) for i in ids}
    ipcache = {IpEntry.from_json(i.value).ip: IpEntry.from_json(i.value) for i in ips}
    return identities, ipcache


def cluster_status(cluster: TestCluster, node: str) -> dict:
    status = cluster.nodes[node].status()
    assert status is not None and status["cluster"] is not None
    return status["cluster"]


def wait_agreement(cluster: TestCluster, timeout: float = 10) -> float:
    """Seconds until every node's identities and ipcache are etcd's."""
    started = time.monotonic()
    while True:
        identities, ipcache = etcd_view(cluster)
        want = (
            identities_digest(identities),
            ipcache_digest({ip: e.identity for ip, e in ipcache.items()}),
        )
        seen = {
            name: (
                cluster_status(cluster, name)["identities_digest"],
                cluster_status(cluster, name)["ipcache_digest"],
            )
            for name in cluster.nodes
            if cluster.nodes[name].agent.agent is not None
        }
        if all(v == want for v in seen.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            counts = {
                name: (
                    cluster_status(cluster, name)["identities"],
                    cluster_status(cluster, name)["ipcache_by_node"],
                )
                for name in seen
            }
            raise AssertionError(
                f"nodes disagree with etcd {want}: {seen}; etcd holds {len(identities)} "
                f"identities and {sorted((e.node, e.ip) for e in ipcache.values())}, "
                f"the nodes {counts}"
            )
        time.sleep(0.1)


def pod_labels(pod: Pod) -> dict[str, str]:
    """What every agent stores for a pod (``kube.objects.endpoint_labels``, Cilium's form)."""
    return with_source(
        {
            **pod.labels,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.cilium.k8s.policy.serviceaccount": "default",
        }
    )


# ---------------------------------------------------------------------------- tests


def test_every_node_agrees_on_every_identity(cluster: TestCluster, fleet: Fleet) -> None:
    wait_agreement(cluster)
    identities, ipcache = etcd_view(cluster)
    for pod in fleet.pods:
        number = cluster.identity_of(pod)
        assert 256 <= number <= 65535
        assert identities[number] == pod_labels(pod)
        assert ipcache[pod.ip] == IpEntry(
            pod.ip, number, cluster.nodes[pod.node].ip, pod.node, pod.namespace, pod.name
        )
    assert len(set(map(cluster.identity_of, fleet.pods))) == 3
    for name in cluster.nodes:
        assert sorted(cluster_status(cluster, name)["nodes"]) == ["node-1", "node-2", "node-3"]


def test_l7_and_l4_policies_on_pods_of_other_nodes_are_enforced_where_they_land(
    cluster: TestCluster, fleet: Fleet
) -> None:
    ds, tie, xwing = fleet.deathstar, fleet.tiefighter, fleet.xwing
    # L7 on node-1, for a client on node-2: its identity came through etcd
    assert cluster.curl(tie, "POST", ds, "/v1/request-landing") == 200
    assert cluster.curl(tie, "PUT", ds, "/v1/exhaust-port") == 403
    # the alliance (node-3) matches no rule: dropped at L3, no answer at all
    assert cluster.curl(xwing, "POST", ds, "/v1/request-landing") is None
    # L3/L4 on node-3: tiefighters (node-2) get through, the deathstar (node-1) does not
    assert cluster.curl(tie, "GET", xwing, "/v1/") == 200
    assert cluster.curl(ds, "GET", xwing, "/v1/") is None
    # the node that judged says whom it saw, by the identity node-2 allocated
    flows = cluster.nodes["node-1"].agent.flows(
        lambda r: r.get("type") == "l7" and r["source"]["ip"] == tie.ip
    )
    seen = next(r for r in flows if r.get("type") == "l7" and r["source"]["ip"] == tie.ip)
    assert seen["source"]["identity"] == cluster.identity_of(tie)
    assert seen["source"]["labels"]["class"] == "tiefighter"


def test_a_new_pod_is_known_by_identity_on_the_other_nodes_within_seconds(
    cluster: TestCluster, fleet: Fleet
) -> None:
    interceptor = cluster.add_pod(
        "node-3", "interceptor", {"org": "empire", "class": "tiefighter"}, namespace="empire"
    )
    started = time.monotonic()
    cluster.wait_attached(interceptor)
    # its label set is the tiefighter's: the same cluster-wide number, on another node
    assert cluster.identity_of(interceptor) == cluster.identity_of(fleet.tiefighter)
    # node-1 lets it land as soon as it knows its address
    took = cluster.wait_answer(interceptor, "POST", fleet.deathstar, "/v1/request-landing", 200)
    assert time.monotonic() - started < 15
    assert took < 10
    wait_agreement(cluster)


def test_a_policy_object_with_an_error_gets_a_status_and_changes_nothing(
    cluster: TestCluster, fleet: Fleet
) -> None:
    revisions = {n: cluster.nodes[n].status()["policy_revision"] for n in cluster.nodes}
    custom = client.CustomObjectsApi(cluster.kubeclient)
    bad = {"endpointSelector": {}, "ingress": [{"fromEndpoints": "everyone"}]}
    cluster.run(
        custom.create_namespaced_custom_object(
            "cilium.io", "v2", "empire", "ciliumnetworkpolicies", cnp("broken", bad)
        )
    )
    deadline = time.monotonic() + 15
    while True:
        obj = cluster.run(
            custom.get_namespaced_custom_object(
                "cilium.io", "v2", "empire", "ciliumnetworkpolicies", "broken"
            )
        )
        nodes = (obj.get("status") or {}).get("nodes") or {}
        if set(nodes) == set(cluster.nodes):
            break
        assert time.monotonic() < deadline, f"status of every node, got {nodes}"
        time.sleep(0.2)
    for name, said in nodes.items():
        assert said["ok"] is False
        assert "spec.ingress[0].fromEndpoints: expected a list, got str" in said["error"], name
    for name, node in cluster.nodes.items():
        assert node.status()["policy_revision"] == revisions[name]
    assert cluster.curl(fleet.tiefighter, "PUT", fleet.deathstar, "/v1/exhaust-port") == 403
    assert cluster.curl(fleet.xwing, "POST", fleet.deathstar, "/v1/request-landing") is None


def relists_gone(status: dict | None) -> int:
    """How often an agent listed Kubernetes again after a 410 Gone, over its watches."""
    return sum(w["relists_gone"] for w in (status or {})["kubernetes"]["watches"].values())


class Prober:
    """Asks the same two questions over and over from a thread, and keeps every answer
    (the one that gets no answer waits 0.5 s for it)."""

    def __init__(self, cluster: TestCluster, fleet: Fleet):
        self.cluster, self.fleet = cluster, fleet
        self.answers: list[tuple[int | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        f = self.fleet
        while not self._stop.is_set():
            allowed = self.cluster.curl(f.tiefighter, "POST", f.deathstar, "/v1/request-landing")
            denied = self.cluster.curl(
                f.xwing, "POST", f.deathstar, "/v1/request-landing", max_time=0.5
            )
            self.answers.append((allowed, denied))
            time.sleep(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_an_etcd_restart_and_a_compaction_are_survived_without_a_policy_gap(
    cluster: TestCluster, fleet: Fleet
) -> None:
    assert cluster.etcd is not None
    lists_before = {
        n: cluster_status(cluster, n)["store"]["watches"]["ipcache"]["lists"] for n in cluster.nodes
    }
    with Prober(cluster, fleet) as prober:
        time.sleep(0.5)
        cluster.etcd.restart(down_for=1.5)
        for name in cluster.nodes:  # every agent lists again
            cluster.nodes[name].agent.wait_status(
                lambda s, n=name: (
                    s["cluster"]["store"]["watches"]["ipcache"]["lists"] > lists_before[n]
                ),
                20,
                f"{name} re-listed after the restart",
            )
        lists_after_restart = {
            n: cluster_status(cluster, n)["store"]["watches"]["ipcache"]["lists"]
            for n in cluster.nodes
        }
        cluster.etcd.compact()
        # A compaction ends no open watch. The API server's watches are resumed from
        # their resourceVersion, which is gone now: 410, and every agent lists again.
        gone_before = {n: relists_gone(cluster.nodes[n].status()) for n in cluster.nodes}
        assert cluster.kube_api is not None
        cluster.kube_api.drop_watches()
        for name in cluster.nodes:
            cluster.nodes[name].agent.wait_status(
                lambda s, n=name: relists_gone(s) > gone_before[n],
                20,
                f"{name} re-listed Kubernetes after 410 Gone",
            )
        wait_agreement(cluster, 20)
        time.sleep(0.5)
    assert len(prober.answers) >= 5
    # through the restart and the compaction, not one answer changed
    assert set(prober.answers) == {(200, None)}, prober.answers
    for name in cluster.nodes:
        assert (
            cluster_status(cluster, name)["store"]["watches"]["ipcache"]["lists"]
            >= (lists_after_restart[name])
        )


def test_an_agent_taken_over_on_its_node_keeps_its_keys(cluster: TestCluster, fleet: Fleet) -> None:
    """A new agent on node-2 takes over from the running one (docs/restarts.md): it writes
    the same keys on its own lease, the old agent stops writing and hands its lease over,
    and the new one revokes it once no key it owns is on it: no other node ever sees
    node-2's pods go."""
    node = cluster.nodes["node-2"]
    old = node.agent.agent
    assert old is not None
    old_lease = int(cluster_status(cluster, "node-2")["store"]["lease"], 16)
    etcd_before, _ = etcd_view(cluster)
    events: list[tuple[bool, str, int]] = []
    watching, handover_done = threading.Event(), threading.Event()
    watcher = threading.Thread(
        target=watch_keys, args=(cluster, events, watching, handover_done), daemon=True
    )
    watcher.start()
    assert watching.wait(10)
    try:
        node.agent.agent = node.agent.spawn(
            [*node.agent.l7proxy, "--state-dir", str(node.agent.store.root), "run"]
            + node.agent_args,
            "agent running",
            "agent-successor",
            timeout=60,
        )
        assert old.wait(timeout=60) == 0  # drained and gone
        new_status = node.agent.wait_status(
            lambda s: (
                s
                and s["pid"] == node.agent.agent.pid
                and s["cluster"]["synced"]
                and s["cluster"]["store"]["taking_over"] == []
            ),
            15,
            "the successor's status, its takeover complete",
        )
    finally:
        handover_done.set()  # the watcher reads etcd's events up to now, then ends
        watcher.join(30)
    assert not watcher.is_alive()
    new_lease = int(new_status["cluster"]["store"]["lease"], 16)
    assert new_lease not in (0, old_lease)
    tie_key = f"{cluster.prefix}/ip/v1/default/{fleet.tiefighter.ip}"
    assert (False, tie_key, new_lease) in events  # the successor wrote node-2's keys...
    assert [key for deleted, key, _ in events if deleted] == []  # ...and none went away
    layout = Layout(cluster.prefix, "default")
    tie_ref = layout.ref_key(encode_labels(pod_labels(fleet.tiefighter)), "node-2").decode()
    assert etcd_leases(cluster, [tie_key, tie_ref, layout.node_key("node-2").decode()]) == {
        new_lease
    }  # every key of node-2 is on the successor's lease, and the old lease is gone
    assert etcd_lease_alive(cluster, old_lease) is False
    identities, ipcache = etcd_view(cluster)
    assert identities == etcd_before
    assert ipcache[fleet.tiefighter.ip].node == "node-2"
    assert cluster.curl(fleet.tiefighter, "POST", fleet.deathstar, "/v1/request-landing") == 200
    wait_agreement(cluster)


def watch_keys(
    cluster: TestCluster,
    events: list[tuple[bool, str, int]],
    watching: threading.Event,
    done: threading.Event,
    limit: float = 120.0,
) -> None:
    """Every (deleted, key, lease) event under the cluster's prefix from when ``watching``
    is set until ``done`` is: then a marker key is written, and the watch ends when its
    event arrives (etcd sends events in order: none before it can be missed)."""
    assert cluster.etcd is not None
    kv = Etcd(cluster.etcd.host, cluster.etcd.port, rate=0)
    marker = f"{cluster.prefix}/test-marker-{secrets.token_hex(3)}"

    async def watch() -> None:
        async for batch in kv.watch(cluster.prefix.encode(), revision + 1):
            watching.set()  # the first reply is the watch's creation
            events.extend((e.deleted, e.kv.key.decode(), e.kv.lease) for e in batch)
            if any(e.kv.key.decode() == marker for e in batch):
                return

    async def main() -> None:
        nonlocal revision
        await kv.connect()
        try:
            _, revision = await kv.list_prefix(cluster.prefix.encode(), keys_only=True)
            async with asyncio.timeout(limit):
                task = asyncio.create_task(watch())
                while not done.is_set() and not task.done():
                    await asyncio.sleep(0.05)
                await kv.put(marker.encode(), b"")
                await task
            del events[-1]  # the marker
        finally:
            await kv.close()

    revision = 0
    asyncio.run(main())


def etcd_leases(cluster: TestCluster, keys: list[str]) -> set[int | None]:
    """The lease each key is on now (None: the key is gone)."""
    assert cluster.etcd is not None
    kv = Etcd(cluster.etcd.host, cluster.etcd.port, rate=0)

    async def read() -> set[int | None]:
        await kv.connect()
        try:
            found = [await kv.get(key.encode()) for key in keys]
            return {f.lease if f is not None else None for f in found}
        finally:
            await kv.close()

    return cluster.run(read())


def etcd_lease_alive(cluster: TestCluster, lease: int) -> bool:
    assert cluster.etcd is not None
    kv = Etcd(cluster.etcd.host, cluster.etcd.port, rate=0)

    async def read() -> bool:
        await kv.connect()
        try:
            ttl, _ = await kv.lease_keys(lease)
            return ttl > 0
        finally:
            await kv.close()

    return cluster.run(read())


def test_a_killed_agent_s_keys_and_its_pods_addresses_expire(
    cluster: TestCluster, fleet: Fleet
) -> None:
    xwing_number = cluster.identity_of(fleet.xwing)
    identities, _ = etcd_view(cluster)
    assert xwing_number in identities
    cluster.kill_agent("node-3")
    started = time.monotonic()
    # node-3's lease (3 s) expires: its node key and its pods' addresses leave etcd
    # and every other node's ipcache
    node3_pods = {p.ip for p in cluster.nodes["node-3"].pods.values()}
    for name in ("node-1", "node-2"):
        cluster.nodes[name].agent.wait_status(
            lambda s: "node-3" not in s["cluster"]["nodes"],
            15,
            f"node-3 gone from {name}",
        )
    _, ipcache = etcd_view(cluster)
    assert not node3_pods & set(ipcache)
    wait_agreement(cluster)
    assert time.monotonic() - started < 15
    # the xwing's label set has no reference left: node-1 collects its identity after
    # the grace period; the tiefighter's is still referred to by node-2 and stays
    deadline = time.monotonic() + 15
    while xwing_number in etcd_view(cluster)[0]:
        assert time.monotonic() < deadline, "the xwing's identity was not collected"
        time.sleep(0.2)
    assert cluster.identity_of(fleet.tiefighter) in etcd_view(cluster)[0]
    wait_agreement(cluster)
    assert encode_labels(pod_labels(fleet.xwing)) not in {
        encode_labels(v) for v in etcd_view(cluster)[0].values()
    }
