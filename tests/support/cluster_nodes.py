"""A test cluster on one machine: nodes as network namespaces, each with its real agent.

    with test_cluster(3) as cluster:            # etcd, the Kubernetes API double, 3 nodes
        ds = cluster.add_pod("node-1", "deathstar", {"org": "empire"}, namespace="empire")
        cluster.serve_http(ds)
        cluster.wait_attached(ds)
        assert cluster.curl(tie, "POST", ds, "/v1/request-landing") == 200
        cluster.kill_agent("node-3")            # SIGKILL: its keys expire with its lease

Layout (``<t>`` is a tag unique to the run):

    root namespace:  bridge l7cb<t> 10.A.B.1/24 --- etcd and the API double listen here
                        |             |             |
    node namespaces: l7c-<t>-node-1  l7c-<t>-node-2  l7c-<t>-node-3   eth0 10.A.B.11, .12, .13
                     agent (nsenter --net), ip_forward, a route to each other node's pod /24
                        |
    pod namespaces:  l7c-<t>-<pod>   eth0 10.C.D.x/32, default route via the node's veth
                     (made as a routed CNI makes them: a /32 route per pod on its node)

Each agent runs with its own state dir (hence its own BPF pin dir under /sys/fs/bpf)
and metrics port, entered with ``nsenter --net`` only: ``ip netns exec`` would also
remount /sys and hide the pinned maps (/work/shared/KERNEL-NOTES.md). Pods exist
twice, as a namespace behind their node and as a Pod object in the API double, as a
CNI and a kubelet would make them.

Everything is removed however the block ends: agents and pod processes, pods' and
nodes' namespaces (their veths and routes go with them), the bridge, the agents'
pins, the API double and etcd.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from kubernetes_asyncio import client

from l7proxy.kube.source import api_client
from tests.kube.objects import namespace as namespace_object
from tests.kube.objects import pod as pod_object
from tests.support import etcd as etcd_support
from tests.support.kube_api_double import KubeApiDouble
from tests.support.node import L7PROXY, Node, require_kernel
from tests.support.topology import free_test_network

T = TypeVar("T")
NETNS_DIR = Path("/var/run/netns")
GATEWAY = "169.254.1.1"


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def nsenter(netns: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / netns}"]


@dataclass
class Pod:
    name: str
    namespace: str  # the Kubernetes namespace
    node: str
    netns: str
    host_veth: str  # in the node's namespace
    ip: str
    labels: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ClusterNode:
    name: str
    netns: str
    ip: str
    pod_net: IPv4Network
    agent: Node
    metrics_port: int
    agent_args: list[str] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)

    def status(self) -> dict | None:
        return self.agent.status()


class TestCluster:
    __test__ = False  # not a pytest class

    def __init__(self, root: Path, tag: str, run: Callable[[Coroutine[Any, Any, Any]], Any]):
        self.root = root
        self.tag = tag
        self.run = run
        self.nodes: dict[str, ClusterNode] = {}
        self.bridge = f"l7cb{tag}"
        self.bridge_net = free_test_network()
        self.bridge_ip = str(self.bridge_net[1])
        self.prefix = f"cluster{tag}/state"
        self.etcd: etcd_support.EtcdServer | None = None
        self.kube_api: KubeApiDouble | None = None
        self.kubeconfig = root / "kubeconfig"
        self.kubeclient: client.ApiClient | None = None
        self.procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []  # every netns made, pods before their nodes
        self._pod_count = 0
        self._k8s_namespaces: set[str] = set()

    # ------------------------------------------------------------ the plumbing

    def make_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_node(self, index: int) -> ClusterNode:
        name = f"node-{index}"
        netns = f"l7c-{self.tag}-{name}"
        node_ip = str(self.bridge_net[10 + index])
        pod_net = free_test_network()
        while pod_net == self.bridge_net or any(n.pod_net == pod_net for n in self.nodes.values()):
            pod_net = free_test_network()
        self._namespaces.append(netns)  # before it exists: an interrupt may come in between
        ip("netns", "add", netns)
        veth = f"l7cn{self.tag}{index}"
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{node_ip}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        sysctl = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ]
        subprocess.run([*nsenter(netns), "sysctl", "-q", "-w", *sysctl], check=True, timeout=20)
        (self.root / name).mkdir()
        agent = Node(self.root / name, [*nsenter(netns), *L7PROXY])
        node = ClusterNode(name, netns, node_ip, pod_net, agent, 9962 + index)
        self.nodes[name] = node
        return node

    def route_nodes(self) -> None:
        """Each node routes every other node's pod network to that node."""
        for node in self.nodes.values():
            for other in self.nodes.values():
                if other is not node:
                    ip("-n", node.netns, "route", "add", str(other.pod_net), "via", other.ip)

    def add_pod(
        self, node_name: str, name: str, labels: dict[str, str], *, namespace: str = "default"
    ) -> Pod:
        """A pod behind ``node_name``: its namespace, veth and route (the CNI's work),
        then its Pod object in the API (the scheduler's and kubelet's)."""
        node = self.nodes[node_name]
        self._pod_count += 1
        netns = f"l7c-{self.tag}-{name}"
        veth = f"lxc{self.tag}{self._pod_count:02d}"
        address = str(node.pod_net[10 + len(node.pods)])
        self._namespaces.insert(0, netns)  # before it exists, as above
        ip("netns", "add", netns)
        ip(
            "-n",
            node.netns,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        ip("-n", node.netns, "link", "set", veth, "up")
        mac = json.loads(ip("-j", "-n", node.netns, "link", "show", veth))[0]["address"]
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{address}/32", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", f"{GATEWAY}/32", "dev", "eth0", "scope", "link")
        ip("-n", netns, "neigh", "add", GATEWAY, "lladdr", mac, "dev", "eth0", "nud", "permanent")
        ip("-n", netns, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        ip("-n", node.netns, "route", "add", f"{address}/32", "dev", veth, "scope", "link")
        pod = Pod(name, namespace, node_name, netns, veth, address, dict(labels))
        node.pods[name] = pod
        core = client.CoreV1Api(self.kubeclient)
        if namespace not in self._k8s_namespaces:
            self.run(core.create_namespace(namespace_object(namespace)))
            self._k8s_namespaces.add(namespace)
        self.run(
            core.create_namespaced_pod(
                namespace, pod_object(name, node=node_name, ip=address, labels=labels)
            )
        )
        return pod

    # ------------------------------------------------------------ agents

    def start_agent(self, node_name: str, *extra: str) -> None:
        assert self.etcd is not None
        node = self.nodes[node_name]
        node.agent_args = [
            "--k8s",
            "--kubeconfig",
            str(self.kubeconfig),
            "--node-name",
            node.name,
            "--etcd",
            self.etcd.endpoint,
            "--kvstore-prefix",
            self.prefix,
            "--kvstore-lease-ttl",
            "3",
            "--metrics",
            f"127.0.0.1:{node.metrics_port}",
            *extra,
        ]
        node.agent.start_agent(*node.agent_args)

    def kill_agent(self, node_name: str) -> None:
        """SIGKILL: the agent dies as a crashed node's would, its lease left to expire."""
        self.nodes[node_name].agent.stop_agent(signal.SIGKILL)

    def wait_attached(self, *pods: Pod, timeout: float = 30) -> None:
        for pod in pods:
            self.nodes[pod.node].agent.wait_status(
                lambda s, p=pod: any(
                    e["name"] == p.key
                    and e["identity"] is not None
                    and str(e["id"]) in map(str, s["datapath"]["attached"])
                    for e in (s or {}).get("endpoints", [])
                ),
                timeout,
                f"pod {pod.key} attached on {pod.node}",
            )

    def identity_of(self, pod: Pod) -> int:
        status = self.nodes[pod.node].status() or {}
        return next(e["identity"] for e in status["endpoints"] if e["name"] == pod.key)

    # ------------------------------------------------------------ traffic

    def spawn_in(self, pod: Pod, argv: list[str], ready: str, name: str) -> subprocess.Popen:
        log_path = self.root / f"{name}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                [*nsenter(pod.netns), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while ready not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return proc

    def serve_http(self, pod: Pod, port: int = 80) -> None:
        """Cilium's Star Wars deathstar API (``l7proxy.demo.deathstar``) on ``port``."""
        self.spawn_in(
            pod,
            [sys.executable, "-m", "l7proxy.demo.deathstar", "--port", str(port)],
            "deathstar ready",
            f"http-{pod.name}-{port}",
        )

    def curl(
        self, src: Pod, method: str, dst: Pod, path: str, port: int = 80, max_time: float = 2
    ) -> int | None:
        """The HTTP status ``src`` gets from ``dst``, read on the wire; None: no answer
        within ``max_time`` seconds."""
        done = subprocess.run(
            [*nsenter(src.netns), "curl", "-s", "-m", str(max_time), "-o", "/dev/null"]
            + ["-w", "%{http_code}", f"-X{method}", f"http://{dst.ip}:{port}{path}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        code = done.stdout.strip()
        return int(code) if code.isdigit() and code != "000" else None

    def wait_answer(
        self, src: Pod, method: str, dst: Pod, path: str, want: int | None, timeout: float = 15
    ) -> float:
        """Seconds until ``src`` gets ``want``; fails with the last answer after ``timeout``."""
        started = time.monotonic()
        while True:
            got = self.curl(src, method, dst, path)
            if got == want:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{src.key} {method} {dst.key}{path}: {got}, not {want}, after {timeout} s"
                )
            time.sleep(0.2)

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        for node in self.nodes.values():
            try:
                node.agent.teardown()  # the agent, its pins
            except Exception:  # noqa: BLE001 - go on removing everything else
                pass
        for netns in self._namespaces:  # pods first: their veths live in their node
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=20)


@contextmanager
def loop_in_thread() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """An event loop on a thread of its own for the API double and the test's client,
    so that the test's own thread may block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def test_cluster(
    nodes: int = 3, agent_args: dict[str, list[str]] | None = None
) -> Iterator[TestCluster]:
    """``nodes`` nodes with their agents running, on one etcd and one API double."""
    require_kernel()
    why = etcd_support.available()
    if why:
        import pytest

        pytest.skip(why)
    if shutil.which("nsenter") is None:
        import pytest

        pytest.skip("needs nsenter (util-linux)")
    root = Path(tempfile.mkdtemp(prefix="l7cluster-"))
    tag = secrets.token_hex(2)
    with loop_in_thread() as run:
        cluster = TestCluster(root, tag, run)
        try:
            cluster.make_bridge()
            with etcd_support.running_etcd(host=cluster.bridge_ip) as etcd:
                cluster.etcd = etcd
                cluster.kube_api = KubeApiDouble(
                    etcd, f"kube{tag}", host=cluster.bridge_ip, bookmark_every=0.5
                )
                try:
                    run(cluster.kube_api.start())
                    cluster.kube_api.write_kubeconfig(cluster.kubeconfig)
                    cluster.kubeclient = run(api_client(cluster.kubeconfig))
                    for i in range(1, nodes + 1):
                        cluster.add_node(i)
                    cluster.route_nodes()
                    for name in cluster.nodes:
                        cluster.start_agent(name, *(agent_args or {}).get(name, []))
                    yield cluster
                finally:
                    cluster.teardown()
                    if cluster.kubeclient is not None:
                        run(cluster.kubeclient.close())
                    run(cluster.kube_api.stop())
        finally:
            cluster.teardown()
            if os.environ.get("L7PROXY_KEEP_CLUSTER_LOGS"):  # agents' logs, for a post-mortem
                print(f"test cluster logs kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


test_cluster.__test__ = False  # type: ignore[attr-defined]
