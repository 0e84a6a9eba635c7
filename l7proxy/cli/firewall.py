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
    workers,
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
    tls = fw.add_argument_group(
        "TLS", "terminate the clients' TLS, originate TLS to the service (docs/tls.md)"
    )
    tls.add_argument(
        "--tls-cert",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a certificate chain (PEM) to serve; repeat with --tls-key for more, "
        "chosen by the client's server name (the first one otherwise)",
    )
    tls.add_argument(
        "--tls-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="the private key of the --tls-cert in the same position",
    )
    tls.add_argument(
        "--tls-alpn",
        default="h2,http/1.1",
        metavar="LIST",
        help="ALPN protocols offered to clients, in order (default h2,http/1.1). The "
        "service must speak what a client chooses: HTTP/2 is relayed as HTTP/2, so "
        "give http/1.1 alone in front of a service without HTTP/2",
    )
    tls.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates signed by this CA; their subject and URI "
        "names (SPIFFE IDs) go into the flow log",
    )
    tls.add_argument(
        "--upstream-tls",
        action="store_true",
        help="connect to the service with TLS, verifying its certificate",
    )
    tls.add_argument(
        "--upstream-server-name",
        metavar="NAME",
        help="the name the service's certificate must have, sent as its SNI, when the "
        "client named none (default: the client's SNI, else the --upstream address)",
    )
    tls.add_argument(
        "--upstream-ca",
        type=Path,
        metavar="FILE",
        help="verify the service against this CA bundle (default: the system's)",
    )
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


def run(args: argparse.Namespace) -> int:
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.policy.errors import PolicyError
    from l7proxy.proxy.firewall import Firewall, run_firewall
    from l7proxy.proxy.tls import CommandLineTls, KeyPair, TlsStore

    if len(args.tls_cert) != len(args.tls_key):
        print("each --tls-cert needs its --tls-key, in the same order", file=sys.stderr)
        return 2
    if (args.client_ca is not None and not args.tls_cert) or (
        (args.upstream_ca is not None or args.upstream_server_name) and not args.upstream_tls
    ):
        print(
            "--client-ca needs --tls-cert; --upstream-ca and --upstream-server-name need "
            "--upstream-tls",
            file=sys.stderr,
        )
        return 2
    try:
        tls = TlsStore(
            args.tls_secrets_dir,
            CommandLineTls(
                tuple(KeyPair(c, k) for c, k in zip(args.tls_cert, args.tls_key, strict=True)),
                args.client_ca,
                args.upstream_tls,
                args.upstream_ca,
                tuple(p for p in args.tls_alpn.split(",") if p),
                args.upstream_server_name,
            ),
        )
    except PolicyError as err:
        print(f"TLS files rejected: {err}", file=sys.stderr)
        return 1
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
            tls=tls,
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

        def command(worker: int, fds: list[int]) -> list[str]:
            fallback = [a for p in snapshot.paths or () for a in ("--policy-fallback", str(p))]
            return [sys.executable, "-m", "l7proxy", *argv, "--worker-of", str(fds[0])] + [
                "--worker-id",
                str(worker),
                *fallback,
            ]

        supervisor = Supervisor(
            [[sock] for sock in socks], command, with_metrics=args.metrics is not None
        )
        with asyncio.Runner() as runner:
            return runner.run(
                supervisor.run(
                    ready=lambda line: print(line, flush=True),
                    metrics=args.metrics,
                    every_second=snapshot.refresh,
                )
            )
