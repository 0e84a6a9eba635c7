"""Command line: argument parsing only; the work is done elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from l7proxy.identity import parse_labels

DEFAULT_STATE = Path("/var/lib/l7proxy")


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def _labels(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l7proxy", description="Transparent L7 policy proxy fed by eBPF redirection")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="agent state (endpoints, identities, policies)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    fw = sub.add_parser("firewall", help="API-firewall mode: the proxy in front of one service, no datapath")
    fw.add_argument("--listen", type=_addr, required=True, metavar="ADDR:PORT")
    fw.add_argument("--upstream", type=_addr, required=True, metavar="ADDR:PORT")
    fw.add_argument("--labels", type=_labels, required=True, metavar="k=v,...", help="labels of the protected service")
    fw.add_argument("--policy", action="append", required=True, metavar="FILE|DIR")
    fw.add_argument("--flowlog", type=Path, help="append flow records (JSON lines) here")
    fw.add_argument("--audit", action="store_true", help="compute verdicts, log would-denies as AUDIT, allow all")
    fw.add_argument("--header-timeout", type=float, default=10.0)
    fw.add_argument("--idle-timeout", type=float, default=300.0)
    fw.add_argument("--metrics", type=_addr, metavar="ADDR:PORT", help="serve Prometheus /metrics and /healthz here")

    pol = sub.add_parser("policy", help="validate, import, list, delete and trace policies")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    v = psub.add_parser("validate", help="check policy files; exit 1 with file, YAML path and reason on error")
    v.add_argument("paths", nargs="+")
    t = psub.add_parser("trace", help="explain the verdict for a hypothetical request")
    t.add_argument("--policy", action="append", metavar="FILE|DIR", help="policies to use (default: the agent's)")
    t.add_argument("--from", dest="src", required=True, metavar="LABELS|ENDPOINT|CIDR")
    t.add_argument("--to", dest="dst", required=True, metavar="LABELS|ENDPOINT|CIDR")
    t.add_argument("--port", type=int, required=True)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--http", metavar="'METHOD /path [host]'")
    g.add_argument("--grpc", metavar="Service/Method")
    g.add_argument("--kafka", metavar="'ROLE|API topic [client-id]'")
    g.add_argument("--cql", metavar="'STATEMENT'")
    t.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    t.add_argument("--json", action="store_true")
    t.add_argument("--audit", action="store_true", help="simulate global audit mode")
    from l7proxy import agent_cli

    agent_cli.add_policy_commands(psub)

    ob = sub.add_parser("observe", help="read the flow log")
    ob.add_argument("--file", type=Path, help="flow-log file (default: the agent's)")
    ob.add_argument("--follow", "-f", action="store_true")
    ob.add_argument("--verdict", help="FORWARDED, DENIED, AUDIT or DROPPED")
    ob.add_argument("--protocol", help="http, grpc, kafka, cassandra, tcp")
    ob.add_argument("--json", action="store_true")
    ob.add_argument("--last", type=int, default=0, help="only the last N records")

    from l7proxy import agent_cli

    agent_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = COMMANDS.get(args.command)
    if handler is None:
        from l7proxy import agent_cli

        return agent_cli.dispatch(args)
    return handler(args)


def cmd_firewall(args) -> int:
    from l7proxy.firewall import Firewall, run_firewall
    from l7proxy.flowlog import FlowLog
    from l7proxy.policy.errors import PolicyError
    from l7proxy.proxy.driver import ProxyLimits

    try:
        fw = Firewall(
            listen=args.listen,
            upstream=args.upstream,
            labels=args.labels,
            policy_paths=args.policy,
            flowlog=FlowLog(args.flowlog),
            audit=args.audit,
            limits=ProxyLimits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout),
        )
    except PolicyError as err:
        print(f"policy rejected: {err}", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run_firewall(fw, ready=lambda line: print(line, flush=True), metrics=args.metrics))
    return 0


def loop_factory():
    """uvloop for the proxy's own loop, without making it the global policy:
    pyroute2 runs its own asyncio loop in the agent's kernel thread and needs
    the standard one (uvloop cannot open netlink datagram endpoints).
    ``L7PROXY_LOOP=asyncio`` forces the standard loop."""
    import os

    if os.environ.get("L7PROXY_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            logging.getLogger("l7proxy").info("event loop: uvloop")
            return uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            pass
    logging.getLogger("l7proxy").info("event loop: asyncio")
    return asyncio.new_event_loop


def cmd_policy(args) -> int:
    from l7proxy.policy.errors import PolicyError
    from l7proxy.policy.load import load_paths

    if args.policy_command == "validate":
        try:
            policies = load_paths(args.paths)
        except PolicyError as err:
            print(f"invalid: {err}", file=sys.stderr)
            return 1
        for pol in policies:
            print(f"ok: {pol.key} ({pol.source}): {len(pol.rules)} rules{' [audit]' if pol.audit else ''}")
        return 0
    if args.policy_command == "trace":
        from l7proxy.trace import run_trace

        return run_trace(args)
    from l7proxy import agent_cli

    return agent_cli.dispatch(args)


def cmd_observe(args) -> int:
    from l7proxy.flowlog import format_record, read_records

    path = args.file or (args.state_dir / "flows.jsonl")
    records = read_records(path, follow=args.follow)
    if args.last and not args.follow:
        records = list(records)[-args.last :]
    try:
        for rec in records:
            if args.verdict and rec.get("verdict", "").upper() != args.verdict.upper():
                continue
            if args.protocol and rec.get("protocol", "").lower() != args.protocol.lower():
                continue
            print(json.dumps(rec) if args.json else format_record(rec), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


COMMANDS = {"firewall": cmd_firewall, "policy": cmd_policy, "observe": cmd_observe}

if __name__ == "__main__":
    sys.exit(main())
