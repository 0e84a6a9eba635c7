"""``l7proxy run``, ``status`` and ``cleanup``: the node agent's life cycle."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from l7proxy.agent.status import read_status
from l7proxy.cli.common import (
    add_proxy_options,
    flowlog_rotation,
    log,
    loop_factory,
    proxy_limits,
    workers,
)
from l7proxy.node.store import Store


def register(commands: Any) -> None:
    run_cmd = commands.add_parser("run", help="run the agent in the foreground (datapath + proxy)")
    run_cmd.add_argument(
        "--policy",
        action="append",
        default=[],
        type=Path,
        metavar="FILE|DIR",
        help="extra policy paths to watch",
    )
    add_proxy_options(run_cmd)
    run_cmd.add_argument(
        "--takeover",
        action="store_true",
        help="require a running agent to take over from (the default takes over if one runs)",
    )
    run_cmd.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on takeover, how long the old agent keeps serving its open connections",
    )
    run_cmd.add_argument(
        "--drop-report-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="report a flow's kernel drops at most this often, with their count (0: every packet)",
    )
    run_cmd.add_argument(
        "--workers",
        type=workers,
        default=1,
        metavar="N|auto",
        help="proxy worker processes, each with its own event loop on its own member of a "
        "SO_REUSEPORT group per parser family (auto: one per CPU; default 1: the proxy runs "
        "in the agent's process) (docs/workers.md)",
    )
    # Set by the agent for each worker it starts: its listening sockets
    # (FAMILY=FD,...) and its number (the flow log's ``worker`` field).
    run_cmd.add_argument("--worker-of", metavar="FAMILY=FD,...", help=argparse.SUPPRESS)
    run_cmd.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    kube = run_cmd.add_argument_group("Kubernetes (docs/cluster.md)")
    kube.add_argument(
        "--k8s",
        action="store_true",
        help="take endpoints (pods on this node) and CNP/CCNP policies from the Kubernetes API",
    )
    kube.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="with --k8s: the API server and credentials (default: in-cluster service account)",
    )
    kube.add_argument(
        "--tls-secrets-namespace",
        default="l7proxy-secrets",
        metavar="NS",
        help="with --k8s: the namespace whose Secrets terminatingTLS/originatingTLS may "
        "name, written to --tls-secrets-dir (default l7proxy-secrets)",
    )
    kube.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        metavar="NAME",
        help="this node's name in Kubernetes and in etcd (default: $NODE_NAME, else the hostname)",
    )
    etcd = run_cmd.add_argument_group("cluster mode: identities, ipcache in etcd (docs/cluster.md)")
    etcd.add_argument(
        "--etcd",
        metavar="ENDPOINTS",
        help="etcd endpoints, comma-separated (http://10.0.0.1:2379); overrides --etcd-config's",
    )
    etcd.add_argument(
        "--etcd-config",
        type=Path,
        metavar="FILE",
        help="Cilium's etcd config file (endpoints:, and our prefix:, cluster:), as the deploy "
        "ConfigMap mounts it",
    )
    etcd.add_argument("--cluster-name", metavar="NAME", help="this cluster's name in the keys")
    etcd.add_argument("--kvstore-prefix", metavar="PREFIX", help="key prefix (cilium/state)")
    etcd.add_argument(
        "--kvstore-lease-ttl",
        type=int,
        default=900,
        metavar="SECONDS",
        help="how long a dead node's keys outlive it (Cilium's default 900)",
    )
    etcd.add_argument(
        "--identity-gc-interval",
        type=float,
        metavar="SECONDS",
        help="sweep identities no node refers to (after --identity-gc-grace); "
        "one node of the cluster is enough",
    )
    etcd.add_argument("--identity-gc-grace", type=float, default=900.0, metavar="SECONDS")
    etcd.add_argument(
        "--devices",
        default="",
        metavar="IF[,IF]",
        help="the node's devices, where other nodes' traffic arrives (default: the links "
        "holding this node's addresses)",
    )
    run_cmd.set_defaults(func=run)

    status_cmd = commands.add_parser("status", help="health of the running agent")
    status_cmd.add_argument("--json", action="store_true")
    status_cmd.set_defaults(func=status)

    cleanup_cmd = commands.add_parser(
        "cleanup", help="delete every endpoint and imported policy of this state dir"
    )
    cleanup_cmd.set_defaults(func=cleanup)


def run_worker(args: argparse.Namespace) -> int:
    """One of ``run --workers N``'s proxy workers (started by the agent)."""
    from l7proxy.agent.worker import WorkerConfig, parse_listeners, serve
    from l7proxy.proxy.workers import SUPERVISOR_ENV, die_with_parent

    die_with_parent(int(os.environ.get(SUPERVISOR_ENV, "0")) or os.getppid())
    store = Store(args.state_dir)
    config = WorkerConfig(
        index=args.worker_id,
        listeners=parse_listeners(args.worker_of),
        flowlog=store.flowlog,
        rotation=flowlog_rotation(args),
        limits=proxy_limits(args),
        mark=store.read().proxy_mark,
        tls_secrets_dir=args.tls_secrets_dir or store.root / "secrets",
        metrics=args.metrics is not None,  # on 127.0.0.1:0; the agent serves the sum
    )
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(config))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.worker_of is not None:
        return run_worker(args)
    store = Store(args.state_dir)
    from l7proxy.agent.agent import Agent
    from l7proxy.agent.handover import Predecessor, socket_path
    from l7proxy.datapath.loader import kernel_support
    from l7proxy.proxy.heap import steady_heap

    if args.kubeconfig is not None and not args.k8s:
        print("--kubeconfig needs --k8s", file=sys.stderr)
        return 2
    kube = None
    if args.k8s:
        from l7proxy.kube.source import KubeConfig

        kube = KubeConfig(
            node=args.node_name,
            kubeconfig=args.kubeconfig,
            secrets_namespace=args.tls_secrets_namespace,
        )
    try:
        cluster = cluster_config(args)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.workers > 1 and args.ui:
        # The UI shows the live flows of its own process: with workers, none.
        print(
            "l7proxy run: --ui works with one worker only (not yet with --workers)", file=sys.stderr
        )
        return 2
    problem = kernel_support()
    if problem:
        print(f"cannot run the datapath here: {problem}", file=sys.stderr)
        return 2
    # A live agent answering on the control socket is taken over, not fought.
    predecessor = Predecessor.connect(socket_path(store.root)) if store.root.exists() else None
    if predecessor is None and args.takeover:
        print(
            "--takeover: no running agent answers on " + str(socket_path(store.root)),
            file=sys.stderr,
        )
        return 1
    if predecessor is not None:
        print(f"l7proxy taking over from agent pid {predecessor.pid}", flush=True)
    agent = Agent(
        store,
        audit=args.audit,
        extra_policies=args.policy,
        limits=proxy_limits(args),
        predecessor=predecessor,
        drain_timeout=args.drain_timeout,
        flowlog_rotation=flowlog_rotation(args),
        drop_report_interval=args.drop_report_interval,
        kube=kube,
        tls_secrets_dir=args.tls_secrets_dir,
        cluster=cluster,
        devices=[d for d in args.devices.split(",") if d],
        workers=args.workers,
        worker_command=worker_command(args),
        worker_metrics=args.metrics is not None,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.start()
        ui = None
        try:
            await agent.publish_status()
            if args.metrics:  # /metrics and /healthz (l7proxy/observe/metrics.py)
                from l7proxy.observe.metrics import start_agent_metrics

                if predecessor is not None:
                    await _port_free(args.metrics)  # the predecessor lets go of it within moments
                print(
                    f"l7proxy metrics on {(await start_agent_metrics(agent, args.metrics)).url}",
                    flush=True,
                )
            if args.ui:  # the web UI (l7proxy/ui/)
                from l7proxy.ui.server import start_ui

                if predecessor is not None:
                    await _port_free(args.ui)
                ui = await start_ui(agent.flowlog, lambda: agent.state, args.ui, mode="agent")
                print(f"l7proxy UI on {ui.url}", flush=True)
            from parsers.registry import active_parsers

            log.info("parsers: %s", ", ".join(f"{k}={v}" for k, v in active_parsers().items()))
            print(f"l7proxy agent running: listeners {agent.listeners}", flush=True)
            heap = loop.create_task(steady_heap())
            await agent.run(stop)
            heap.cancel()
        finally:
            if ui is not None:
                await ui.close()
            if agent.metrics is not None:
                await agent.metrics.close()
            if agent.handed_over:
                # A successor serves now: finish our connections, undo nothing.
                cut_short = asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, cut_short.set)
                print(
                    f"l7proxy handed over; draining for up to {agent.handover_drain:g}s", flush=True
                )
                result = await agent.drain_and_exit(cut_short)
                print(f"l7proxy drained: {result}", flush=True)
            else:
                # Explicit clean-up: under uvloop a signal-raised KeyboardInterrupt can be
                # swallowed.
                await agent.stop()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return 0


def worker_command(args: argparse.Namespace):
    """A worker is this same command, told its sockets and its number."""
    argv = list(args.argv)

    def command(worker: int, families: list[str], fds: list[int]) -> list[str]:
        spec = ",".join(f"{family}={fd}" for family, fd in zip(families, fds, strict=True))
        return [sys.executable, "-m", "l7proxy", *argv, "--worker-of", spec] + [
            "--worker-id",
            str(worker),
        ]

    return command


async def _port_free(address: tuple[str, int], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return
            except OSError:
                await asyncio.sleep(0.1)


def status(args: argparse.Namespace) -> int:
    state = read_status(Store(args.state_dir))
    if state is None:
        print("agent: not running", file=sys.stderr)
        if args.json:
            print(json.dumps({"running": False}))
        return 1
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    dp = state["datapath"]
    print(
        f"l7proxy {state['version']}  pid {state['pid']}  up {state['uptime_s']}s  "
        f"{'healthy' if state['healthy'] else 'UNHEALTHY'}"
    )
    print(
        f"health: datapath {'loaded' if state['datapath'].get('loaded') else 'NOT LOADED'}, "
        f"maps {'in sync with' if state.get('maps_in_sync') else 'NOT in sync with'} policy "
        f"revision {state['policy_revision']}, "
        f"listeners {'up' if state.get('listeners_up') else 'DOWN'}"
    )
    print(
        f"datapath: {'loaded' if dp.get('loaded') else 'not loaded'}, policy revision "
        f"{dp.get('policy_revision')}, attached to {len(dp.get('attached', {}))} endpoints"
    )
    for name, (used, cap) in sorted(dp.get("maps", {}).items()):
        print(f"  map {name:<17} {used:>6} / {cap}")
    totals = dp.get("counters", {}).get("total", {})
    print("  kernel counters: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    print("listeners: " + ", ".join(f"{fam} {addr}" for fam, addr in state["listeners"].items()))
    print("parsers: " + ", ".join(f"{k}={v}" for k, v in state["parsers"].items()))
    print(
        f"proxy: {state['proxy']['connections_active']} active, "
        f"{state['proxy']['connections_total']} total connections"
    )
    pool = state.get("workers")
    if pool:
        print(f"workers ({pool['count']}, {pool['restarts']} restarts):")
        for w in pool["each"]:
            print(
                f"  worker {w['worker']}  pid {w['pid'] or '-'}  "
                f"{'serving' if w['serving'] else 'NOT SERVING'}  policy revision "
                f"{w['policy_revision'] if w['policy_revision'] is not None else '-'}  "
                f"{w['connections_active']} active, {w['connections_total']} total connections"
                + (f"  (kept its last policy: {w['policy_error']})" if w["policy_error"] else "")
            )
    print(f"policies ({len(state['policies'])}):" + ("" if state["policies"] else " none"))
    for p in state["policies"]:
        print(f"  {p['name']}  {p['source']}{'  [audit]' if p['audit'] else ''}")
    if state.get("policy_error"):
        print(f"last policy import FAILED (last good policy in force): {state['policy_error']}")
    tls = state.get("tls")
    if tls and (tls["terminating"] or tls["originating"] or tls["last_error"]):
        print(
            f"TLS ({tls['secrets_dir']}): terminating {', '.join(tls['terminating']) or '-'}; "
            f"originating {', '.join(tls['originating']) or '-'}; {tls['reloads']} reloads"
        )
        if tls["last_error"]:
            print(f"  last reload FAILED (the files in force stay): {tls['last_error']}")
    kube = state.get("kubernetes")
    if kube:
        watches = kube["watches"]
        print(
            f"kubernetes: node {kube['node']}, {'synced' if kube['synced'] else 'NOT SYNCED'}, "
            f"{kube['pods']} pods here, {kube['namespaces']} namespaces, "
            f"{kube['policy_objects']} policy objects"
        )
        for kind, w in watches.items():
            print(
                f"  {kind:<31} resourceVersion {w['resource_version']}, {w['lists']} lists "
                f"({w['relists_gone']} after 410), {w['events']} events, {w['errors']} errors"
                + (f" (last: {w['last_error']})" if w["last_error"] else "")
            )
        for key, error in kube["policy_errors"].items():
            print(f"  REJECTED {key} (its last good version, if any, in force): {error}")
        for name in kube.get("pods_waiting", []):
            print(f"  pod {name}: waiting for a route to its IP")
    cluster = state.get("cluster")
    if cluster:
        watches = cluster["store"]["watches"]
        print(
            f"cluster: node {cluster['node']} of {cluster['cluster']}, etcd {cluster['etcd']} "
            f"(prefix {cluster['prefix']}), {'synced' if cluster['synced'] else 'NOT SYNCED'}, "
            f"{cluster['identities']} identities, {cluster['ipcache']} ipcache entries, "
            f"{len(cluster['nodes'])} nodes; ours: {cluster['own_identities']} identities, "
            f"{cluster['own_ips']} addresses"
        )
        for name, w in watches.items():
            print(
                f"  {name:<11} revision {w['revision']}, {w['lists']} lists, {w['errors']} errors"
                + (f" (last: {w['last_error']})" if w["last_error"] else "")
            )
        if cluster["error"]:
            print(f"  last sync failed: {cluster['error']}")
        for name in cluster["waiting"]:
            print(f"  endpoint {name}: waiting for its cluster-wide identity")
    print(f"endpoints ({len(state['endpoints'])}):")
    for e in state["endpoints"]:
        print(
            f"  {e['name']:<12} id {e['id']:<3} identity {e['identity']:<5} {e['ip']:<15} "
            f"{','.join(f'{k}={v}' for k, v in e['labels'].items())}"
        )
    return 0


def cleanup(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    from l7proxy.node.endpoints import delete_all

    if read_status(store) is not None:
        print("the agent is running; stop it first", file=sys.stderr)
        return 1
    if not store.exists():
        return 0
    from l7proxy.node import netns

    state = store.read()
    for name in delete_all(store):
        print(f"endpoint {name} deleted")
    # A killed agent cannot remove its policy route or its pinned maps; do it here.
    netns.remove_proxy_routing(state.redirect_mark, state.route_table)
    from l7proxy.datapath import pins

    pins.remove(pins.pin_dir(state.instance))
    shutil.rmtree(store.policy_dir, ignore_errors=True)
    return 0


def cluster_config(args: argparse.Namespace) -> Any:
    """``--etcd``/``--etcd-config`` and friends -> a ``ClusterConfig`` (None: single node)."""
    if args.etcd is None and args.etcd_config is None:
        for flag in ("cluster_name", "kvstore_prefix", "identity_gc_interval"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --etcd or --etcd-config")
        return None
    from dataclasses import replace

    from l7proxy.agent.cluster import EtcdSettings, parse_endpoints, read_etcd_config
    from l7proxy.cluster.store import ClusterConfig

    settings = read_etcd_config(args.etcd_config) if args.etcd_config else EtcdSettings(())
    if args.etcd is not None:
        settings = replace(settings, endpoints=parse_endpoints(args.etcd))
    if not settings.endpoints:
        raise ValueError("--etcd: no endpoint given")
    if len(settings.endpoints) > 1:
        log.warning(
            "etcd: %d endpoints given; this agent uses the first, %s:%d",
            len(settings.endpoints),
            *settings.endpoints[0],
        )
    if args.kvstore_lease_ttl < 2:
        raise ValueError("--kvstore-lease-ttl must be at least 2 seconds")
    from l7proxy.cluster.keys import Layout

    Layout(args.kvstore_prefix or settings.prefix, args.cluster_name or settings.cluster)
    return ClusterConfig(
        node=args.node_name,
        etcd=settings.endpoints[0],
        prefix=args.kvstore_prefix or settings.prefix,
        cluster=args.cluster_name or settings.cluster,
        lease_ttl=args.kvstore_lease_ttl,
        sync_every=min(60.0, max(1.0, args.kvstore_lease_ttl / 3)),
        gc_every=args.identity_gc_interval,
        gc_grace=args.identity_gc_grace,
    )
