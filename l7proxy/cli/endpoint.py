"""``l7proxy endpoint add|list|delete``: endpoints are network namespaces with labels."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from l7proxy.cli.common import labels
from l7proxy.node.store import Store


def register(commands: Any) -> None:
    ep = commands.add_parser("endpoint", help="manage endpoints (network namespaces with labels)")
    sub = ep.add_subparsers(dest="endpoint_command", required=True)
    add = sub.add_parser("add")
    add.add_argument("name")
    add.add_argument("--labels", type=labels, required=True, metavar="k=v,...")
    add.add_argument("--ip", help="address (default: next free in the agent's subnet)")
    sub.add_parser("list").add_argument("--json", action="store_true")
    sub.add_parser("delete").add_argument("name")
    ep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    from l7proxy.node.endpoints import EndpointError, add_endpoint, delete_endpoint

    try:
        if args.endpoint_command == "add":
            rec = add_endpoint(store, args.name, args.labels, args.ip)
            print(
                f"endpoint {rec.name}: id {rec.id}, {rec.ip}, netns {rec.netns}, veth "
                f"{rec.host_ifname}"
            )
        elif args.endpoint_command == "delete":
            rec = delete_endpoint(store, args.name)
            print(f"endpoint {rec.name} deleted")
        else:
            state = store.read()
            alloc = state.allocator()
            rows: list[dict[str, Any]] = [
                {
                    "name": e.name,
                    "id": e.id,
                    "ip": e.ip,
                    "identity": alloc.for_labels(e.labels).number,
                    "labels": e.labels,
                    "netns": e.netns,
                    "kind": e.kind,
                }
                for e in state.endpoints
            ]
            if args.json:
                print(json.dumps(rows, indent=1))
            for r in [] if args.json else rows:
                print(
                    f"{r['name']:<12} id {r['id']:<3} identity {r['identity']:<5} {r['ip']:<15} "
                    f"{r['netns'] or '(' + r['kind'] + ')':<24} "
                    f"{','.join(f'{k}={v}' for k, v in r['labels'].items())}"
                )
    except EndpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
