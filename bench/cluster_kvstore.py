"""The cluster control plane against a real etcd: allocation under contention,
propagation to every watcher, ipcache convergence, etcd requests per operation.

    python -m bench.cluster_kvstore [--agents 10] [--label-sets 1000] [--ips 10000]
                                    [--probes 50] [--rate 0]

Control plane only: no BPF, no namespaces. Every agent is a ``ClusterStore``
(its own etcd connection, lease, allocator and three watches) in this one
process, against one etcd with its data on tmpfs.

- allocation: every agent allocates every label set at the same moment (each
  from a different starting point), so every label set is raced by all agents.
  Checked from etcd afterwards: 0 duplicates (two label sets with one number),
  0 split label sets (one label set whose references carry two numbers).
- propagation: one agent allocates a new label set; the time until the *last*
  of the agents' watches has it, per probe.
- ipcache: each agent writes its share of the IPs at once; the time until every
  agent's copy holds all of them, then the same for their deletion.
- requests: etcd requests per allocation, per pod IP written and deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from bench.common import markdown_table, percentile, tool_version, write_results
from l7proxy.cluster.keys import Layout
from l7proxy.cluster.kv import Etcd
from l7proxy.cluster.store import ClusterConfig, ClusterStore, IdentityChange
from tests.support.etcd import ETCD, available, running_etcd


def _total(stores: list[ClusterStore]) -> Counter[str]:
    total: Counter[str] = Counter()
    for s in stores:
        total.update(s.kv.requests)
    return total


async def allocation(stores: list[ClusterStore], label_sets: int, layout: Layout) -> dict[str, Any]:
    sets = [
        {"k8s:app": f"svc-{i}", "k8s:io.kubernetes.pod.namespace": "bench"}
        for i in range(label_sets)
    ]
    step = max(1, label_sets // len(stores))
    before = _total(stores)
    started = time.monotonic()

    async def one_agent(i: int, store: ClusterStore) -> dict[int, int]:
        order = list(range(label_sets))
        order = order[i * step :] + order[: i * step]
        numbers = await asyncio.gather(*(store.allocate(sets[j]) for j in order))
        return dict(zip(order, numbers, strict=True))

    results = await asyncio.gather(*(one_agent(i, s) for i, s in enumerate(stores)))
    wall = time.monotonic() - started
    used = _total(stores) - before

    # what the agents were told
    numbers_per_set = [{r[j] for r in results} for j in range(label_sets)]
    split_told = sum(len(n) > 1 for n in numbers_per_set)
    sets_per_number: dict[int, set[int]] = defaultdict(set)
    for r in results:
        for j, n in r.items():
            sets_per_number[n].add(j)
    duplicates_told = sum(len(s) > 1 for s in sets_per_number.values())

    # what etcd holds
    kv = Etcd(*stores[0].config.etcd, rate=0)
    await kv.connect()
    try:
        ids, _ = await kv.list_prefix(layout.ids)
        refs, _ = await kv.list_prefix(layout.values)
    finally:
        await kv.close()
    ref_numbers: dict[str, set[bytes]] = defaultdict(set)
    for ref in refs:
        split = layout.split_ref(ref.key)
        assert split is not None
        ref_numbers[split[0]].add(ref.value)
    id_values = Counter(kv.value for kv in ids)
    allocations = len(stores) * label_sets
    stats = [s.allocator.stats for s in stores]
    return {
        "agents": len(stores),
        "label_sets": label_sets,
        "allocations": allocations,
        "wall_s": round(wall, 2),
        "allocations_per_s": round(allocations / wall, 1),
        "duplicates": duplicates_told,
        "split_label_sets": split_told,
        "etcd_id_keys": len(ids),
        "etcd_label_sets_with_two_id_keys": sum(n > 1 for n in id_values.values()),
        "etcd_split_references": sum(len(v) > 1 for v in ref_numbers.values()),
        "etcd_references": len(refs),
        "transactions": sum(s.transactions for s in stats),
        "conflicts": sum(s.conflicts for s in stats),
        "id_keys_created": sum(s.created for s in stats),
        "etcd_requests_per_allocation": round(sum(used.values()) / allocations, 3),
        "etcd_requests": dict(used),
    }


async def propagation(stores: list[ClusterStore], probes: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    arrivals: dict[int, list[float]] = defaultdict(list)
    for s in stores:
        s.subscribe(
            lambda ch: (
                arrivals[ch.number].append(loop.time())
                if isinstance(ch, IdentityChange) and ch.labels is not None
                else None
            )
        )
    last_watcher: list[float] = []
    for i in range(probes):
        started = loop.time()
        number = await stores[i % len(stores)].allocate({"k8s:probe": str(i)})
        deadline = started + 10
        while len(arrivals[number]) < len(stores) and loop.time() < deadline:
            await asyncio.sleep(0.001)
        if len(arrivals[number]) < len(stores):
            raise RuntimeError(f"identity {number} did not reach every watcher in 10 s")
        last_watcher.append((max(arrivals[number]) - started) * 1000)
    return {
        "probes": probes,
        "watchers": len(stores),
        "allocate_to_last_watcher_ms": {
            "p50": round(percentile(last_watcher, 50), 2),
            "p99": round(percentile(last_watcher, 99), 2),
            "max": round(max(last_watcher), 2),
        },
    }


async def ipcache(stores: list[ClusterStore], ips: int) -> dict[str, Any]:
    per_agent = ips // len(stores)
    total = per_agent * len(stores)
    addresses = [
        [f"10.{64 + i}.{j // 250}.{j % 250 + 1}" for j in range(per_agent)]
        for i in range(len(stores))
    ]

    async def converge(check: Any) -> float:
        started = time.monotonic()
        while not all(check(s) for s in stores):
            if time.monotonic() - started > 300:
                raise RuntimeError("ipcache did not converge in 300 s")
            await asyncio.sleep(0.005)
        return time.monotonic() - started

    before = _total(stores)
    started = time.monotonic()
    await asyncio.gather(
        *(
            asyncio.gather(*(s.upsert_ip(ip, 300 + i) for ip in addresses[i]))
            for i, s in enumerate(stores)
        )
    )
    writes_done = time.monotonic() - started
    converged = writes_done + await converge(lambda s: len(s.ipcache) >= total)
    put_requests = _total(stores) - before

    before = _total(stores)
    started = time.monotonic()
    await asyncio.gather(
        *(asyncio.gather(*(s.delete_ip(ip) for ip in addresses[i])) for i, s in enumerate(stores))
    )
    deletes_done = time.monotonic() - started
    gone = deletes_done + await converge(lambda s: len(s.ipcache) == 0)
    delete_requests = _total(stores) - before
    return {
        "ips": total,
        "writers": len(stores),
        "writes_s": round(writes_done, 2),
        "every_agent_has_all_s": round(converged, 2),
        "deletes_s": round(deletes_done, 2),
        "every_agent_has_none_s": round(gone, 2),
        "etcd_requests_per_ip_write": round(sum(put_requests.values()) / total, 3),
        "etcd_requests_per_ip_delete": round(sum(delete_requests.values()) / total, 3),
    }


async def run(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    prefix = f"bench-{int(time.time())}/state"
    configs = [
        ClusterConfig(
            node=f"node-{i}",
            etcd=(host, port),
            prefix=prefix,
            node_ips=(f"192.0.2.{i + 1}",),
            rate=args.rate,
            burst=max(args.rate, 1),
            lease_ttl=60,
        )
        for i in range(args.agents)
    ]
    stores = [ClusterStore(c) for c in configs]
    await asyncio.gather(*(s.start() for s in stores))
    try:
        return {
            "allocation": await allocation(stores, args.label_sets, Layout(prefix)),
            "propagation": await propagation(stores, args.probes),
            "ipcache": await ipcache(stores, args.ips),
        }
    finally:
        await asyncio.gather(*(s.stop() for s in stores), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--label-sets", type=int, default=1000)
    parser.add_argument("--ips", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="etcd requests/s per agent (0: none)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    why = available()
    if why:
        print(f"bench.cluster_kvstore: {why}", file=sys.stderr)
        return 2
    with running_etcd() as etcd:
        results = asyncio.run(run(args, etcd.host, etcd.port))
    a, p, ip = results["allocation"], results["propagation"], results["ipcache"]
    lag = p["allocate_to_last_watcher_ms"]
    path = write_results(
        "cluster_kvstore",
        {
            "settings": {**vars(args), "etcd": tool_version([ETCD, "--version"])},
            "headline": {
                "duplicates": a["duplicates"],
                "split_label_sets": a["split_label_sets"],
                "etcd_requests_per_allocation": a["etcd_requests_per_allocation"],
                "identity_to_last_watcher_p50_ms": p["allocate_to_last_watcher_ms"]["p50"],
                "ipcache_converged_s": ip["every_agent_has_all_s"],
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
                ["transactions / conflicts", f"{a['transactions']} / {a['conflicts']}"],
                ["etcd requests per allocation", a["etcd_requests_per_allocation"]],
                [
                    "identity to last watcher p50 / p99 (ms)",
                    f"{lag['p50']} / {lag['p99']}",
                ],
                [f"ipcache: {ip['ips']} IPs everywhere (s)", ip["every_agent_has_all_s"]],
                ["ipcache: all deleted everywhere (s)", ip["every_agent_has_none_s"]],
                [
                    "etcd requests per IP write / delete",
                    f"{ip['etcd_requests_per_ip_write']} / {ip['etcd_requests_per_ip_delete']}",
                ],
            ],
        )
    )
    print(f"results: {path}")
    ok = a["duplicates"] == a["split_label_sets"] == a["etcd_split_references"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
