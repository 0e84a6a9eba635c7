"""``make demo-cluster``: Cilium's Star Wars scenario across three nodes, for real.

The test cluster of ``tests/support/cluster_nodes.py``: three node namespaces on a
bridge, each with its real agent, one real etcd, and the Kubernetes API test
double (no kube-apiserver can be installed here). The deathstar runs on node-1,
the tiefighter on node-2, the xwing on node-3. The policies are the same files as
``make demo``'s (``policies/sw-*.yaml``), created and then replaced as
CiliumNetworkPolicy objects through the API with the official client. Every
request crosses nodes, so it is judged by node-1's agent with the identity that
node-2's or node-3's agent allocated in etcd.

It ends with the same table of expected against observed outcomes as ``make demo``
and exits non-zero on any difference. Everything is removed afterwards, also on
Ctrl-C or SIGTERM. It lives beside the tests because the API server it talks to is
a test double.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import yaml
from kubernetes_asyncio import client

from l7proxy.demo.__main__ import report, say
from l7proxy.observe.flowlog import format_record
from tests.support import REPO
from tests.support.cluster_nodes import Pod, TestCluster, test_cluster

SHIPS = {
    "deathstar": ("node-1", {"org": "empire", "class": "deathstar"}),
    "tiefighter": ("node-2", {"org": "empire", "class": "tiefighter"}),
    "xwing": ("node-3", {"org": "alliance", "class": "xwing"}),
}


class ClusterDemo:
    def __init__(self, cluster: TestCluster):
        self.cluster = cluster
        self.pods: dict[str, Pod] = {}
        self.results: list[tuple[str, str, str, str]] = []
        self.flow_offset = 0
        self.custom = client.CustomObjectsApi(cluster.kubeclient)

    # ---------------------------------------------------------------- plumbing

    def curl(self, ship: str, method: str, path: str) -> tuple[str, str]:
        src, dst = self.pods[ship], self.pods["deathstar"]
        say(f"  $ {ship} ({src.node}): curl -s -X{method} http://deathstar{path}")
        run = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{src.netns}", "curl", "-s", "-m", "3"]
            + ["-w", "\\n%{http_code}", f"-X{method}", f"http://{dst.ip}{path}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if run.returncode == 28:
            say("    -> no answer (timed out after 3 s)")
            return "timeout", ""
        body, _, code = run.stdout.rpartition("\n")
        say(f"    -> HTTP {code}: {body.strip()}")
        return code, body.strip()

    def landed(self, ship: str) -> str:
        code, body = self.curl(ship, "POST", "/v1/request-landing")
        return "landed" if code == "200" and "landed" in body else f"{code} {body}".strip()

    def check(self, stage: str, attempt: str, expected: str, observed: str) -> None:
        self.results.append((stage, attempt, expected, observed))

    def kernel_denied(self) -> int:
        node = self.cluster.nodes["node-1"]
        seen = (node.status() or {}).get("uptime_s", 0)
        status = node.agent.wait_status(lambda s: s and s["uptime_s"] > seen, 5)
        return int(status["datapath"]["counters"]["total"]["denied"])

    def show_flows(self) -> None:
        time.sleep(1.3)  # the agent flushes its flow log every second
        path = self.cluster.nodes["node-1"].agent.store.flowlog
        lines = path.read_text().splitlines() if path.exists() else []
        new, self.flow_offset = lines[self.flow_offset :], len(lines)
        records = [json.loads(line) for line in new if line.strip()]
        say("  node-1's flow log:" if records else "  node-1's flow log: (no records)")
        for rec in records[-6:]:
            say("    " + format_record(rec))

    def apply_policy(self, path: str) -> None:
        """Create the CNP, or replace the one of the same name, through the API."""
        obj = yaml.safe_load((REPO / path).read_text())
        name = obj["metadata"]["name"]
        say(f"  $ kubectl apply -f {path}   (CiliumNetworkPolicy default/{name}, via the API)")
        args = ("cilium.io", "v2", "default", "ciliumnetworkpolicies")
        try:
            current = self.cluster.run(self.custom.get_namespaced_custom_object(*args, name))
        except client.ApiException as e:
            if e.status != 404:
                raise
            self.cluster.run(self.custom.create_namespaced_custom_object(*args, obj))
        else:
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.cluster.run(self.custom.replace_namespaced_custom_object(*args, name, obj))
        revisions = {n: (node.status() or {})["policy_revision"] for n, node in self.nodes()}
        for n, node in self.nodes():  # every agent recompiled and wrote its maps
            node.agent.wait_status(
                lambda s, n=n: s["policy_revision"] > revisions[n] and s["maps_in_sync"],
                15,
                f"the policy in force on {n}",
            )

    def nodes(self):  # noqa: ANN201 - (name, ClusterNode) pairs
        return self.cluster.nodes.items()

    # ---------------------------------------------------------------- scenario

    def run(self) -> bool:
        c = self.cluster
        say("== The cluster: three nodes, each a network namespace with its own agent")
        assert c.etcd is not None and c.kube_api is not None
        say(f"  etcd {c.etcd.endpoint}, Kubernetes API (test double) {c.kube_api.url}")
        for name, node in self.nodes():
            say(f"  {name}  netns {node.netns}  {node.ip:<15} pods {node.pod_net}")
        say("  each runs: nsenter --net=NETNS l7proxy run --k8s --etcd ... --kvstore-lease-ttl 3")
        say("\n== Pods: created as Pod objects through the API, plumbed as a CNI would")
        for ship, (node_name, labels) in SHIPS.items():
            self.pods[ship] = c.add_pod(node_name, ship, labels)
        c.serve_http(self.pods["deathstar"])
        c.wait_attached(*self.pods.values())
        for ship, pod in self.pods.items():
            say(
                f"  {ship:<10} on {pod.node}  {pod.ip:<15} identity {c.identity_of(pod):<6} "
                f"{','.join(f'{k}={v}' for k, v in pod.labels.items())}"
            )
        for _, node in self.nodes():  # every node has every pod's address from etcd
            node.agent.wait_status(
                lambda s: s["cluster"]["ipcache"] >= len(self.pods), 15, "every pod known"
            )
        views = {n: (node.status() or {})["cluster"] for n, node in self.nodes()}
        digests = {v["identities_digest"] for v in views.values()}
        say(
            "  identity tables on the three nodes: "
            + ("identical" if len(digests) == 1 else f"DIFFERENT {sorted(digests)}")
        )
        for n, v in views.items():
            say(f"  {n} knows pods by node: {v['ipcache_by_node']}")
        self.check(
            "0 cluster",
            "identity tables of the 3 nodes",
            "identical",
            "identical" if len(digests) == 1 else f"{len(digests)} different",
        )
        known = all(
            v["ipcache_by_node"] == {"node-1": 1, "node-2": 1, "node-3": 1} for v in views.values()
        )
        self.check("0 cluster", "every pod known on every node", "yes", "yes" if known else "no")

        say("\n== Stage 1: no policy. Both ships can land (each from another node).")
        for ship in ("tiefighter", "xwing"):
            self.check(
                "1 no policy", f"{ship} POST /v1/request-landing", "landed", self.landed(ship)
            )
        self.show_flows()

        say("\n== Stage 2: L3/L4 policy rule1: only org=empire may reach deathstar on TCP/80")
        self.apply_policy("policies/sw-l3-l4.yaml")
        before = self.kernel_denied()
        self.check(
            "2 L3/L4", "tiefighter POST /v1/request-landing", "landed", self.landed("tiefighter")
        )
        code, body = self.curl("xwing", "POST", "/v1/request-landing")
        self.check(
            "2 L3/L4",
            "xwing POST /v1/request-landing",
            "timeout",
            "timeout" if code == "timeout" else f"{code} {body}",
        )
        after = self.kernel_denied()
        say(f"  node-1's kernel drop counter: {before} -> {after}")
        self.check(
            "2 L3/L4",
            "node-1 kernel drop counter rises",
            "rises",
            "rises" if after > before else f"{before} -> {after}",
        )
        self.show_flows()

        say(
            "\n== Stage 3: L7 policy: the same rule, plus rules.http [{method: POST, path: "
            "/v1/request-landing}]"
        )
        self.apply_policy("policies/sw-l3-l4-l7.yaml")
        self.check(
            "3 L7", "tiefighter POST /v1/request-landing", "landed", self.landed("tiefighter")
        )
        code, body = self.curl("tiefighter", "PUT", "/v1/exhaust-port")
        self.check("3 L7", "tiefighter PUT /v1/exhaust-port", "403 Access denied", f"{code} {body}")
        code, body = self.curl("xwing", "POST", "/v1/request-landing")
        self.check(
            "3 L7",
            "xwing POST /v1/request-landing",
            "timeout",
            "timeout" if code == "timeout" else f"{code} {body}",
        )
        self.show_flows()
        return self.report()

    def report(self) -> bool:
        return report(self.results)


def missing() -> str | None:
    from l7proxy.datapath.loader import kernel_support
    from tests.support import etcd

    problem = kernel_support()
    if problem:
        return f"the kernel datapath: {problem}"
    for tool in ("curl", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (make setup installs it)"
    return etcd.available()


def main() -> int:
    why = missing()
    if why:
        say(f"The cluster demo needs {why}.")
        return 2
    # SIGTERM gets the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with test_cluster(3) as cluster:
            ok = ClusterDemo(cluster).run()
        say("cleaned up: agents stopped; pods, nodes, bridge, pins and etcd removed")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("\ninterrupted; cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(main())
