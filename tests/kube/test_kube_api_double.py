"""The Kubernetes API test double itself, driven by the official client unchanged.

The double (tests/support/kube_api_double.py) stands in for kube-apiserver, which
cannot be installed here; these tests hold it to the behaviour the agent relies on.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client, watch

from tests.kube.objects import cnp, namespace, pod
from tests.support.kube_api_double import KubeApiDouble, label_selector

pytestmark = pytest.mark.cluster

CILIUM = ("cilium.io", "v2")


async def events(lister, *args, until: int, **params) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of the first ``until`` events of a watch."""
    seen: list[tuple[str, str, str]] = []
    async with watch.Watch(return_type="object") as w:
        async for ev in w.stream(lister, *args, timeout_seconds=5, **params):
            m = ev["raw_object"]["metadata"]
            seen.append((ev["type"], m.get("name", ""), m["resourceVersion"]))
            if len(seen) >= until:
                break
    return seen


def test_label_selectors_read_as_kubernetes_writes_them() -> None:
    obj = {"metadata": {"labels": {"app": "web", "tier": "front"}}}
    assert label_selector("app=web,tier in (front, back)")(obj)
    assert label_selector("app==web,!canary,tier")(obj)
    assert not label_selector("app!=web")(obj)
    assert not label_selector("tier notin (front)")(obj)


async def test_list_and_watch_by_node_with_resource_versions(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient
) -> None:
    core = client.CoreV1Api(kubeclient)
    await core.create_namespace(namespace("shop"))
    mine = await core.create_namespaced_pod(
        "shop", pod("web", node="n1", ip="10.1.0.5", labels={"app": "web"})
    )
    await core.create_namespaced_pod(
        "shop", pod("db", node="n2", ip="10.2.0.5", labels={"app": "db"})
    )

    listed = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in listed.items] == ["web"]
    assert listed.items[0].metadata.resource_version == mine.metadata.resource_version
    start = listed.metadata.resource_version
    assert int(start) >= int(mine.metadata.resource_version)

    async def changes() -> None:
        await asyncio.sleep(0.2)
        await core.create_namespaced_pod("shop", pod("cache", node="n2", ip="10.2.0.6", labels={}))
        moved = pod("web", node="n2", ip="10.1.0.5", labels={"app": "web"})  # off our node
        await core.replace_namespaced_pod("web", "shop", moved)
        await core.create_namespaced_pod("shop", pod("api", node="n1", ip="10.1.0.6", labels={}))

    task = asyncio.create_task(changes())
    seen = await events(
        core.list_pod_for_all_namespaces,
        until=2,
        field_selector="spec.nodeName=n1",
        resource_version=start,
    )
    await task
    # the pod that left the selector is DELETED for this watcher; n2's pods never show
    assert [(t, n) for t, n, _ in seen] == [("DELETED", "web"), ("ADDED", "api")]
    assert int(seen[0][2]) < int(seen[1][2])


async def test_conflicts_and_the_status_subresource(kubeclient: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(kubeclient)
    made = await custom.create_namespaced_custom_object(
        *CILIUM, "shop", "ciliumnetworkpolicies", cnp("p", {"endpointSelector": {}})
    )
    assert made["metadata"]["generation"] == 1
    with pytest.raises(client.ApiException) as again:
        await custom.create_namespaced_custom_object(
            *CILIUM, "shop", "ciliumnetworkpolicies", cnp("p", {})
        )
    assert again.value.status == 409

    patched = await custom.patch_namespaced_custom_object_status(
        *CILIUM,
        "shop",
        "ciliumnetworkpolicies",
        "p",
        {"status": {"nodes": {"n1": {"ok": True}}}, "spec": {"ignored": True}},
        _content_type="application/merge-patch+json",
    )
    assert patched["status"] == {"nodes": {"n1": {"ok": True}}}
    assert patched["spec"] == {"endpointSelector": {}}  # /status takes the status only
    second = await custom.patch_namespaced_custom_object_status(
        *CILIUM,
        "shop",
        "ciliumnetworkpolicies",
        "p",
        {"status": {"nodes": {"n2": {"ok": False, "error": "bad"}}}},
        _content_type="application/merge-patch+json",
    )
    assert second["status"]["nodes"] == {"n1": {"ok": True}, "n2": {"ok": False, "error": "bad"}}

    stale = dict(
        made, spec={"endpointSelector": {"matchLabels": {"a": "b"}}}
    )  # made's resourceVersion is old
    with pytest.raises(client.ApiException) as conflict:
        await custom.replace_namespaced_custom_object(
            *CILIUM, "shop", "ciliumnetworkpolicies", "p", stale
        )
    assert conflict.value.status == 409
    fresh = dict(stale, metadata=second["metadata"])
    replaced = await custom.replace_namespaced_custom_object(
        *CILIUM, "shop", "ciliumnetworkpolicies", "p", fresh
    )
    assert replaced["metadata"]["generation"] == 2
    assert replaced["status"] == second["status"]  # an update of the main resource keeps the status


async def test_compacted_versions_are_gone(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient
) -> None:
    core = client.CoreV1Api(kubeclient)
    first = await core.create_namespace(namespace("a"))
    await core.create_namespace(namespace("b"))
    await core.create_namespace(namespace("c"))
    await kube_api.compact()  # history before c is gone: a watch from a would miss b

    old = first.metadata.resource_version
    with pytest.raises(client.ApiException) as gone:
        await events(core.list_namespace, until=1, resource_version=old)
    assert gone.value.status == 410
    with pytest.raises(client.ApiException) as gone_list:
        await core.list_namespace(resource_version=old, resource_version_match="Exact")
    assert gone_list.value.status == 410
    listed = await core.list_namespace()  # a fresh list always works
    assert sorted(n.metadata.name for n in listed.items) == ["a", "b", "c"]
    only_b = await core.list_namespace(field_selector="metadata.name=b")
    assert [n.metadata.name for n in only_b.items] == ["b"]
    assert only_b.metadata.resource_version == listed.metadata.resource_version


async def test_bookmarks_carry_the_resource_version(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient
) -> None:
    core = client.CoreV1Api(kubeclient)
    await core.create_namespace(namespace("a"))
    listed = await core.list_namespace()
    await core.create_namespace(namespace("b"))
    seen = await events(
        core.list_namespace,
        until=2,
        resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True,
    )
    assert seen[0][:2] == ("ADDED", "b")
    assert seen[1] == ("BOOKMARK", "", seen[0][2])
