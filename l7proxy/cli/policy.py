"""``l7proxy policy validate|import|list|delete|trace|suggest``."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from l7proxy.node.store import Store
from l7proxy.policy.errors import PolicyError
from l7proxy.policy.load import load_paths, load_text


def register(commands: Any) -> None:
    pol = commands.add_parser("policy", help="validate, import, list, delete and trace policies")
    sub = pol.add_subparsers(dest="policy_command", required=True)

    validate_cmd = sub.add_parser(
        "validate", help="check policy files; exit 1 with file, YAML path and reason on error"
    )
    validate_cmd.add_argument("paths", nargs="+")
    validate_cmd.add_argument(
        "--tls-secrets-dir",
        type=Path,
        metavar="DIR",
        help="also read the certificates and keys that terminatingTLS/originatingTLS name, "
        "as the proxy will (DIR/NAMESPACE/NAME/ITEM)",
    )
    validate_cmd.set_defaults(func=validate)

    import_cmd = sub.add_parser("import", help="validate and install policy files into the agent")
    import_cmd.add_argument("paths", nargs="+")
    import_cmd.add_argument(
        "--replace", action="store_true", help="remove every imported policy first"
    )
    import_cmd.set_defaults(func=import_)

    list_cmd = sub.add_parser("list", help="imported policies")
    list_cmd.add_argument("--json", action="store_true")
    list_cmd.set_defaults(func=list_)

    delete_cmd = sub.add_parser("delete", help="remove an imported policy by name")
    delete_cmd.add_argument("name")
    delete_cmd.set_defaults(func=delete)

    t = sub.add_parser("trace", help="explain the verdict for a hypothetical request")
    t.add_argument(
        "--policy",
        action="append",
        metavar="FILE|DIR",
        help="policies to use (default: the agent's)",
    )
    t.add_argument("--from", dest="src", required=True, metavar="LABELS|ENDPOINT|CIDR")
    t.add_argument("--to", dest="dst", required=True, metavar="LABELS|ENDPOINT|CIDR")
    t.add_argument("--port", type=int, required=True)
    kind = t.add_mutually_exclusive_group()
    kind.add_argument("--http", metavar="'METHOD /path [host]'")
    kind.add_argument("--grpc", metavar="Service/Method")
    kind.add_argument("--kafka", metavar="'ROLE|API topic [client-id]'")
    kind.add_argument("--cql", metavar="'STATEMENT'")
    kind.add_argument(
        "--tls",
        metavar="'SERVER-NAME [ALPN,...] [ech]'",
        help="a ClientHello ('-' for no server name), judged by toPorts[].serverNames",
    )
    t.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    t.add_argument("--json", action="store_true")
    t.add_argument("--audit", action="store_true", help="simulate global audit mode")
    t.set_defaults(func=trace)
    _register_suggest(sub)


def validate(args: argparse.Namespace) -> int:
    try:
        policies = load_paths(args.paths)
        if args.tls_secrets_dir is not None:
            from l7proxy.proxy.tls import TlsStore

            TlsStore(args.tls_secrets_dir).update(policies)
    except PolicyError as err:
        print(f"invalid: {err}", file=sys.stderr)
        return 1
    for pol in policies:
        audit = " [audit]" if pol.audit else ""
        print(f"ok: {pol.key} ({pol.source}): {len(pol.rules)} rules{audit}")
    return 0


def import_(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    store.policy_dir.mkdir(parents=True, exist_ok=True)
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


def list_(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    rows = [{"name": n, "file": str(f)} for f, names in _imported(store).items() for n in names]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['file']}")
    return 0


def delete(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    for file, names in _imported(store).items():
        if args.name in names:
            file.unlink()
            print(f"deleted {args.name}")
            return 0
    print(f"no imported policy named {args.name!r}", file=sys.stderr)
    return 1


def _imported(store: Store) -> dict[Path, list[str]]:
    out = {}
    for f in sorted(store.policy_dir.glob("*.yaml")):
        try:
            out[f] = [p.key for p in load_text(f.read_text(), source=str(f))]
        except Exception:  # noqa: BLE001 - a broken file is still listed so it can be deleted
            out[f] = [f.stem]
    return out


# --------------------------------------------------------------------------- trace


def trace(args: argparse.Namespace) -> int:
    from l7proxy.policy import trace as tracing

    try:
        scenario = _scenario(args)
        requests = tracing.build_requests(
            tracing.RequestSpec(
                args.http, args.grpc, args.kafka, args.cql, tuple(args.header), args.tls
            )
        )
        result = tracing.trace(scenario, requests)
    except tracing.UsageError as err:
        print(f"policy trace: {err}", file=sys.stderr)
        return 2
    except PolicyError as err:
        print(f"policy trace: policy rejected: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(tracing.format_text(result, scenario.compiled))
    return 0 if result["verdict"]["allowed"] else 1


def _scenario(args: argparse.Namespace) -> Any:
    """Gather what the trace needs: the policies (given, or the agent's), the
    agent's endpoints when a peer names one, and global audit mode."""
    from l7proxy.agent.status import read_status
    from l7proxy.policy import trace as tracing
    from l7proxy.policy.engine import Endpoint
    from l7proxy.policy.identity import IdentityAllocator

    src_spec, dst_spec = tracing.parse_peer(args.src), tracing.parse_peer(args.dst)
    store = Store(args.state_dir)
    notes: list[str] = []
    audit_all = bool(args.audit)
    if audit_all:
        notes.append("global audit mode (--audit)")
    if args.policy:
        policies = load_paths(args.policy)
        notes.append(f"policies: {', '.join(args.policy)}")
    else:
        if not store.exists():
            raise tracing.UsageError(
                f"no agent state in {store.root}: give --policy FILE|DIR, "
                "or --state-dir of a running agent"
            )
        policies = load_paths([store.policy_dir]) if store.policy_dir.is_dir() else []
        notes.append(f"policies: the agent's ({store.policy_dir})")
        status = read_status(store)
        if status and status.get("audit") and not audit_all:
            audit_all = True
            notes.append("the running agent is in global audit mode (--audit)")

    identities = IdentityAllocator()
    endpoints: list[Endpoint] = []
    if src_spec.endpoint_name or dst_spec.endpoint_name or not args.policy:
        if store.exists():
            state = store.read()
            identities = state.allocator()
            endpoints = [
                Endpoint(e.id, e.name, identities.for_labels(e.labels), ipaddress.IPv4Address(e.ip))
                for e in state.endpoints
            ]
    host_prefixes = [tracing.LOOPBACK]
    if not args.policy:
        # The agent maps this node's own addresses to the host identity too.
        with contextlib.suppress(Exception):
            from l7proxy.node import netns

            host_prefixes += [ipaddress.IPv4Network(f"{ip}/32") for ip in netns.host_addresses()]
    return tracing.build_scenario(
        policies,
        endpoints,
        identities,
        src_spec,
        dst_spec,
        args.port,
        audit_all=audit_all,
        host_prefixes=host_prefixes,
        notes=notes,
    )


# --------------------------------------------------------------------------- suggest


def _register_suggest(sub: Any) -> None:
    s = sub.add_parser(
        "suggest",
        help="write policies that allow what the flow log shows, checked by replaying it",
        description="One CiliumNetworkPolicy per endpoint seen receiving traffic, from the "
        "flow log; every observed request is replayed through the policy engine with the "
        "suggestion enforced before anything is written (exit 1 if one would be denied).",
    )
    s.add_argument(
        "--flowlog",
        action="append",
        type=Path,
        metavar="FILE",
        help="flow log(s) to read, with their rotated files (default: the agent's)",
    )
    s.add_argument("--since", type=_when, metavar="WHEN", help="30m, 2h, 1d, or an ISO time")
    s.add_argument("--until", type=_when, metavar="WHEN")
    s.add_argument("--endpoint", metavar="NAME|k=v,...", help="only this destination endpoint")
    s.add_argument(
        "--direction",
        choices=("ingress", "egress", "both"),
        default="ingress",
        help="ingress rules for the endpoints that received traffic (default), egress rules "
        "for those that sent it, or both",
    )
    s.add_argument(
        "--verdict",
        action="append",
        type=str.upper,
        choices=("FORWARDED", "AUDIT", "DENIED"),
        help="records to learn from (repeatable; default FORWARDED and AUDIT)",
    )
    s.add_argument(
        "--min-samples",
        type=int,
        default=3,
        metavar="N",
        help="distinct numbers, UUIDs, dates or hex values at one path position before it "
        "is generalised, and topics sharing a prefix before a topicPrefix (0: never; default 3)",
    )
    s.add_argument(
        "--max-literals",
        type=int,
        default=20,
        metavar="N",
        help="distinct free-form path segments of one shape before they become a "
        "character class (0: never; default 20)",
    )
    s.add_argument(
        "--max-paths",
        type=int,
        default=200,
        metavar="N",
        help="fail rather than write more path rules than this for one method (default 200)",
    )
    s.add_argument(
        "--max-cidrs",
        type=int,
        default=16,
        metavar="N",
        help="outside addresses named as /32 CIDRs before fromEntities: [world] (default 16)",
    )
    s.add_argument("--name-prefix", default="suggested", help="policy names: PREFIX-ENDPOINT")
    s.add_argument(
        "--audit", action="store_true", help="annotate the policies for audit mode (roll-out)"
    )
    s.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here, not stdout")
    s.set_defaults(func=suggest)


def _when(text: str) -> float:
    """Epoch seconds from ``30m``/``2h``/``1d``/``45s`` ago, or an ISO 8601 time."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 30m, 2h, 1d or an ISO time, got {text!r}"
        ) from None


def suggest(args: argparse.Namespace) -> int:
    from l7proxy.observe.flowlog import read_records, retained_files
    from l7proxy.policy.suggest.draft import Limits, SuggestError
    from l7proxy.policy.suggest.observed import LET_THROUGH, Selection
    from l7proxy.policy.suggest.paths import Bounds
    from l7proxy.policy.suggest.suggest import suggest as make_suggestion

    logs = args.flowlog or [Store(args.state_dir).flowlog]
    missing = [str(p) for p in logs if not retained_files(p)]
    if missing:
        print(f"policy suggest: no flow log at {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        limits = Limits(Bounds(args.min_samples, args.max_literals), args.max_cidrs, args.max_paths)
    except ValueError as err:
        print(f"policy suggest: {err}", file=sys.stderr)
        return 2
    directions = ("ingress", "egress") if args.direction == "both" else (args.direction,)
    selection = Selection(
        frozenset(args.verdict or LET_THROUGH),
        args.since,
        args.until,
        args.endpoint,
        frozenset(directions),
    )
    records = (record for path in logs for record in read_records(path))
    try:
        result = make_suggestion(
            records,
            selection,
            limits,
            name_prefix=args.name_prefix,
            audit=args.audit,
            source=", ".join(str(p) for p in logs),
        )
    except SuggestError as err:
        print(f"policy suggest: {err}", file=sys.stderr)
        return 2
    print(result.report, file=sys.stderr)
    if not result.observations:
        print("policy suggest: no observations selected; nothing written", file=sys.stderr)
        return 1
    if not result.ok:
        print(
            "policy suggest: the suggestion would deny what was seen; nothing written",
            file=sys.stderr,
        )
        return 1
    if args.output:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(result.yaml)
        os.replace(tmp, args.output)
        noun = "policy" if result.policies == 1 else "policies"
        print(f"wrote {result.policies} {noun} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(result.yaml)
    return 0
