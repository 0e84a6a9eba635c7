"""The node agent: datapath, proxy listeners and policy, kept in step.

``Agent.start`` loads the BPF program, installs the proxy's policy route,
opens one transparent listener per L7 parser family and registers it with the
datapath, then compiles the policy in force and writes it to the kernel maps.
``Agent.reconcile`` runs whenever endpoints or policies change: it recompiles
and updates maps in place (no program reload; open connections stay open and
their next request is judged by the new policy). ``Agent.stop`` detaches
everything, in reverse order.

Restarts lose nothing (docs/restarts.md): the BPF maps are pinned, and a new
agent started while this one runs takes over through ``STATE/agent.sock``
(l7proxy/agent/handover.py): it adopts the pinned maps and this agent's listening
sockets, replaces the tc programs in place, then this agent drains
(``Agent.drain_and_exit``) and leaves programs, pins and route to it. In cluster
mode it also hands over its etcd lease: it stops writing keys, and the new agent
moves the keys it owns off that lease before it revokes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from l7proxy import __version__
from l7proxy.agent.drain import drain_proxy
from l7proxy.agent.handover import ControlServer, Predecessor, socket_path
from l7proxy.datapath import pins
from l7proxy.node import netns
from l7proxy.node.endpoints import sync_pod_endpoints
from l7proxy.node.store import FAMILIES, AgentState, Store
from l7proxy.observe.flowlog import DEFAULT_ROTATION, FlowLog, Rotation, now_fields
from l7proxy.policy.engine import CompiledPolicy, Endpoint, compile_policy
from l7proxy.policy.errors import PolicyError
from l7proxy.policy.identity import Identity
from l7proxy.policy.model import EGRESS, INGRESS, Policy
from l7proxy.policy.source import PolicySource
from l7proxy.policy.state import PolicyState
from l7proxy.proxy.driver import ProxyLimits
from l7proxy.proxy.server import Proxy, make_listener
from l7proxy.proxy.tls import TlsStore

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from l7proxy.agent.cluster import ClusterLink
    from l7proxy.agent.workers import AgentWorkers, Command
    from l7proxy.cluster.store import ClusterConfig
    from l7proxy.datapath.loader import Datapath
    from l7proxy.kube.source import KubeConfig, KubeSource

log = logging.getLogger("l7proxy.agent.agent")

PROXY_HOST = "127.0.0.1"
# How long the control thread waits for the cluster keys to be handed over before it
# answers ``drain`` (ClusterStore.hand_over: about two etcd request timeouts at worst).
CLUSTER_HAND_OVER_TIMEOUT = 20.0


class Agent:
    def __init__(
        self,
        store: Store,
        *,
        audit: bool = False,
        extra_policies: Sequence[Path] = (),
        limits: ProxyLimits | None = None,
        predecessor: Predecessor | None = None,
        drain_timeout: float = 30.0,
        flowlog_rotation: Rotation = DEFAULT_ROTATION,
        drop_report_interval: float = 1.0,
        kube: KubeConfig | None = None,
        tls_secrets_dir: Path | None = None,
        cluster: ClusterConfig | None = None,
        devices: Sequence[str] = (),
        workers: int = 1,
        worker_command: Command | None = None,
        worker_metrics: bool = False,
    ):
        # ``run --workers N`` (N > 1): the proxy runs in N worker processes
        # (l7proxy/agent/workers.py) started with ``worker_command``; this process
        # keeps the datapath, the sources and the policy, and sends them the policy.
        self.worker_count = workers
        self.worker_command = worker_command
        self.worker_metrics = worker_metrics  # each worker serves its own, for /metrics
        self.workers: AgentWorkers | None = None
        self.drop_report_interval = drop_report_interval
        # Kubernetes (``run --k8s``): pods on this node become endpoints, CNPs and
        # CCNPs join the policy files' policies.
        self.kube_config = kube
        self.kube: KubeSource | None = None
        self._kube_api: ApiClient | None = None
        self._kube_pods_changed = False
        self._kube_policies_changed = False
        self.pods_waiting: list[str] = []  # pods whose IP has no route to a link yet
        # Cluster mode (``run --etcd``): endpoint identities and addresses in etcd, every
        # node's in the policy and the BPF ipcache (l7proxy/agent/cluster.py).
        self.cluster_config = cluster
        self.cluster: ClusterLink | None = None
        self._cluster_changed = False
        self._cluster_retried = 0.0
        # Node devices, where other nodes' traffic arrives: L7 redirects for it are made
        # there (cluster mode; default: the links holding the node's addresses).
        self.devices = list(devices)
        self._pods_retried = 0.0
        self.store = store
        self.predecessor = predecessor  # the running agent this one takes over from
        self.drain_timeout = drain_timeout  # what we give our predecessor
        self.control: ControlServer | None = None
        # Per family: the listening sockets (one, or one SO_REUSEPORT group with workers).
        self.listen_socks: dict[str, list[socket.socket]] = {}
        self.handed_over = False  # a successor owns the node now; we only drain
        self.handover_drain = drain_timeout  # what our successor gives us
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.audit = audit
        self.extra_policies = list(extra_policies)
        self.limits = limits or ProxyLimits()
        self.datapath: Datapath | None = None
        self.proxy: Proxy | None = None
        self.state: PolicyState | None = None
        self.flowlog = FlowLog(store.flowlog, rotation=flowlog_rotation)
        self.policies: list[Policy] = []  # the last good set, in force: files + Kubernetes
        self.file_policies: list[Policy] = []  # the policy files' last good set
        # terminatingTLS/originatingTLS: secrets as files, DIR/NAMESPACE/NAME/ITEM.
        self.tls = TlsStore(tls_secrets_dir or store.root / "secrets")
        self.policy_source = PolicySource(
            [store.policy_dir, *self.extra_policies], self._policies_loaded, verify=self._verify_tls
        )
        self.revision = 0
        self.kernel_revision = 0
        self.agent_state: AgentState | None = None
        self.listeners: dict[str, int] = {}
        self._stamp: tuple = ()
        self._routing = False
        self.started = time.time()
        self.metrics = None
        self._host_prefixes: list[ipaddress.IPv4Network] = []
        self._kexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l7proxy-kernel")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from l7proxy.datapath.loader import Datapath

        with self.store.locked() as st:
            for family in FAMILIES:
                if not st.proxy_ports.get(family):
                    st.proxy_ports[family] = _free_port()
            self.agent_state = st
        st = self.agent_state
        self._loop = asyncio.get_running_loop()
        self.datapath = Datapath(
            proxy_mark=st.proxy_mark,
            redirect_mark=st.redirect_mark,
            instance=st.instance,
            pin_dir=pins.pin_dir(st.instance),
            drop_report_interval=self.drop_report_interval,
        )
        inherited: dict = {}
        try:
            await self._kernel(self.datapath.load)
            await self._kernel(netns.ensure_forwarding)
            await self._kernel(netns.install_proxy_routing, st.redirect_mark, st.route_table)
            self._routing = True
            self._host_prefixes = await self._kernel(_host_prefixes)
            if self.predecessor is not None:  # revisions continue across a takeover
                self.revision = int(self.predecessor.info.get("policy_revision", 0))
            # A bad policy at start is reported in status; the node runs with none.
            self.policy_source.reload()
            if self.kube_config is not None:
                await self._start_kube(self.kube_config)
                st = self.agent_state = self.store.read()
            if self.cluster_config is not None:
                await self._start_cluster(self.cluster_config, st)
            self.state = PolicyState(self._compile(st))
            if self.worker_count == 1:
                self.proxy = Proxy(
                    self.state, self.flowlog, limits=self.limits, mark=st.proxy_mark, tls=self.tls
                )
            if self.predecessor is not None:
                # Same kernel sockets: their accept queue bridges the swap.
                inherited = await asyncio.to_thread(self.predecessor.listeners)
            for family, port in st.proxy_ports.items():
                socks = inherited.pop(family, [])
                for sock in [s for s in socks if s.getsockname()[1] != port]:
                    sock.close()
                    socks.remove(sock)
                self.listen_socks[family] = socks  # before any raise below: stop() closes them
                if not socks:
                    _refuse_if_taken(port)
                # SO_REUSEPORT even for one: a successor with workers adds to the group.
                while len(socks) < self.worker_count or not socks:
                    socks.append(make_listener(PROXY_HOST, port, transparent=True, reuse_port=True))
                if self.proxy is not None:
                    for sock in socks:  # a predecessor with workers handed over several
                        await self.proxy.listen(PROXY_HOST, port, sock=sock)
                # One member of the group: the kernel spreads its flows over the group.
                await self._kernel(self.datapath.register_proxy_listener, port, socks[0])
                self.listeners[family] = port
            if self.proxy is None:
                await self._start_workers(self.state.current)
            # Attaching replaces the programs in place (fixed tc prio/handle).
            await self._kernel(self._sync_kernel, self.state.current)
            await self._kernel(self.datapath.prune_adopted)
            self._stamp = self._watch_stamp()
            self.store.pid_file.write_text(str(os.getpid()))
            self.control = ControlServer(
                socket_path(self.store.root),
                hello=self._hello,
                listeners=self._give_listeners,
                drain=self._drain_requested,
            )
            self.control.start()
        except BaseException:
            for socks in inherited.values():
                for sock in socks:
                    sock.close()
            await self.stop()
            raise
        if self.predecessor is not None:
            pred, self.predecessor = self.predecessor, None
            reply: dict = {}
            try:
                reply = await asyncio.to_thread(pred.drain, self.drain_timeout, self._etcd_named())
                log.info(
                    "took over from agent pid %s (%s connections draining)",
                    pred.pid,
                    reply.get("connections"),
                )
            except Exception as exc:  # noqa: BLE001 - it may have died meanwhile; we serve anyway
                log.warning("predecessor pid %s did not confirm the drain: %s", pred.pid, exc)
            finally:
                pred.close()
            await self._take_over_cluster(reply.get("cluster_leases"))

    async def _start_workers(self, compiled: CompiledPolicy) -> None:
        from l7proxy.agent.workers import AgentWorkers

        assert self.worker_command is not None, "workers need their command"
        self.workers = AgentWorkers(
            self.listen_socks,
            self.worker_count,
            self.worker_command,
            with_metrics=self.worker_metrics,
        )
        if not await self.workers.start(compiled):
            raise RuntimeError("the proxy workers did not start (their errors are above)")
        log.info("%d proxy workers serving", self.worker_count)

    async def _start_kube(self, config: KubeConfig) -> None:
        """List (and go on watching) pods, namespaces and policies before the first
        compile, so the node starts with them (after at most ``sync_timeout``)."""
        from l7proxy.kube.secrets import SecretFiles
        from l7proxy.kube.source import KubeSource, api_client

        self._kube_api = await api_client(config.kubeconfig)
        secrets_dir = self.tls.secrets_dir
        self.kube = KubeSource(
            self._kube_api,
            config.node,
            on_change=self._kube_changed,
            timeout_seconds=config.timeout_seconds,
            backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap,
            # The Secrets of one namespace become the TLS secrets directory's files.
            secrets=SecretFiles(secrets_dir, config.secrets_namespace) if secrets_dir else None,
        )
        await self.kube.start(timeout=config.sync_timeout)
        self._merge_policies()
        await self._sync_pods()

    async def _start_cluster(self, config: ClusterConfig, st: AgentState) -> None:
        """Join the cluster before the first compile: every node's identities and
        ipcache are listed, and ours are in etcd, when the maps are first written."""
        from dataclasses import replace

        from l7proxy.agent.cluster import ClusterLink

        links = await self._kernel(netns.address_links)
        if not config.node_ips:
            config = replace(config, node_ips=tuple(str(ip) for _, ip in links))
        if not self.devices:
            self.devices = sorted({name for name, ip in links if str(ip) in config.node_ips})
        log.info(
            "cluster mode: node %s, addresses %s, devices %s",
            config.node,
            ", ".join(config.node_ips),
            ", ".join(self.devices),
        )
        self.cluster = ClusterLink(config, self._on_cluster_change)
        await self.cluster.start()
        await self._sync_cluster(st)

    def _on_cluster_change(self) -> None:
        self._cluster_changed = True

    async def _sync_cluster(self, st: AgentState) -> None:
        assert self.cluster is not None
        self._cluster_retried = time.monotonic()
        before = self.cluster.last
        report = await self.cluster.sync(st.endpoints)
        for name in sorted(set(report.waiting) - set(before.waiting)):
            log.warning("endpoint %s: waiting for its cluster-wide identity", name)

    async def _stop_cluster(self, *, revoke: bool = True) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.stop(revoke=revoke)

    def _etcd_named(self) -> dict | None:
        """What ``drain`` tells the predecessor of our cluster: the etcd we write to."""
        if self.cluster is None:
            return None
        host, port = self.cluster.config.etcd
        return {"etcd": f"{host}:{port}"}

    async def _take_over_cluster(self, leases: object) -> None:
        """The predecessor handed us its leases: keep them alive, and complete the
        takeover in a sync that reaches etcd in full (now, or in ``run``'s retries)."""
        if self.cluster is None or not isinstance(leases, list) or not leases:
            return
        try:
            await self.cluster.take_over([int(lease) for lease in leases])
        except Exception as exc:  # noqa: BLE001 - its keys then expire with its lease
            log.warning("could not take over the predecessor's etcd leases: %s", exc)
            return
        # Pods the predecessor saw that we have not published yet would go with its lease:
        # publish from the freshest view of the node's pods first.
        if self.kube is not None:
            await self._sync_pods()
        self.agent_state = self.store.read()
        await self._sync_cluster(self.agent_state)

    def _kube_changed(self, what: str) -> None:
        if what == "pods":
            self._kube_pods_changed = True
        else:
            self._kube_policies_changed = True

    async def _sync_pods(self) -> None:
        """The store's pod endpoints := the pods Kubernetes runs here (a changed state
        file makes ``run`` reconcile)."""
        assert self.kube is not None
        self._kube_pods_changed = False
        self._pods_retried = time.monotonic()
        waiting = await self._kernel(sync_pod_endpoints, self.store, self.kube.endpoints())
        for name in sorted(set(waiting) - set(self.pods_waiting)):
            log.warning("pod %s: no /32 route to its IP via a link yet; waiting for its CNI", name)
        self.pods_waiting = waiting

    async def _stop_kube(self) -> None:
        kube, api = self.kube, self._kube_api
        self.kube = self._kube_api = None
        if kube is not None:
            await kube.stop()
        if api is not None:
            await api.close()

    async def _kernel(self, fn, *args):
        """Run a datapath/netlink call on the agent's one kernel thread.

        pyroute2 drives its own asyncio loop internally, which cannot nest in
        ours, and bcc is not thread-safe: one dedicated thread serialises both."""
        return await asyncio.get_running_loop().run_in_executor(self._kexec, fn, *args)

    async def stop(self) -> None:
        """Full stop: detach, unpin, remove the route. A takeover that failed
        before its predecessor was told to drain only lets go: the predecessor
        still runs on the same programs, pins and route."""
        await self._stop_kube()
        # A takeover that failed leaves our keys to expire: the predecessor's upkeep
        # puts them back on its own lease, where revoking ours would delete them.
        await self._stop_cluster(revoke=self.predecessor is None)
        if self.control is not None:
            self.control.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.workers is not None:
            await self.workers.stop()
        for socks in self.listen_socks.values():
            for sock in socks:
                sock.close()
        predecessor, self.predecessor = self.predecessor, None
        letting_go = predecessor is not None
        if predecessor is not None:
            predecessor.close()
        if self.datapath is not None:
            with contextlib.suppress(Exception):
                await self._kernel(self.datapath.close, letting_go)
        if letting_go:
            self._kexec.shutdown(wait=True)
            self.flowlog.close()
            return
        if self._routing and self.agent_state is not None:
            with contextlib.suppress(Exception):
                await self._kernel(
                    netns.remove_proxy_routing,
                    self.agent_state.redirect_mark,
                    self.agent_state.route_table,
                )
            self._routing = False
        self._kexec.shutdown(wait=True)
        self.flowlog.close()
        for f in (self.store.pid_file, self.store.status_file):
            f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ handover

    def _hello(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "listeners": dict(self.listeners),
            "policy_revision": self.revision,
        }

    def _give_listeners(self) -> tuple[list[str], list[int]]:
        pairs = [(f, sock) for f, socks in self.listen_socks.items() for sock in socks]
        return [f for f, _ in pairs], [sock.fileno() for _, sock in pairs]

    def _drain_requested(self, timeout: float, cluster: dict | None) -> dict:
        """Called on the control thread: the successor is serving. One on our etcd
        takes our keys over: we stop writing them before we answer with our lease."""
        reply: dict = {"draining": True}
        leases = self._hand_over_cluster(cluster)
        if leases is not None:
            reply["cluster_leases"] = leases
        self.handed_over = True  # from now on, never write status or kernel state
        self.handover_drain = timeout
        if self._stop is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        reply["connections"] = self._connections_active()
        return reply

    def _hand_over_cluster(self, successor: dict | None) -> list[int] | None:
        """On the control thread: our leases for a successor on the same etcd, once our
        cluster link writes no more; None when it takes nothing over (we revoke our
        lease as we drain, as before)."""
        link, loop = self.cluster, self._loop
        if link is None or loop is None or successor is None:
            return None
        host, port = link.config.etcd
        if successor.get("etcd") != f"{host}:{port}":
            log.warning(
                "the successor writes to etcd %s, we to %s:%s: our keys go as we drain",
                successor.get("etcd"),
                host,
                port,
            )
            return None
        try:
            leases = asyncio.run_coroutine_threadsafe(link.hand_over(), loop).result(
                CLUSTER_HAND_OVER_TIMEOUT
            )
        except Exception as exc:  # noqa: BLE001 - the successor's keys are on its lease anyway
            log.warning("cluster keys not handed over (our lease expires on its own): %s", exc)
            return None
        return leases

    def _connections_active(self) -> int:
        if self.workers is not None:
            return int(self.workers.totals()["connections_active"])
        return self.proxy.connections if self.proxy else 0

    async def drain_and_exit(self, cut_short: asyncio.Event | None = None) -> dict:
        """After a handover: stop accepting, let open connections finish until
        the drain deadline, then end each one the way its protocol allows without
        losing a request (``Proxy.close_when_idle``: ``Connection: close``, GOAWAY,
        or right behind an answer), giving them IN_FLIGHT_GRACE to get there, and
        let go of the kernel without undoing anything (the successor uses the same
        programs, pins and route)."""
        assert (self.proxy or self.workers) is not None and self.datapath is not None
        await self._stop_kube()  # the successor watches Kubernetes now
        # A successor that took our lease over revokes it once it has moved its keys off
        # it (the store revokes nothing after hand_over); for one that did not, ours go.
        await self._stop_cluster()
        if self.control is not None:
            self.control.close()
            self.control = None
        cut_short = cut_short or asyncio.Event()
        if self.workers is not None:  # every worker drains its own connections
            report = await self.workers.drain(self.handover_drain, cut_short)
        else:
            assert self.proxy is not None
            report = await drain_proxy(self.proxy, self.handover_drain, cut_short)
        with contextlib.suppress(Exception):
            await self._kernel(self.datapath.close, True)
        self._kexec.shutdown(wait=True)
        self.flowlog.close()
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile on change, drain kernel drop events, publish status, until ``stop``."""
        assert self.datapath is not None, "start() first"
        self._stop = stop
        last_status = 0.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
            if self.handed_over:
                break
            policies_changed = self.policy_source.poll()
            self.tls.poll()  # certificates changed on disk: for new connections
            if self._kube_policies_changed:
                self._kube_policies_changed = False
                self._merge_policies()
                policies_changed = True
            if self.kube is not None and (
                self._kube_pods_changed
                or (self.pods_waiting and time.monotonic() - self._pods_retried >= 1.0)
            ):
                await self._sync_pods()
            cluster = self.cluster
            cluster_changed = self._cluster_changed or (
                cluster is not None
                and bool(cluster.last.waiting or cluster.last.error or cluster.taking_over)
                and time.monotonic() - self._cluster_retried >= 1.0
            )
            stamp = self._watch_stamp()
            if policies_changed or stamp != self._stamp or cluster_changed:
                self._stamp = stamp
                await self.reconcile()
            self.emit_drops(await self._kernel(self.datapath.poll_drops, 0))
            now = time.monotonic()
            if now - last_status >= 1.0:
                last_status = now
                self.flowlog.flush()
                self.write_status(await self._kernel(self.datapath.status))

    # ------------------------------------------------------------------ policy

    def _policies_loaded(self, policies: list[Policy]) -> None:
        self.file_policies = policies
        self._merge_policies()

    def _verify_tls(self, file_policies: list[Policy]) -> None:
        """A file policy set takes effect only if every TLS file it names loads."""
        self.tls.update(file_policies + (self.kube.policies() if self.kube else []))

    def _merge_policies(self) -> None:
        kube = self.kube.policies() if self.kube else []
        if self.kube is not None:
            # Kubernetes policies, and Secrets that came or changed: their contexts.
            try:
                self.tls.update(self.file_policies + kube)
            except PolicyError as err:
                # Its connections are not terminated, so they fail closed.
                log.error("a Kubernetes policy names TLS files that do not load: %s", err)
        self.policies = self.file_policies + kube

    def _compile(self, st: AgentState) -> CompiledPolicy:
        alloc = st.allocator()
        remote: list[Identity] = []
        remote_ipcache: dict[ipaddress.IPv4Network, int] = {}
        if self.cluster is None:
            endpoints = [
                Endpoint(e.id, e.name, alloc.for_labels(e.labels), ipaddress.IPv4Address(e.ip))
                for e in st.endpoints
            ]
        else:
            # Cluster-wide numbers; an endpoint still waiting for its number is left out
            # (not attached) until it has one.
            self._cluster_changed = False
            alloc = self.cluster.allocator(alloc)
            remote = self.cluster.identities()
            remote_ipcache = self.cluster.ipcache()
            endpoints = [
                Endpoint(
                    e.id,
                    e.name,
                    Identity(number, tuple(sorted(e.labels.items())), "endpoint"),
                    ipaddress.IPv4Address(e.ip),
                )
                for e in st.endpoints
                if (number := self.cluster.number_for(e.labels)) is not None
            ]
        self.revision += 1
        return compile_policy(
            self.policies,
            endpoints,
            alloc,
            revision=self.revision,
            audit_all=self.audit,
            host_prefixes=self._host_prefixes,
            remote_identities=remote,
            remote_ipcache=remote_ipcache,
        )

    async def reconcile(self) -> None:
        """Endpoints or policies changed: recompile, then update maps in place."""
        self.agent_state = self.store.read()
        if self.cluster is not None:
            await self._sync_cluster(self.agent_state)
        compiled = self._compile(self.agent_state)
        assert self.state is not None, "start() first"
        self.state.swap(compiled)
        if self.workers is not None:
            self.workers.publish(compiled)
        await self._kernel(self._sync_kernel, compiled)
        log.info(
            "policy revision %d: %d policies, %d endpoints",
            compiled.revision,
            len(self.policies),
            len(compiled.endpoints),
        )

    def _sync_kernel(self, compiled: CompiledPolicy) -> None:
        from l7proxy.datapath.loader import EndpointInfo

        if self.handed_over:
            return  # the kernel state is the successor's
        assert self.datapath is not None and self.agent_state is not None, "start() first"
        dp = self.datapath
        # every link: a pod's veth is named by its CNI, not by us
        links = dict(netns.list_links(""))
        desired = {}
        for rec in self.agent_state.endpoints:
            ifindex = links.get(rec.host_ifname)
            if ifindex is None:
                log.warning("endpoint %s has no veth %s; skipping", rec.name, rec.host_ifname)
                continue
            ep = compiled.endpoints.get(rec.id)
            if ep is None:
                continue  # waiting for its cluster-wide identity
            ing = compiled.directions[(rec.id, INGRESS)]
            eg = compiled.directions[(rec.id, EGRESS)]
            desired[rec.id] = EndpointInfo(
                endpoint_id=rec.id,
                ifindex=ifindex,
                ip=ipaddress.IPv4Address(rec.ip),
                identity=ep.identity.number,
                ingress_enforced=ing.enforced,
                egress_enforced=eg.enforced,
                audit=self.audit or (ing.enforced and ing.audit) or (eg.enforced and eg.audit),
            )
        attached = dp.status()["attached"]
        for ep_id in [i for i in attached if i not in desired]:
            dp.detach(ep_id)
        for name in self.devices if self.cluster_config is not None else ():
            if name in links:
                dp.attach_device(links[name])
            else:
                log.warning(
                    "device %s not found; traffic from other nodes arriving there "
                    "cannot be sent to the proxy",
                    name,
                )
        dp.sync_ipcache(compiled.ipcache.prefixes)
        dp.sync_policy(compiled.kernel_entries(self.listeners or self.agent_state.proxy_ports))
        for ep_id, info in desired.items():
            if ep_id in attached and attached[ep_id] == info.ifindex:
                dp.set_endpoint(info)
            else:
                dp.attach(info)
        self.kernel_revision = compiled.revision  # the maps now say what this policy says

    def _watch_stamp(self) -> tuple:
        """The endpoint state file's stamp (policy files are the policy source's)."""
        with contextlib.suppress(FileNotFoundError):
            st = self.store.state_file.stat()
            return (st.st_mtime_ns, st.st_size)
        return ()

    # ------------------------------------------------------------------ observation

    def emit_drops(self, events) -> None:
        if not events:
            return
        assert self.state is not None, "start() first"
        compiled = self.state.current
        by_id = {ep.id: ep for ep in compiled.endpoints.values()}
        for ev in events:
            src_ep = compiled.endpoints_by_ip.get(str(ev.src_ip))
            dst_ep = compiled.endpoints_by_ip.get(str(ev.dst_ip))
            rec = now_fields()
            rec.update(
                type="drop",
                protocol={6: "tcp", 17: "udp"}.get(ev.proto, str(ev.proto)),
                source=_side(ev.src_ip, ev.src_port, ev.src_identity, src_ep, compiled),
                destination=_side(ev.dst_ip, ev.dst_port, ev.dst_identity, dst_ep, compiled),
                verdict="AUDIT" if ev.audited else "DROPPED",
                reason=ev.reason,
                direction=ev.direction,
                endpoint=by_id[ev.endpoint_id].name if ev.endpoint_id in by_id else None,
                policy="",
                rule="",
                count=ev.count,
            )
            self.flowlog.emit(rec)

    def status(self, dp_status: dict) -> dict:
        from parsers.registry import active_parsers

        compiled = self.state.current if self.state else None
        policy_error = self.policy_source.last_error
        in_sync = compiled is not None and self.kernel_revision == compiled.revision
        listeners_up = bool(self.proxy) and set(self.listeners) == set(FAMILIES)
        workers = self.workers
        if workers is not None:  # every worker serves, on the policy in force
            in_sync = in_sync and workers.in_sync
            listeners_up = workers.serving and set(self.listeners) == set(FAMILIES)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "healthy": bool(dp_status.get("loaded"))
            and policy_error is None
            and in_sync
            and listeners_up
            and (self.kube is None or self.kube.synced),
            "maps_in_sync": in_sync,
            "listeners_up": listeners_up,
            "datapath": dp_status,
            "endpoints": [
                {
                    **asdict(e),
                    "identity": compiled.endpoints[e.id].identity.number
                    if compiled and e.id in compiled.endpoints
                    else None,
                }
                for e in (self.agent_state.endpoints if self.agent_state else [])
            ],
            "policies": [
                {"name": p.key, "source": p.source, "audit": p.audit} for p in self.policies
            ],
            "policy_revision": compiled.revision if compiled else 0,
            "policy_error": str(policy_error) if policy_error else None,
            "policy_imports": self.policy_source.imports,
            "policy_import_errors": self.policy_source.import_errors,
            "listeners": {fam: f"{PROXY_HOST}:{port}" for fam, port in self.listeners.items()},
            "parsers": active_parsers(),
            "proxy": workers.totals()
            if workers is not None
            else {
                "connections_total": self.proxy.stats.connections_total if self.proxy else 0,
                "connections_active": self.proxy.stats.connections_active if self.proxy else 0,
                "parse_errors": dict(self.proxy.stats.parse_errors) if self.proxy else {},
                "tls_handshake_failures": self.proxy.stats.tls_handshake_failures
                if self.proxy
                else 0,
            },
            "workers": None
            if workers is None
            else {"count": workers.count, "restarts": workers.restarts, "each": workers.status()},
            "audit": self.audit,
            "tls": self.tls.status(),
            "kubernetes": None
            if self.kube is None
            else {**self.kube.status(), "pods_waiting": self.pods_waiting},
            "cluster": None if self.cluster is None else self.cluster.status(),
        }

    async def publish_status(self) -> None:
        """Write the status file from a fresh read of the datapath."""
        assert self.datapath is not None, "start() first"
        self.write_status(await self._kernel(self.datapath.status))

    def write_status(self, dp_status: dict) -> None:
        if self.handed_over:
            return  # the status file is the successor's
        tmp = self.store.status_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.status(dp_status), indent=1, default=str))
        os.replace(tmp, self.store.status_file)


def _side(ip, port, identity, ep, compiled: CompiledPolicy) -> dict:
    if not identity:  # a drop report from the kernel's tail sweep names no identity
        identity = ep.identity.number if ep else compiled.ipcache.lookup(str(ip))
    ident = compiled.identities.get(identity)
    return {
        "ip": str(ip),
        "port": port,
        "identity": identity,
        "endpoint": ep.name if ep else None,
        "labels": ident.label_map if ident else {},
    }


def _host_prefixes() -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(f"{ip}/32") for ip in netns.host_addresses()]


def _refuse_if_taken(port: int) -> None:
    """A new reuseport group must be ours alone: a socket of another process listening
    on the port (another agent's state dir with the same port) would otherwise be
    joined silently, and the kernel would spread our flows over both. A plain bind
    fails on a listened-on port, as the agent's bind did before its listeners were
    reuseport."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((PROXY_HOST, port))
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {PROXY_HOST}:{port}: {exc.strerror}"
            ) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((PROXY_HOST, 0))
        return s.getsockname()[1]
