"""``l7proxy firewall``: the proxy in front of one service, no datapath."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from l7proxy.cli.common import (
    add_proxy_options,
    address,
    flowlog_rotation,
    labels,
    loop_factory,
    proxy_limits,
)


def register(commands: Any) -> None:
    fw = commands.add_parser(
        "firewall", help="API-firewall mode: the proxy in front of one service, no datapath"
    )
    fw.add_argument("--listen", type=address, required=True, metavar="ADDR:PORT")
    fw.add_argument("--upstream", type=address, required=True, metavar="ADDR:PORT")
    fw.add_argument(
        "--labels",
        type=labels,
        required=True,
        metavar="k=v,...",
        help="labels of the protected service",
    )
    fw.add_argument("--policy", action="append", required=True, metavar="FILE|DIR")
    fw.add_argument("--flowlog", type=Path, help="append flow records (JSON lines) here")
    fw.add_argument(
        "--workers",
        type=workers,
        default=1,
        metavar="N|auto",
        help="worker processes, each with its own event loop on its own SO_REUSEPORT "
        "socket of the one address (auto: one per CPU; default 1, one process)",
    )
    # Set by the supervisor for each worker it starts: the listening socket it
    # inherits, and its number (the flow log's ``worker`` field).
    fw.add_argument("--worker-of", type=int, metavar="FD", help=argparse.SUPPRESS)
    fw.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    # The supervisor's copy of the last good policy files, for a worker restarted
    # while the files on disk are bad.
    fw.add_argument("--policy-fallback", type=Path, action="append", help=argparse.SUPPRESS)
    add_proxy_options(fw)
    fw.set_defaults(func=run)


def workers(text: str) -> int:
    from l7proxy.proxy.workers import worker_count

    try:
        return worker_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.policy.errors import PolicyError
    from l7proxy.proxy.firewall import Firewall, run_firewall

    worker = args.worker_of is not None
    supervisor = not worker and args.workers > 1
    if supervisor and args.ui is not None:
        # The UI shows the live flows of its own process: with workers, a fraction.
        print(
            "l7proxy firewall: --ui works with one worker only (not yet with --workers)",
            file=sys.stderr,
        )
        return 2
    try:
        fw = Firewall(
            listen=args.listen,
            upstream=args.upstream,
            labels=args.labels,
            policy_paths=args.policy,
            # The supervisor loads the policy only to refuse a bad one before any
            # worker starts; the workers write the flow log.
            flowlog=FlowLog(
                None if supervisor else args.flowlog,
                rotation=flowlog_rotation(args),
                fields={"worker": args.worker_id} if worker else None,
            ),
            audit=args.audit,
            limits=proxy_limits(args),
            policy_fallback=args.policy_fallback if worker else None,
        )
    except PolicyError as err:
        print(f"policy rejected: {err}", file=sys.stderr)
        return 1
    if supervisor:
        return supervise(args)
    sock = None
    metrics = args.metrics
    if worker:
        from l7proxy.proxy.workers import SUPERVISOR_ENV, die_with_parent

        die_with_parent(int(os.environ.get(SUPERVISOR_ENV, "0")) or os.getppid())
        sock = socket.socket(fileno=args.worker_of)
        if metrics is not None:  # the supervisor serves the sum at --metrics
            metrics = ("127.0.0.1", 0)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(
            run_firewall(
                fw,
                ready=lambda line: print(line, flush=True),
                metrics=metrics,
                ui=args.ui,
                sock=sock,
            )
        )
    return 0


def supervise(args: argparse.Namespace) -> int:
    """``--workers N``: the sockets, then N workers started as this same command."""
    from l7proxy.policy.source import PolicySnapshot
    from l7proxy.proxy.workers import Supervisor, reuseport_listeners

    try:
        host, port = args.listen
        socks = reuseport_listeners(host, port, args.workers, backlog=proxy_limits(args).backlog)
    except OSError as err:
        print(f"l7proxy firewall: {err}", file=sys.stderr)
        return 1
    argv = list(args.argv)
    with tempfile.TemporaryDirectory(prefix="l7proxy-policy-") as snapshots:
        snapshot = PolicySnapshot(args.policy, Path(snapshots))
        snapshot.refresh()

        def command(worker: int, fd: int) -> list[str]:
            fallback = [a for p in snapshot.paths or () for a in ("--policy-fallback", str(p))]
            return [sys.executable, "-m", "l7proxy", *argv, "--worker-of", str(fd)] + [
                "--worker-id",
                str(worker),
                *fallback,
            ]

        supervisor = Supervisor(socks, command, with_metrics=args.metrics is not None)
        with asyncio.Runner() as runner:
            return runner.run(
                supervisor.run(
                    ready=lambda line: print(line, flush=True),
                    metrics=args.metrics,
                    every_second=snapshot.refresh,
                )
            )
