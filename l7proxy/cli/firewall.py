"""``l7proxy firewall``: the proxy in front of one service, no datapath."""

from __future__ import annotations

import argparse
import asyncio
import sys
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
    add_proxy_options(fw)
    fw.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.policy.errors import PolicyError
    from l7proxy.proxy.firewall import Firewall, run_firewall

    try:
        fw = Firewall(
            listen=args.listen,
            upstream=args.upstream,
            labels=args.labels,
            policy_paths=args.policy,
            flowlog=FlowLog(args.flowlog, rotation=flowlog_rotation(args)),
            audit=args.audit,
            limits=proxy_limits(args),
        )
    except PolicyError as err:
        print(f"policy rejected: {err}", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(
            run_firewall(
                fw, ready=lambda line: print(line, flush=True), metrics=args.metrics, ui=args.ui
            )
        )
    return 0
