"""Agent subcommands: run, status, endpoint add|list|delete, policy import|list|delete, cleanup."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from l7proxy.store import Store

log = logging.getLogger("l7proxy")


def add_commands(sub) -> None:
    from l7proxy.cli import _addr, _labels

    run = sub.add_parser("run", help="run the agent in the foreground (datapath + proxy)")
    run.add_argument("--policy", action="append", default=[], type=Path, metavar="FILE|DIR", help="extra policy paths to watch")
    run.add_argument("--audit", action="store_true", help="compute verdicts, log would-denies as AUDIT, allow all")
    run.add_argument("--header-timeout", type=float, default=10.0)
    run.add_argument("--idle-timeout", type=float, default=300.0)
    run.add_argument("--metrics", type=_addr, metavar="ADDR:PORT", help="serve Prometheus /metrics and /healthz here")
    run.add_argument("--takeover", action="store_true", help="require a running agent to take over from (the default takes over if one runs)")
    run.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on takeover, how long the old agent keeps serving its open connections (default 30)")

    st = sub.add_parser("status", help="health of the running agent")
    st.add_argument("--json", action="store_true")

    ep = sub.add_parser("endpoint", help="manage endpoints (network namespaces with labels)")
    esub = ep.add_subparsers(dest="endpoint_command", required=True)
    add = esub.add_parser("add")
    add.add_argument("name")
    add.add_argument("--labels", type=_labels, required=True, metavar="k=v,...")
    add.add_argument("--ip", help="address (default: next free in the agent's subnet)")
    esub.add_parser("list").add_argument("--json", action="store_true")
    esub.add_parser("delete").add_argument("name")

    sub.add_parser("cleanup", help="delete every endpoint and imported policy of this state dir")


def add_policy_commands(psub) -> None:
    imp = psub.add_parser("import", help="validate and install policy files into the agent")
    imp.add_argument("paths", nargs="+")
    imp.add_argument("--replace", action="store_true", help="remove every imported policy first")
    psub.add_parser("list", help="imported policies").add_argument("--json", action="store_true")
    psub.add_parser("delete", help="remove an imported policy by name").add_argument("name")


def dispatch(args) -> int:
    store = Store(args.state_dir)
    if args.command == "run":
        return cmd_run(args, store)
    if args.command == "status":
        return cmd_status(args, store)
    if args.command == "endpoint":
        return cmd_endpoint(args, store)
    if args.command == "cleanup":
        return cmd_cleanup(args, store)
    if args.command == "policy":
        return cmd_policy(args, store)
    raise SystemExit(f"unknown command {args.command!r}")


# --------------------------------------------------------------------------- run


def cmd_run(args, store: Store) -> int:
    from l7proxy.agent import Agent
    from l7proxy.cli import loop_factory
    from l7proxy.datapath import kernel_support
    from l7proxy.handover import Predecessor, socket_path
    from l7proxy.proxy.driver import ProxyLimits

    problem = kernel_support()
    if problem:
        print(f"cannot run the datapath here: {problem}", file=sys.stderr)
        return 2
    # A live agent answering on the control socket is taken over, not fought.
    predecessor = Predecessor.connect(socket_path(store.root)) if store.root.exists() else None
    if predecessor is None and args.takeover:
        print("--takeover: no running agent answers on " + str(socket_path(store.root)), file=sys.stderr)
        return 1
    if predecessor is not None:
        print(f"l7proxy taking over from agent pid {predecessor.pid}", flush=True)
    agent = Agent(store, audit=args.audit, extra_policies=args.policy, limits=ProxyLimits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout),
                  predecessor=predecessor, drain_timeout=args.drain_timeout)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.start()
        try:
            agent.write_status(await agent._kernel(agent.datapath.status))
            if args.metrics:  # /metrics and /healthz (l7proxy/metrics.py)
                from l7proxy.metrics import start_agent_metrics

                if predecessor is not None:
                    await _port_free(args.metrics)  # the predecessor lets go of it within moments
                print(f"l7proxy metrics on {(await start_agent_metrics(agent, args.metrics)).url}", flush=True)
            from l7proxy.protocols import active_parsers

            log.info("parsers: %s", ", ".join(f"{k}={v}" for k, v in active_parsers().items()))
            print(f"l7proxy agent running: listeners {agent.listeners}", flush=True)
            await agent.run(stop)
        finally:
            if agent.metrics is not None:
                await agent.metrics.close()
            if agent.handed_over:
                # A successor serves now: finish our connections, undo nothing.
                cut_short = asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, cut_short.set)
                print(f"l7proxy handed over; draining for up to {agent.handover_drain:g}s", flush=True)
                result = await agent.drain_and_exit(cut_short)
                print(f"l7proxy drained: {result}", flush=True)
            else:
                # Explicit clean-up: under uvloop a signal-raised KeyboardInterrupt can be swallowed.
                await agent.stop()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return 0


async def _port_free(address: tuple[str, int], timeout: float = 5.0) -> None:
    import socket

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


# --------------------------------------------------------------------------- status


def cmd_status(args, store: Store) -> int:
    status = read_status(store)
    if status is None:
        print("agent: not running", file=sys.stderr)
        if args.json:
            print(json.dumps({"running": False}))
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    dp = status["datapath"]
    print(f"l7proxy {status['version']}  pid {status['pid']}  up {status['uptime_s']}s  {'healthy' if status['healthy'] else 'UNHEALTHY'}")
    print(f"health: datapath {'loaded' if status['datapath'].get('loaded') else 'NOT LOADED'}, "
          f"maps {'in sync with' if status.get('maps_in_sync') else 'NOT in sync with'} policy revision {status['policy_revision']}, "
          f"listeners {'up' if status.get('listeners_up') else 'DOWN'}")
    print(f"datapath: {'loaded' if dp.get('loaded') else 'not loaded'}, policy revision {dp.get('policy_revision')}, attached to {len(dp.get('attached', {}))} endpoints")
    for name, (used, cap) in sorted(dp.get("maps", {}).items()):
        print(f"  map {name:<17} {used:>6} / {cap}")
    totals = dp.get("counters", {}).get("total", {})
    print("  kernel counters: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    print("listeners: " + ", ".join(f"{fam} {addr}" for fam, addr in status["listeners"].items()))
    print("parsers: " + ", ".join(f"{k}={v}" for k, v in status["parsers"].items()))
    print(f"proxy: {status['proxy']['connections_active']} active, {status['proxy']['connections_total']} total connections")
    print(f"policies ({len(status['policies'])}):" + ("" if status["policies"] else " none"))
    for p in status["policies"]:
        print(f"  {p['name']}  {p['source']}{'  [audit]' if p['audit'] else ''}")
    if status.get("policy_error"):
        print(f"last policy import FAILED (last good policy in force): {status['policy_error']}")
    print(f"endpoints ({len(status['endpoints'])}):")
    for e in status["endpoints"]:
        print(f"  {e['name']:<12} id {e['id']:<3} identity {e['identity']:<5} {e['ip']:<15} {','.join(f'{k}={v}' for k, v in e['labels'].items())}")
    return 0


def read_status(store: Store, max_age: float = 5.0) -> dict | None:
    try:
        pid = int(store.pid_file.read_text())
        os.kill(pid, 0)
        if time.time() - store.status_file.stat().st_mtime > max_age:
            return None
        return json.loads(store.status_file.read_text())
    except (FileNotFoundError, ValueError, ProcessLookupError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- endpoints


def cmd_endpoint(args, store: Store) -> int:
    from l7proxy.endpoints import EndpointError, add_endpoint, delete_endpoint

    try:
        if args.endpoint_command == "add":
            rec = add_endpoint(store, args.name, args.labels, args.ip)
            print(f"endpoint {rec.name}: id {rec.id}, {rec.ip}, netns {rec.netns}, veth {rec.host_ifname}")
        elif args.endpoint_command == "delete":
            rec = delete_endpoint(store, args.name)
            print(f"endpoint {rec.name} deleted")
        else:
            state = store.read()
            alloc = state.allocator()
            rows = [{"name": e.name, "id": e.id, "ip": e.ip, "identity": alloc.for_labels(e.labels).number, "labels": e.labels, "netns": e.netns} for e in state.endpoints]
            if args.json:
                print(json.dumps(rows, indent=1))
            for r in [] if args.json else rows:
                print(f"{r['name']:<12} id {r['id']:<3} identity {r['identity']:<5} {r['ip']:<15} {r['netns']:<24} {','.join(f'{k}={v}' for k, v in r['labels'].items())}")
    except EndpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_cleanup(args, store: Store) -> int:
    from l7proxy.endpoints import delete_all

    if read_status(store) is not None:
        print("the agent is running; stop it first", file=sys.stderr)
        return 1
    if not store.exists():
        return 0
    from l7proxy import netns

    state = store.read()
    for name in delete_all(store):
        print(f"endpoint {name} deleted")
    # A killed agent cannot remove its policy route or its pinned maps; do it here.
    netns.remove_proxy_routing(state.redirect_mark, state.route_table)
    from l7proxy import pins

    pins.remove(pins.pin_dir(state.instance))
    shutil.rmtree(store.policy_dir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- policies


def cmd_policy(args, store: Store) -> int:
    from l7proxy.policy.errors import PolicyError
    from l7proxy.policy.load import load_paths, load_text

    store.policy_dir.mkdir(parents=True, exist_ok=True)
    if args.policy_command == "import":
        try:
            incoming = [(Path(p), load_paths([p])) for p in args.paths]
        except PolicyError as err:
            print(f"policy rejected, nothing changed: {err}", file=sys.stderr)
            return 1
        # The resulting set must load as a whole (e.g. no duplicate names).
        current = {} if args.replace else _imported(store)
        for _path, policies in incoming:
            for pol in policies:
                for old_file, names in list(current.items()):
                    if pol.key in names:
                        current.pop(old_file)
        files = [f for f in current] + [p for p, _ in incoming]
        try:
            load_paths(files)
        except PolicyError as err:
            print(f"policy rejected, nothing changed: {err}", file=sys.stderr)
            return 1
        for old in [f for f in store.policy_dir.glob("*.yaml") if f not in current]:
            old.unlink()
        for path, _policies in incoming:
            sources = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for src in sources:
                target = store.policy_dir / (src.stem + ".yaml")
                tmp = target.with_suffix(".tmp")
                tmp.write_text(src.read_text())
                os.replace(tmp, target)  # atomic: the agent never sees half a file
                for pol in load_text(src.read_text(), source=str(src)):
                    print(f"imported {pol.key} from {src}")
        return 0
    if args.policy_command == "list":
        rows = [{"name": n, "file": str(f)} for f, names in _imported(store).items() for n in names]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(f"{r['name']:<24} {r['file']}")
        return 0
    if args.policy_command == "delete":
        for file, names in _imported(store).items():
            if args.name in names:
                file.unlink()
                print(f"deleted {args.name}")
                return 0
        print(f"no imported policy named {args.name!r}", file=sys.stderr)
        return 1
    raise SystemExit(f"unknown policy command {args.policy_command!r}")


def _imported(store: Store) -> dict[Path, list[str]]:
    from l7proxy.policy.load import load_text

    out = {}
    for f in sorted(store.policy_dir.glob("*.yaml")):
        try:
            out[f] = [p.key for p in load_text(f.read_text(), source=str(f))]
        except Exception:  # noqa: BLE001 - a broken file is still listed so it can be deleted
            out[f] = [f.stem]
    return out


