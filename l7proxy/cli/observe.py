"""``l7proxy observe``: read and follow the flow log."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    ob = commands.add_parser("observe", help="read the flow log")
    ob.add_argument("--file", type=Path, help="flow-log file (default: the agent's)")
    ob.add_argument("--follow", "-f", action="store_true")
    ob.add_argument("--verdict", help="FORWARDED, DENIED, AUDIT or DROPPED")
    ob.add_argument("--protocol", help="http, grpc, kafka, cassandra, tls, tcp")
    ob.add_argument("--json", action="store_true")
    ob.add_argument("--last", type=int, default=0, help="only the last N records")
    ob.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l7proxy.node.store import Store
    from l7proxy.observe.flowlog import format_record, read_records

    path = args.file or Store(args.state_dir).flowlog
    records: Iterable[dict[str, Any]] = read_records(path, follow=args.follow)
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
