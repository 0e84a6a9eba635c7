"""``l7proxy run --k8s --etcd``: the real agent with its identities and ipcache in etcd.

The test plays a second node, "node-b", with a ``ClusterStore`` of its own on the
same etcd: it refers to identities and publishes the addresses of its pods, as
another agent would. Those pods are network namespaces on this machine whose veths stand for the
wire from node-b (``--devices``), so their packets reach the agent's pod from an
address that only etcd names: only the identity that node-b published lets the
CNP's ``fromEndpoints`` match them, and its L7 rule is enforced on this node.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from l7proxy.cluster.keys import IpEntry, Layout, encode_labels, with_source
from l7proxy.cluster.kv import Etcd
from l7proxy.cluster.store import ClusterConfig, ClusterStore
from l7proxy.kube.source import api_client
from tests.kube.objects import LANDING, cnp, namespace, pod
from tests.kube.test_agent_k8s import cni_pods, curl, loop_in_thread
from tests.support.etcd import EtcdServer
from tests.support.kube_api_double import KubeApiDouble
from tests.support.node import running_node

pytestmark = [pytest.mark.root, pytest.mark.cluster]

NODE = "node-a"
DEATHSTAR = {"org": "empire", "class": "deathstar"}


def pod_labels(labels: dict[str, str]) -> dict[str, str]:
    """What an agent in namespace ``empire`` stores for a pod (``kube.objects.endpoint_labels``)."""
    return with_source(
        {
            **labels,
            "io.kubernetes.pod.namespace": "empire",
            "io.cilium.k8s.policy.serviceaccount": "default",
        }
    )


def test_identities_and_addresses_go_through_etcd_and_remote_pods_match_selectors(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    prefix = f"agent{secrets.token_hex(3)}/state"
    layout = Layout(prefix, "default")
    with (
        loop_in_thread() as run,
        running_node({}, start_agent=False) as node,
        cni_pods(["deathstar", "tiefighter", "xwing"]) as pods,
    ):
        kube_api = KubeApiDouble(etcd, f"kube{secrets.token_hex(3)}")
        run(kube_api.start())
        kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
        kubeclient = run(api_client(kubeconfig))
        node_b = ClusterStore(
            ClusterConfig(
                node="node-b",
                etcd=(etcd.host, etcd.port),
                prefix=prefix,
                node_ips=("192.0.2.2",),
                lease_ttl=30,
                rate=0,
            )
        )
        kv = Etcd(etcd.host, etcd.port, rate=0)
        run(kv.connect())
        run(node_b.start(timeout=10))
        try:
            core = client.CoreV1Api(kubeclient)
            custom = client.CustomObjectsApi(kubeclient)
            run(core.create_namespace(namespace("empire")))
            run(
                custom.create_namespaced_custom_object(
                    "cilium.io", "v2", "empire", "ciliumnetworkpolicies", cnp("landing", LANDING)
                )
            )
            run(
                core.create_namespaced_pod(
                    "empire", pod("deathstar", node=NODE, ip=pods["deathstar"][2], labels=DEATHSTAR)
                )
            )
            ds_ns, _, ds_ip = pods["deathstar"]
            node.spawn(
                ["ip", "netns", "exec", ds_ns, sys.executable]
                + ["-m", "l7proxy.demo.deathstar", "--port", "80"],
                "deathstar ready",
                "deathstar",
            )
            node.start_agent(
                "--k8s",
                "--kubeconfig",
                str(kubeconfig),
                "--node-name",
                NODE,
                "--etcd",
                f"http://{etcd.host}:{etcd.port}",
                "--kvstore-prefix",
                prefix,
                "--kvstore-lease-ttl",
                "5",
                # node-b's pods' veths play the wire from node-b
                "--devices",
                f"{pods['tiefighter'][1]},{pods['xwing'][1]}",
            )
            status = node.wait_status(
                lambda s: (
                    s["cluster"]["own_ips"] == 1
                    and any(
                        str(e["id"]) in map(str, s["datapath"]["attached"]) for e in s["endpoints"]
                    )
                ),
                30,
                "the deathstar attached and published",
            )
            # The deathstar's identity is cluster-wide, in etcd in Cilium's form,
            # and node-b's allocation of the same labels gets the same number.
            number = status["endpoints"][0]["identity"]
            assert 256 <= number <= 65535
            stored = run(kv.get(layout.id_key(number)))
            assert stored is not None
            assert stored.value.decode() == encode_labels(pod_labels(DEATHSTAR))
            assert run(node_b.allocate(pod_labels(DEATHSTAR))) == number
            entry = run(kv.get(layout.ip_key(ds_ip)))
            assert entry is not None
            published = IpEntry.from_json(entry.value)
            # HostIP: one of this machine's own addresses, never loopback
            assert published.host_ip and not published.host_ip.startswith("127.")
            assert published == IpEntry(
                ds_ip, number, published.host_ip, NODE, "empire", "deathstar"
            )

            # A pod that no node has published is the world: the CNP drops it.
            tie_ns, _, tie_ip = pods["tiefighter"]
            xwing_ns, _, xwing_ip = pods["xwing"]
            assert curl(tie_ns, "POST", ds_ip, "/v1/request-landing") is None

            # node-b publishes its two pods; the agent learns them from etcd.
            tie = run(node_b.allocate(pod_labels({"org": "empire", "class": "tiefighter"})))
            xwing = run(node_b.allocate(pod_labels({"org": "alliance", "class": "xwing"})))
            run(node_b.upsert_ip(tie_ip, tie, namespace="empire", pod="tiefighter"))
            run(node_b.upsert_ip(xwing_ip, xwing, namespace="empire", pod="xwing"))
            node.wait_status(
                lambda s: s["cluster"]["ipcache"] == 3 and s["cluster"]["identities"] >= 3,
                10,
                "node-b's pods in the agent's ipcache",
            )
            assert wait_for_answer(tie_ns, "POST", ds_ip, "/v1/request-landing") == 200
            assert curl(tie_ns, "PUT", ds_ip, "/v1/exhaust-port") == 403
            assert curl(xwing_ns, "POST", ds_ip, "/v1/request-landing") is None

            printed = node.cli("status").stdout
            assert f"cluster: node {NODE} of default, etcd {etcd.host}:{etcd.port}" in printed
            assert "3 ipcache entries, 2 nodes; ours: 1 identities, 1 addresses" in printed

            # node-b's pod goes: the agent forgets its address, and it is the world again.
            run(node_b.delete_ip(tie_ip))
            node.wait_status(lambda s: s["cluster"]["ipcache"] == 2, 10, "the delete")
            assert curl(tie_ns, "POST", ds_ip, "/v1/request-landing") is None

            # The agent stops: its lease is revoked, its address and reference go.
            node.stop_agent()
            assert run(kv.get(layout.ip_key(ds_ip))) is None
            assert run(kv.get(layout.node_key(NODE))) is None
            assert run(kv.get(layout.ref_key(encode_labels(pod_labels(DEATHSTAR)), NODE))) is None
        finally:
            run(node_b.stop())
            run(kv.close())
            run(kubeclient.close())
            run(kube_api.stop())


def wait_for_answer(ns: str, method: str, ip: str, path: str, timeout: float = 10) -> int | None:
    """The first answer within ``timeout``: the maps follow etcd within moments."""
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        answer = curl(ns, method, ip, path)
        if answer is not None:
            return answer
        time.sleep(0.2)
    return answer
