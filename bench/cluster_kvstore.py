"""The cluster control plane at scale, against a real etcd: each agent a process.

    python -m bench.cluster_kvstore [--agents 10] [--label-sets 1000] [--ips 10000]
                                    [--probes 50] [--rate 0]
                                    [--memory-identities 10000] [--memory-ips 100000]

Control plane only: no BPF, no namespaces. Every agent is a process of its own
holding one ``ClusterStore`` (its own etcd connection, lease, allocator and three
watches), driven by this process over a pipe, against one etcd with its data on
tmpfs. Times across processes are read from the one system-wide monotonic clock.

- allocation: every agent allocates every label set at the same moment (each
  from a different starting point), so every label set is raced by all agents.
  Checked from etcd afterwards: 0 duplicates (two label sets with one number),
  0 split label sets (one label set whose references carry two numbers).
- propagation: one agent allocates a new label set; the time until the *last*
  agent's watch has it, per probe.
- ipcache: each agent writes its share of the IPs at once; the time until every
  agent's copy holds all of them, then the same for their deletion.
- requests: etcd requests per pod create and delete, as the agent makes them
  (a pod of a new label set, a pod of a label set the node already holds).
- memory: a fresh agent process lists ``--memory-identities`` identities and
  ``--memory-ips`` ipcache entries (written in bulk beforehand): its RSS before
  and after, the time to list, and the time the agent takes to compile a policy
  against all of it (what it does on every remote change).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench.common import markdown_table, percentile, tool_version, write_results
from l7proxy.cluster.keys import IpEntry, Layout, encode_labels
from l7proxy.cluster.kv import Etcd, KvError, Put, Txn
from l7proxy.cluster.protect import Backoff
from l7proxy.cluster.store import ClusterConfig, ClusterStore, IdentityChange
from tests.support.etcd import ETCD, available, running_etcd

# --------------------------------------------------------------------- the agent process


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Agent:
    """What runs in each agent process: one store, and the commands the bench sends."""

    def __init__(self, config: ClusterConfig) -> None:
        self.store = ClusterStore(config)
        self.arrivals: dict[int, float] = {}
        self.retries = 0  # requests etcd refused ("too many requests"), tried again
        self.store.subscribe(self._seen)

    def _seen(self, change: object) -> None:
        if isinstance(change, IdentityChange) and change.labels is not None:
            self.arrivals.setdefault(change.number, time.monotonic())

    async def _retrying(self, work: Any) -> Any:
        """As the agent does (it syncs again until done): back off with jitter, try again."""
        backoff = Backoff(0.05, 5.0)
        while True:
            try:
                return await work()
            except KvError:
                self.retries += 1
                await asyncio.sleep(backoff.next())

    async def handle(self, command: str, args: Any) -> Any:
        s = self.store
        if command == "start":
            await s.start(timeout=120)
            return None
        if command == "allocate":
            return list(
                await asyncio.gather(
                    *(self._retrying(lambda labels=labels: s.allocate(labels)) for labels in args)
                )
            )
        if command == "arrival":
            return self.arrivals.get(args)
        if command == "upsert_ips":
            ips, identity = args
            await asyncio.gather(
                *(self._retrying(lambda ip=ip: s.upsert_ip(ip, identity)) for ip in ips)
            )
            return None
        if command == "delete_ips":
            await asyncio.gather(*(self._retrying(lambda ip=ip: s.delete_ip(ip)) for ip in args))
            return None
        if command == "wait_ipcache":  # -> when our copy held exactly that many entries
            count, timeout = args
            deadline = time.monotonic() + timeout
            while len(s.ipcache) != count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ipcache holds {len(s.ipcache)}, not {count}")
                await asyncio.sleep(0.002)
            return time.monotonic()
        if command == "requests":
            return {**s.kv.requests, "refused_and_retried": self.retries}
        if command == "pod_create":  # as the agent does: reference the labels, publish the IP
            labels, ip = args
            number = await s.allocate(labels)
            await s.upsert_ip(ip, number)
            return number
        if command == "pod_delete":
            labels, ip = args
            await s.delete_ip(ip)
            await s.release(labels)
            return None
        if command == "rss":
            return _rss_kib()
        if command == "stop":
            await s.stop()
            return None
        raise ValueError(command)


def _agent_main(conn: Connection, config: ClusterConfig) -> None:
    async def serve() -> None:
        agent = _Agent(config)
        loop = asyncio.get_running_loop()
        while True:
            command, args = await loop.run_in_executor(None, conn.recv)
            try:
                conn.send(("ok", await agent.handle(command, args)))
            except Exception as e:  # noqa: BLE001 - reported to the bench, which fails
                conn.send(("error", f"{type(e).__name__}: {e}"))
            if command == "stop":
                return

    asyncio.run(serve())


class Agents:
    """The agent processes, addressed together or one by one."""

    def __init__(self, configs: Sequence[ClusterConfig]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for config in configs:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_agent_main, args=(theirs, config), daemon=True)
            proc.start()
            self.conns.append(ours)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.conns)

    def send(self, i: int, command: str, args: Any = None) -> None:
        self.conns[i].send((command, args))

    def recv(self, i: int) -> Any:
        status, value = self.conns[i].recv()
        if status != "ok":
            raise RuntimeError(f"agent {i}: {value}")
        return value

    def call(self, i: int, command: str, args: Any = None) -> Any:
        self.send(i, command, args)
        return self.recv(i)

    def all(self, command: str, args: Sequence[Any] | None = None) -> list[Any]:
        """The same command to every agent at once (``args``: one per agent)."""
        for i in range(len(self)):
            self.send(i, command, None if args is None else args[i])
        return [self.recv(i) for i in range(len(self))]

    def requests(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.all("requests"):
            total.update(r)
        return total

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                try:
                    self.call(i, "stop")
                except (OSError, EOFError, RuntimeError):
                    pass
                proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# --------------------------------------------------------------------- measures


def _sent(requests: Counter[str]) -> int:
    """Requests sent to etcd (a refused one was counted when sent; its retry is another)."""
    return sum(n for kind, n in requests.items() if kind != "refused_and_retried")


def labels_of(i: int) -> dict[str, str]:
    return {"k8s:app": f"svc-{i}", "k8s:io.kubernetes.pod.namespace": "bench"}


def allocation(agents: Agents, label_sets: int, layout: Layout, etcd: tuple[str, int]) -> dict:
    sets = [labels_of(i) for i in range(label_sets)]
    step = max(1, label_sets // len(agents))
    orders = [
        list(range(label_sets))[i * step :] + list(range(label_sets))[: i * step]
        for i in range(len(agents))
    ]
    before = agents.requests()
    started = time.monotonic()
    numbers = agents.all("allocate", [[sets[j] for j in order] for order in orders])
    wall = time.monotonic() - started
    used = agents.requests() - before
    results = [
        dict(zip(order, got, strict=True)) for order, got in zip(orders, numbers, strict=True)
    ]

    numbers_per_set = [{r[j] for r in results} for j in range(label_sets)]
    sets_per_number: dict[int, set[int]] = defaultdict(set)
    for r in results:
        for j, n in r.items():
            sets_per_number[n].add(j)

    async def read_etcd() -> tuple[list, list]:
        kv = Etcd(*etcd, rate=0)
        await kv.connect()
        try:
            ids, _ = await kv.list_prefix(layout.ids)
            refs, _ = await kv.list_prefix(layout.values)
            return ids, refs
        finally:
            await kv.close()

    ids, refs = asyncio.run(read_etcd())
    ref_numbers: dict[str, set[bytes]] = defaultdict(set)
    for ref in refs:
        split = layout.split_ref(ref.key)
        assert split is not None
        ref_numbers[split[0]].add(ref.value)
    id_values = Counter(kv.value for kv in ids)
    allocations = len(agents) * label_sets
    return {
        "agents": len(agents),
        "label_sets": label_sets,
        "allocations": allocations,
        "wall_s": round(wall, 2),
        "allocations_per_s": round(allocations / wall, 1),
        "duplicates": sum(len(s) > 1 for s in sets_per_number.values()),
        "split_label_sets": sum(len(n) > 1 for n in numbers_per_set),
        "etcd_id_keys": len(ids),
        "etcd_label_sets_with_two_id_keys": sum(n > 1 for n in id_values.values()),
        "etcd_split_references": sum(len(v) > 1 for v in ref_numbers.values()),
        "etcd_references": len(refs),
        "transactions": used["txn"],
        "etcd_requests_per_allocation": round(_sent(used) / allocations, 3),
        "etcd_requests": dict(used),
    }


def propagation(agents: Agents, probes: int) -> dict[str, Any]:
    last_agent: list[float] = []
    for i in range(probes):
        started = time.monotonic()
        [number] = agents.call(i % len(agents), "allocate", [{"k8s:probe": str(i)}])
        deadline = started + 10
        while True:
            seen = agents.all("arrival", [number] * len(agents))
            if all(t is not None for t in seen):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"identity {number} did not reach every agent in 10 s")
            time.sleep(0.002)
        last_agent.append((max(seen) - started) * 1000)
    return {
        "probes": probes,
        "agents": len(agents),
        "allocate_to_last_agent_ms": {
            "p50": round(percentile(last_agent, 50), 2),
            "p99": round(percentile(last_agent, 99), 2),
            "max": round(max(last_agent), 2),
        },
    }


def ipcache(agents: Agents, ips: int) -> dict[str, Any]:
    per_agent = ips // len(agents)
    total = per_agent * len(agents)
    addresses = [
        [f"10.{64 + i}.{j // 250}.{j % 250 + 1}" for j in range(per_agent)]
        for i in range(len(agents))
    ]
    before = agents.requests()
    started = time.monotonic()
    for i in range(len(agents)):
        agents.send(i, "upsert_ips", (addresses[i], 300 + i))
    for i in range(len(agents)):
        agents.recv(i)
    writes_done = time.monotonic() - started
    converged = max(agents.all("wait_ipcache", [(total, 600)] * len(agents))) - started
    put_requests = agents.requests() - before

    before = agents.requests()
    started = time.monotonic()
    agents.all("delete_ips", addresses)
    deletes_done = time.monotonic() - started
    gone = max(agents.all("wait_ipcache", [(0, 600)] * len(agents))) - started
    delete_requests = agents.requests() - before
    return {
        "ips": total,
        "writers": len(agents),
        "writes_s": round(writes_done, 2),
        "every_agent_has_all_s": round(converged, 2),
        "deletes_s": round(deletes_done, 2),
        "every_agent_has_none_s": round(gone, 2),
        "etcd_requests_per_ip_write": round(_sent(put_requests) / total, 3),
        "etcd_requests_per_ip_delete": round(_sent(delete_requests) / total, 3),
    }


def pod_requests(agents: Agents) -> dict[str, Any]:
    """etcd requests the agent makes per pod, counted on the agent's own client."""

    def counted(command: str, args: Any) -> int:
        before = Counter(agents.call(0, "requests"))
        agents.call(0, command, args)
        return _sent(Counter(agents.call(0, "requests")) - before)

    fresh = {"k8s:app": "pod-bench", "k8s:io.kubernetes.pod.namespace": "bench"}
    return {
        "create_new_label_set": counted("pod_create", (fresh, "10.250.0.1")),
        "create_label_set_held": counted("pod_create", (fresh, "10.250.0.2")),
        "delete_label_set_still_used": counted("pod_delete", (fresh, "10.250.0.2")),
        "delete_last_of_label_set": counted("pod_delete", (fresh, "10.250.0.1")),
    }


# --------------------------------------------------------------------- memory


async def _fill(etcd: tuple[str, int], layout: Layout, identities: int, ips: int) -> float:
    """Write the keys in bulk (128 puts a transaction, etcd's default limit)."""
    kv = Etcd(*etcd, rate=0)
    await kv.connect()
    started = time.monotonic()
    try:
        puts = [
            Put(layout.id_key(256 + i), encode_labels(labels_of(i)).encode())
            for i in range(identities)
        ]
        for i in range(ips):
            ip = f"10.{128 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"
            entry = IpEntry(ip, 256 + i % identities, "192.0.2.1", f"node-{i % 5000}")
            puts.append(Put(layout.ip_key(ip), entry.to_json()))
        for start in range(0, len(puts), 128):
            await kv.txn(Txn((), tuple(puts[start : start + 128])))
    finally:
        await kv.close()
    return time.monotonic() - started


def _memory_main(conn: Connection, config: ClusterConfig, identities: int, ips: int) -> None:
    import gc

    from l7proxy.agent.cluster import ClusterLink
    from l7proxy.policy.engine import Endpoint, compile_policy
    from l7proxy.policy.identity import Identity, IdentityAllocator
    from l7proxy.policy.load import load_text

    policy = load_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: svc-0}}\n  ingress:\n"
        "  - fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: bench}}]\n"
    )

    async def measure() -> dict[str, Any]:
        gc.collect()
        baseline = _rss_kib()
        link = ClusterLink(config, lambda: None)
        started = time.monotonic()
        await link.start(timeout=600)
        listed = time.monotonic() - started
        gc.collect()
        store_rss = _rss_kib()
        assert len(link.store.identities) == identities and len(link.store.ipcache) == ips
        started = time.monotonic()
        remote = link.identities()
        remote_ipcache = link.ipcache()
        local = Identity(
            256, (("app", "svc-0"), ("io.kubernetes.pod.namespace", "bench")), "endpoint"
        )
        compiled = compile_policy(
            policy,
            [Endpoint(1, "bench/svc-0", local, None)],
            link.allocator(IdentityAllocator()),
            remote_identities=remote,
            remote_ipcache=remote_ipcache,
        )
        compile_s = time.monotonic() - started
        gc.collect()
        compiled_rss = _rss_kib()
        peers = compiled.directions[(1, "ingress")].rules[0].peer_ids
        await link.stop()
        return {
            "identities": identities,
            "ipcache_entries": ips,
            "list_s": round(listed, 2),
            "rss_before_mib": round(baseline / 1024, 1),
            "rss_with_store_mib": round(store_rss / 1024, 1),
            "store_mib": round((store_rss - baseline) / 1024, 1),
            "rss_with_compiled_policy_mib": round(compiled_rss / 1024, 1),
            "compiled_policy_mib": round((compiled_rss - store_rss) / 1024, 1),
            "compile_s": round(compile_s, 2),
            "selector_matched_identities": len(peers or ()),
        }

    conn.send(asyncio.run(measure()))


def memory(etcd: tuple[str, int], prefix: str, identities: int, ips: int) -> dict[str, Any]:
    layout = Layout(prefix)
    fill_s = asyncio.run(_fill(etcd, layout, identities, ips))
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    config = ClusterConfig(node="memory", etcd=etcd, prefix=prefix, rate=0, lease_ttl=60)
    proc = ctx.Process(target=_memory_main, args=(theirs, config, identities, ips), daemon=True)
    proc.start()
    try:
        if not ours.poll(900):
            raise RuntimeError("the memory agent did not finish in 15 min")
        return {"fill_s": round(fill_s, 2), **ours.recv()}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# --------------------------------------------------------------------- main


def run(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    prefix = f"bench-{int(time.time())}/state"
    configs = [
        ClusterConfig(
            node=f"node-{i}",
            etcd=(host, port),
            prefix=prefix,
            node_ips=(f"192.0.2.{i + 1}",),
            rate=args.rate,
            burst=max(args.rate, 1),
            lease_ttl=120,
        )
        for i in range(args.agents)
    ]
    agents = Agents(configs)
    try:
        agents.all("start")
        rss = agents.all("rss")
        results = {
            "allocation": allocation(agents, args.label_sets, Layout(prefix), (host, port)),
            "propagation": propagation(agents, args.probes),
            "ipcache": ipcache(agents, args.ips),
            "pod_requests": pod_requests(agents),
            "agent_rss_after_start_mib": round(max(rss) / 1024, 1),
        }
    finally:
        agents.close()
    results["memory"] = memory(
        (host, port), f"{prefix}-memory", args.memory_identities, args.memory_ips
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--label-sets", type=int, default=1000)
    parser.add_argument("--ips", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--memory-identities", type=int, default=10_000)
    parser.add_argument("--memory-ips", type=int, default=100_000)
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="etcd requests/s per agent, the agent's own budget (default 20, Cilium's "
        "etcd.qps; 0: none)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    why = available()
    if why:
        print(f"bench.cluster_kvstore: {why}", file=sys.stderr)
        return 2
    with running_etcd() as etcd:
        results = run(args, etcd.host, etcd.port)
    a, p, ip, m = (
        results["allocation"],
        results["propagation"],
        results["ipcache"],
        results["memory"],
    )
    pods = results["pod_requests"]
    lag = p["allocate_to_last_agent_ms"]
    path = write_results(
        "cluster_kvstore",
        {
            "settings": {
                **vars(args),
                "etcd": tool_version([ETCD, "--version"]),
                "agents_are": "processes",
                "cpus": os.cpu_count(),
            },
            "headline": {
                "duplicates": a["duplicates"],
                "split_label_sets": a["split_label_sets"],
                "etcd_requests_per_allocation": a["etcd_requests_per_allocation"],
                "identity_to_last_agent_p50_ms": lag["p50"],
                "ipcache_converged_s": ip["every_agent_has_all_s"],
                "agent_store_mib": m["store_mib"],
            },
            **results,
        },
    )
    print(
        markdown_table(
            ["measure", "value"],
            [
                [
                    f"allocations ({a['agents']} agents x {a['label_sets']} label sets)",
                    a["allocations"],
                ],
                ["duplicates / split label sets", f"{a['duplicates']} / {a['split_label_sets']}"],
                ["etcd requests per allocation", a["etcd_requests_per_allocation"]],
                [
                    "identity to last agent p50 / p99 / max (ms)",
                    f"{lag['p50']} / {lag['p99']} / {lag['max']}",
                ],
                [f"ipcache: {ip['ips']} IPs on every agent (s)", ip["every_agent_has_all_s"]],
                ["ipcache: all deleted on every agent (s)", ip["every_agent_has_none_s"]],
                [
                    "etcd requests per pod create (new / held label set)",
                    f"{pods['create_new_label_set']} / {pods['create_label_set_held']}",
                ],
                [
                    "etcd requests per pod delete (label set still used / last)",
                    f"{pods['delete_label_set_still_used']} / {pods['delete_last_of_label_set']}",
                ],
                [
                    f"agent MiB: {m['identities']} identities + {m['ipcache_entries']} IPs",
                    f"{m['store_mib']} store + {m['compiled_policy_mib']} compiled policy",
                ],
                [
                    "list at start / one compile at that size (s)",
                    f"{m['list_s']} / {m['compile_s']}",
                ],
            ],
        )
    )
    print(f"results: {path}")
    ok = a["duplicates"] == a["split_label_sets"] == a["etcd_split_references"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
