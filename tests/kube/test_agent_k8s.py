"""``l7proxy run --k8s``: the real agent, fed by the Kubernetes API test double.

The test plays the Kubernetes side: it creates each pod's network namespace,
veth and /32 route itself, as a CNI would, then creates the Pod object (on this
agent's node, with that IP) through the API. The agent finds the veth from the
route, attaches to it and enforces the CNP it read from the API; when the Pod
object goes, the agent detaches. Curl runs inside the pods' namespaces.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes_asyncio import client

from l7proxy.kube.source import api_client
from l7proxy.node import netns
from tests.kube.objects import LANDING, cnp, namespace, pod
from tests.support.kube_api_double import KubeApiDouble
from tests.support.node import Node, running_node
from tests.support.topology import free_test_network

pytestmark = [pytest.mark.root, pytest.mark.cluster]

T = TypeVar("T")
NODE = "node-k8s"
SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
}


@contextmanager
def cni_pods(names: list[str]) -> Iterator[dict[str, tuple[str, str, str]]]:
    """name -> (network namespace, host veth, IP): what a CNI makes for each pod."""
    tag = secrets.token_hex(3)
    net = free_test_network()
    made: dict[str, tuple[str, str, str]] = {}
    try:
        netns.ensure_forwarding()
        for i, name in enumerate(names):
            ns, veth, ip = f"l7pk-{tag}-{name}", f"l7pk{tag}{i}", str(net[10 + i])
            made[name] = (ns, veth, ip)
            netns.create_endpoint(ns, veth, net[10 + i])
        yield made
    finally:
        for ns, veth, _ in made.values():
            netns.delete_endpoint(ns, veth)


def curl(ns: str, method: str, ip: str, path: str) -> int | None:
    run = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"-X{method}",
            f"http://{ip}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return int(run.stdout) if run.stdout.isdigit() and run.stdout != "000" else None


def pod_endpoints(status: dict | None) -> dict[str, dict]:
    return {e["name"]: e for e in (status or {}).get("endpoints", []) if e.get("kind") == "pod"}


@contextmanager
def loop_in_thread() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """An event loop on a thread of its own, for the double and the test's client,
    so that this test's own thread may block (pyroute2 runs a loop of its own)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_pods_on_this_node_become_endpoints_and_their_cnp_is_enforced(etcd, tmp_path: Path) -> None:
    with (
        loop_in_thread() as run,
        running_node({}, start_agent=False) as node,
        cni_pods(list(SHIPS)) as pods,
    ):
        kube_api = KubeApiDouble(etcd, f"agent-{secrets.token_hex(3)}")
        run(kube_api.start())
        kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
        kubeclient = run(api_client(kubeconfig))
        try:
            agent_sees_pods(node, pods, kubeclient, kubeconfig, run)
        finally:
            run(kubeclient.close())
            run(kube_api.stop())


def agent_sees_pods(node: Node, pods, kubeclient, kubeconfig: Path, run) -> None:
    core, custom = client.CoreV1Api(kubeclient), client.CustomObjectsApi(kubeclient)
    run(core.create_namespace(namespace("empire")))
    run(
        custom.create_namespaced_custom_object(
            "cilium.io", "v2", "empire", "ciliumnetworkpolicies", cnp("landing", LANDING)
        )
    )
    node.start_agent("--k8s", "--kubeconfig", str(kubeconfig), "--node-name", NODE)
    ns, _, ip = pods["deathstar"]
    node.spawn(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "l7proxy.demo.deathstar", "--port", "80"],
        "deathstar ready",
        "deathstar",
    )
    for name, labels in SHIPS.items():
        run(
            core.create_namespaced_pod(
                "empire", pod(name, node=NODE, ip=pods[name][2], labels=labels)
            )
        )
    # a pod of another node is not ours
    run(
        core.create_namespaced_pod(
            "empire", pod("xwing", node="node-other", ip="10.255.0.9", labels={})
        )
    )

    def attached(s: dict | None) -> bool:
        eps = pod_endpoints(s)
        return len(eps) == 2 and all(
            str(e["id"]) in map(str, s["datapath"]["attached"]) for e in eps.values()
        )

    status = node.wait_status(attached, 30, "both pods attached")
    eps = pod_endpoints(status)
    assert {n: e["host_ifname"] for n, e in eps.items()} == {
        f"empire/{n}": pods[n][1] for n in SHIPS
    }
    assert eps["empire/deathstar"]["labels"]["io.kubernetes.pod.namespace"] == "empire"
    assert [p["source"] for p in status["policies"]] == ["k8s CiliumNetworkPolicy/empire/landing"]
    assert status["kubernetes"]["synced"] and status["healthy"]

    tie_ns = pods["tiefighter"][0]
    assert curl(tie_ns, "POST", ip, "/v1/request-landing") == 200
    assert curl(tie_ns, "PUT", ip, "/v1/exhaust-port") == 403

    # the tiefighter's Pod object goes: its endpoint goes, the datapath lets go of its veth
    tie_id = eps["empire/tiefighter"]["id"]
    run(core.delete_namespaced_pod("tiefighter", "empire"))
    node.wait_status(
        lambda s: (
            list(pod_endpoints(s)) == ["empire/deathstar"]
            and str(tie_id) not in map(str, s["datapath"]["attached"])
        ),
        20,
        "the tiefighter detached",
    )
    # its veth is the CNI's: still there
    assert netns.route_link(pods["tiefighter"][2])[0] == pods["tiefighter"][1]

    # a bad CNP: named in `l7proxy status`, and the policy in force is unchanged
    revision = node.status()["policy_revision"]
    bad = {"endpointSelector": {}, "ingress": [{"fromEndpoints": "everyone"}]}
    run(
        custom.create_namespaced_custom_object(
            "cilium.io", "v2", "empire", "ciliumnetworkpolicies", cnp("broken", bad)
        )
    )
    node.wait_status(
        lambda s: s["kubernetes"]["policy_errors"], 20, "the rejected object in status"
    )
    printed = node.cli("status").stdout
    assert (
        "REJECTED CiliumNetworkPolicy/empire/broken (its last good version, if any, in force): "
        "k8s CiliumNetworkPolicy/empire/broken: spec.ingress[0].fromEndpoints: expected a list, "
        "got str"
    ) in printed
    assert "kubernetes: node node-k8s, synced" in printed
    after = node.status()
    assert after["policy_revision"] == revision
    assert [p["name"] for p in after["policies"]] == ["empire/landing"]
