"""The Kubernetes source: list and watch through the official client, against the
API test double on a real etcd.

Each test drives the API the way a user (``kubectl``) would, with a second client,
and reads what the agent's source made of it: endpoints, policies, the status
written back on policy objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from l7proxy.kube.source import KubeSource, api_client
from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.model import INGRESS
from tests.cluster.conftest import eventually
from tests.kube.objects import LANDING, ccnp, cnp, namespace, pod
from tests.support.kube_api_double import KubeApiDouble, running_kube_api

pytestmark = pytest.mark.cluster

CNPS = ("cilium.io", "v2", "ciliumnetworkpolicies")
CCNPS = ("cilium.io", "v2", "ciliumclusterwidenetworkpolicies")


@asynccontextmanager
async def source_on(
    kube_api: KubeApiDouble, tmp_path: Path, node: str = "node-1", **options
) -> AsyncIterator[tuple[KubeSource, list[str]]]:
    """The agent's source for ``node``, and the changes it announced, in order."""
    changes: list[str] = []
    api = await api_client(kube_api.write_kubeconfig(tmp_path / f"{node}.kubeconfig"))
    source = KubeSource(
        api, node, on_change=changes.append, backoff_base=0.05, backoff_cap=0.3, **options
    )
    try:
        assert await source.start(timeout=10)
        yield source, changes
    finally:
        await source.stop()
        await api.close()


def policy_names(source: KubeSource) -> list[str]:
    return [p.key for p in source.policies()]


async def test_pods_namespaces_and_policies_are_listed_then_watched(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    core, custom = client.CoreV1Api(kubeclient), client.CustomObjectsApi(kubeclient)
    await core.create_namespace(namespace("empire", team="sith"))
    await core.create_namespaced_pod(
        "empire",
        pod(
            "deathstar",
            node="node-1",
            ip="10.1.0.5",
            labels={"org": "empire", "class": "deathstar"},
        ),
    )
    await core.create_namespaced_pod(
        "empire", pod("elsewhere", node="node-2", ip="10.2.0.5", labels={})
    )
    await custom.create_namespaced_custom_object(
        *CNPS[:2], "empire", CNPS[2], cnp("landing", LANDING)
    )

    async with source_on(kube_api, tmp_path) as (source, _):
        # listed: only this node's pods; identity labels carry the namespace and its labels
        [ep] = source.endpoints()
        assert (ep.name, ep.ip) == ("empire/deathstar", "10.1.0.5")
        assert ep.labels == {
            "org": "empire",
            "class": "deathstar",
            "io.kubernetes.pod.namespace": "empire",
            "io.cilium.k8s.namespace.labels.team": "sith",
            "io.cilium.k8s.policy.serviceaccount": "default",
        }
        assert policy_names(source) == ["empire/landing"]

        # watched: a new pod (without an IP yet, then with one), a namespace relabelled
        await core.create_namespaced_pod(
            "empire", pod("tiefighter", node="node-1", ip=None, labels={"org": "empire"})
        )
        await eventually(lambda: "empire/tiefighter" in source.pods, what="the pending pod")
        assert [e.name for e in source.endpoints()] == ["empire/deathstar"]  # no IP, no endpoint
        await core.replace_namespaced_pod(
            "tiefighter",
            "empire",
            pod("tiefighter", node="node-1", ip="10.1.0.6", labels={"org": "empire"}),
        )
        await eventually(
            lambda: len(source.endpoints()) == 2, what="the tiefighter once it has an IP"
        )
        await core.replace_namespace("empire", namespace("empire", team="imperial"))
        await eventually(
            lambda: (
                {e.labels["io.cilium.k8s.namespace.labels.team"] for e in source.endpoints()}
                == {"imperial"}
            ),
            what="the namespace's new label on every pod",
        )
        # a clusterwide policy joins, the namespaced one goes
        await custom.create_cluster_custom_object(*CCNPS[:2], CCNPS[2], ccnp("everywhere", LANDING))
        await custom.delete_namespaced_custom_object(*CNPS[:2], "empire", CNPS[2], "landing")
        await eventually(lambda: policy_names(source) == ["everywhere"], what="CCNP in, CNP out")
        await core.delete_namespaced_pod("deathstar", "empire")
        await eventually(lambda: [e.name for e in source.endpoints()] == ["empire/tiefighter"])
        watches = source.status()["watches"]
        assert all(w["lists"] == 1 and w["relists_gone"] == 0 for w in watches.values())


async def test_a_relist_after_410_changes_policy_in_one_step(
    etcd, kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(kubeclient)
    await custom.create_namespaced_custom_object(*CNPS[:2], "empire", CNPS[2], cnp("old", LANDING))
    async with source_on(kube_api, tmp_path) as (source, changes):
        seen: list[list[str]] = []
        source.on_change = lambda what: seen.append(policy_names(source))
        # The API server the agent uses goes away; meanwhile, through another one on
        # the same etcd, the policy is replaced, and etcd compacts the history.
        kube_api.refusing = True
        kube_api.drop_watches()
        async with running_kube_api(etcd, kube_api.prefix) as other:
            other.token = kube_api.token
            other_client = await api_client(other.write_kubeconfig(tmp_path / "other"))
            async with other_client:
                other_custom = client.CustomObjectsApi(other_client)
                await other_custom.create_namespaced_custom_object(
                    *CNPS[:2], "empire", CNPS[2], cnp("new", LANDING)
                )
                await other_custom.delete_namespaced_custom_object(
                    *CNPS[:2], "empire", CNPS[2], "old"
                )
                await other.compact()
        assert policy_names(source) == ["empire/old"]  # the last known policy stays meanwhile
        kube_api.refusing = False
        await eventually(lambda: policy_names(source) == ["empire/new"], what="the re-list")
        # one step from old to new: never no policy, never both
        assert seen == [["empire/new"]]
        stats = source.status()["watches"]["CiliumNetworkPolicy"]
        assert stats["relists_gone"] == 1 and stats["lists"] == 2
        assert stats["errors"] >= 1  # the outage: 503s, each retried after a back-off


async def test_a_bad_policy_gets_a_status_error_and_changes_nothing(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(kubeclient)
    bad_port = {
        "endpointSelector": {},
        "ingress": [{"toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}],
    }
    await custom.create_namespaced_custom_object(
        *CNPS[:2], "empire", CNPS[2], cnp("landing", LANDING)
    )
    async with source_on(kube_api, tmp_path) as (source, _):

        async def node_status(name: str) -> dict:
            obj = await custom.get_namespaced_custom_object(*CNPS[:2], "empire", CNPS[2], name)
            return obj.get("status", {}).get("nodes", {}).get("node-1", {})

        async def status_says(name: str, ok: bool) -> dict:
            for _ in range(200):
                entry = await node_status(name)
                if entry.get("ok") is ok:
                    return entry
                await asyncio.sleep(0.02)
            raise AssertionError(f"status of {name} never said ok={ok}: {await node_status(name)}")

        assert (await status_says("landing", True)).get("error") is None
        in_force = source.policies()

        # a new object with a bad spec brings nothing
        await custom.create_namespaced_custom_object(
            *CNPS[:2], "empire", CNPS[2], cnp("broken", bad_port)
        )
        entry = await status_says("broken", False)
        assert entry["error"] == (
            "k8s CiliumNetworkPolicy/empire/broken: spec.ingress[0].toPorts[0].ports[0].port: "
            "expected a port number, got 'http' (named ports are not supported)"
        )
        assert source.policies() == in_force
        assert source.status()["policy_errors"] == {
            "CiliumNetworkPolicy/empire/broken": entry["error"]
        }

        # a bad update of a good object keeps its last good version in force
        current = await custom.get_namespaced_custom_object(*CNPS[:2], "empire", CNPS[2], "landing")
        current["spec"] = bad_port
        await custom.replace_namespaced_custom_object(
            *CNPS[:2], "empire", CNPS[2], "landing", current
        )
        await status_says("landing", False)
        assert source.policies() == in_force

        # fixed: the error goes, from the status too
        current = await custom.get_namespaced_custom_object(*CNPS[:2], "empire", CNPS[2], "landing")
        current["spec"] = LANDING | {"description": "fixed"}
        await custom.replace_namespaced_custom_object(
            *CNPS[:2], "empire", CNPS[2], "landing", current
        )
        assert "error" not in await status_says("landing", True)
        assert "CiliumNetworkPolicy/empire/landing" not in source.policy_errors()

    # the agent restarts: the statuses already say what it would, so it writes none
    async with source_on(kube_api, tmp_path) as (again, _):
        await asyncio.sleep(0.3)
        assert again.policy_errors() == {"CiliumNetworkPolicy/empire/broken": entry["error"]}
        assert again.status_writes == 0


async def test_a_cnp_selects_pods_of_its_own_namespace_only(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    core, custom = client.CoreV1Api(kubeclient), client.CustomObjectsApi(kubeclient)
    for ns, subnet in (("alpha", 1), ("beta", 2)):
        await core.create_namespace(namespace(ns, **({"team": "sith"} if ns == "alpha" else {})))
        await core.create_namespaced_pod(
            ns,
            pod(
                "deathstar",
                node="node-1",
                ip=f"10.{subnet}.0.5",
                labels={"org": "empire", "class": "deathstar"},
            ),
        )
        await core.create_namespaced_pod(
            ns, pod("tiefighter", node="node-1", ip=f"10.{subnet}.0.6", labels={"org": "empire"})
        )
    await custom.create_namespaced_custom_object(
        *CNPS[:2], "alpha", CNPS[2], cnp("landing", LANDING)
    )
    # in beta: only pods of namespaces labelled team=sith may reach the deathstar,
    # wherever they are
    sith_only = {
        "endpointSelector": {"matchLabels": {"class": "deathstar"}},
        "ingress": [
            {
                "fromEndpoints": [
                    {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "sith"}}
                ]
            }
        ],
    }
    await custom.create_namespaced_custom_object(*CNPS[:2], "beta", CNPS[2], cnp("sith", sith_only))

    async with source_on(kube_api, tmp_path) as (source, _):
        await eventually(lambda: len(source.endpoints()) == 4 and len(source.policies()) == 2)
        identities = IdentityAllocator()
        endpoints = {
            e.name: Endpoint(i, e.name, identities.for_labels(e.labels), None)
            for i, e in enumerate(source.endpoints(), start=1)
        }
        compiled = compile_policy(source.policies(), endpoints.values(), identities)

        def enforced(name: str) -> bool:
            return compiled.directions[(endpoints[name].id, INGRESS)].enforced

        def lands(src: str, dst: str) -> bool:
            peer = endpoints[src].identity.number
            return compiled.port_verdict(endpoints[dst].id, INGRESS, peer, 80).allowed

        assert lands("alpha/tiefighter", "alpha/deathstar")
        # landing's fromEndpoints selector names no namespace: its own namespace only
        assert not lands("beta/tiefighter", "alpha/deathstar")
        # landing selects nothing in beta: beta's deathstar is sith's alone, whose peer
        # selector names namespaces by their labels, which pods' identities carry
        assert lands("alpha/tiefighter", "beta/deathstar")
        assert not lands("beta/tiefighter", "beta/deathstar")
        # and neither selects a tiefighter
        assert not enforced("alpha/tiefighter") and not enforced("beta/tiefighter")


async def test_watches_reopen_from_their_resource_version_without_listing_again(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    core = client.CoreV1Api(kubeclient)
    # the server ends each watch after a second; bookmarks come every 0.2 s
    async with source_on(kube_api, tmp_path, timeout_seconds=1) as (source, _):
        await asyncio.sleep(2.5)
        await core.create_namespace(namespace("late", team="x"))
        await eventually(lambda: "late" in source.namespaces, what="an event after the reopenings")
        stats = source.status()["watches"]["Namespace"]
        assert stats["lists"] == 1 and stats["watches"] >= 3 and stats["errors"] == 0
        assert stats["bookmarks"] >= 2
        assert int(stats["resource_version"]) >= int(
            (await core.read_namespace("late")).metadata.resource_version
        )
