"""``l7proxy policy trace``: why would this request be allowed or denied?

The trace builds the same objects real traffic builds (a ``CompiledPolicy``,
two ``Side``s, a ``ConnectionPolicy``) and asks them the same questions the
proxy asks, passing a ``trace`` list so that every rule records why it
matched or not. There is no second implementation of the policy semantics
here: this module only resolves names, builds typed requests and prints.

Peers are given as labels (``org=empire,class=tiefighter``: a virtual
endpoint with no address), as an endpoint name from the agent's state dir, or
as an IP/CIDR (its identity comes from the compiled ipcache, as the kernel
would find it). Loopback is the ``host`` identity, as in firewall mode.

Exit status: 0 allowed (also AUDIT), 1 denied, 2 usage error.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from l7proxy.policy.engine import CompiledPolicy, Endpoint, PortVerdict, compile_policy
from l7proxy.policy.identity import IdentityAllocator, parse_labels
from l7proxy.policy.model import EGRESS, INGRESS, Policy, PortTls
from l7proxy.policy.state import ConnectionPolicy, PolicyState, Side
from parsers.base import Decision
from parsers.requests import (
    CqlRequest,
    GrpcCall,
    HttpRequest,
    KafkaRequest,
    L7Request,
    TlsClientHello,
)

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
FIRST_VIRTUAL_ID = 1


class UsageError(Exception):
    """Bad command line: exit 2 with this message."""


# --------------------------------------------------------------------------- peers


@dataclass
class PeerSpec:
    """What ``--from``/``--to`` named, before the policy is compiled."""

    text: str
    labels: dict[str, str] | None = None
    ip: str | None = None
    endpoint_name: str | None = None


def parse_peer(text: str) -> PeerSpec:
    text = text.strip()
    if not text:
        raise UsageError("empty peer")
    if "=" in text:
        try:
            return PeerSpec(text, labels=parse_labels(text))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        return PeerSpec(text, endpoint_name=text)
    # A CIDR stands for an address inside it; the ipcache gives its identity.
    return PeerSpec(text, ip=str(net.network_address))


# --------------------------------------------------------------------------- requests


def _headers(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {item!r} is not of the form 'Name: value'")
        out.append((name.strip().lower(), value.strip()))
    return out


@dataclass(frozen=True)
class RequestSpec:
    """A request as ``policy trace`` writes it: one of the five kinds, plus headers."""

    http: str | None = None
    grpc: str | None = None
    kafka: str | None = None
    cql: str | None = None
    headers: tuple[str, ...] = ()
    tls: str | None = None


def build_requests(spec: RequestSpec) -> list[L7Request]:
    """The typed request(s) an engine would hand to ``decide`` (a CQL batch
    is judged member by member, so it yields several)."""
    args = spec
    headers = _headers(list(spec.headers))
    if args.http:
        words = args.http.split()
        if len(words) not in (2, 3) or not words[1].startswith(("/", "*")):
            raise UsageError(f"--http {args.http!r}: expected 'METHOD /path [host]'")
        host = words[2] if len(words) == 3 else next((v for k, v in headers if k == "host"), "")
        if len(words) == 3 and not any(k == "host" for k, _ in headers):
            headers.insert(0, ("host", host))
        return [HttpRequest(words[0].upper(), words[1], host, tuple(headers))]
    if args.grpc:
        service, sep, method = args.grpc.strip().strip("/").partition("/")
        if not sep or not service or not method or "/" in method:
            raise UsageError(f"--grpc {args.grpc!r}: expected Service/Method")
        host = next((v for k, v in headers if k in (":authority", "host")), "")
        regular = [
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *[(k, v) for k, v in headers if not k.startswith(":")],
        ]
        http = HttpRequest("POST", f"/{service}/{method}", host, tuple(regular), version="2")
        return [GrpcCall(service, method, http)]
    if args.kafka:
        return [kafka_request(args.kafka)]
    if args.cql:
        return list(cql_requests(args.cql))
    if args.tls is not None:
        return [tls_client_hello(args.tls)]
    return []


def tls_client_hello(text: str) -> TlsClientHello:
    """``SERVER-NAME [ALPN,ALPN...] [ech]``, e.g. ``api.example.com h2,http/1.1``; ``-``
    for a ClientHello without a name. It offers TLS 1.3 and 1.2, as current clients do."""
    words = text.split()
    ech = "ech" in words[1:]
    words = [words[0], *(w for w in words[1:] if w != "ech")] if words else []
    if not words or len(words) > 2:
        raise UsageError(f"--tls {text!r}: expected 'SERVER-NAME [ALPN,...] [ech]'")
    name = "" if words[0] == "-" else words[0]
    alpn = tuple(a for a in words[1].split(",") if a) if len(words) > 1 else ()
    return TlsClientHello(name, alpn, ("TLSv1.3", "TLSv1.2"), ech)


# Kafka APIs whose requests name a group (JoinGroup, Heartbeat, LeaveGroup,
# SyncGroup, DescribeGroups, DeleteGroups, ConsumerGroupHeartbeat/Describe) or
# a transactional id (InitProducerId, EndTxn) rather than topics.
_GROUP_APIS = frozenset({11, 12, 13, 14, 15, 42, 68, 69})
_TXN_APIS = frozenset({22, 26})


def kafka_request(text: str) -> KafkaRequest:
    """``ROLE|API[:VERSION] [resource[,resource...]] [client-id]`` plus optional
    ``group=NAME`` / ``txn=ID`` words, e.g. ``produce orders billing`` or
    ``joingroup billing-consumers``. The resource is a topic, or a group /
    transactional id for the APIs that name those instead."""
    from parsers.kafka.apis import API_KEY_BY_POLICY_NAME as API_KEYS

    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"--kafka {text!r}: {exc}") from None
    groups = [w.split("=", 1)[1] for w in words if w.startswith("group=")]
    txns = [w.split("=", 1)[1] for w in words if w.startswith("txn=")]
    words = [w for w in words if not w.startswith(("group=", "txn="))]
    if not words or len(words) > 3:
        raise UsageError(f"--kafka {text!r}: expected 'ROLE|API topic [client-id]'")
    api, _, version = words[0].partition(":")
    api = api.lower()
    # A role names the request that defines it: producing is a Produce request,
    # consuming a Fetch request (the other APIs of a role are given by name).
    by_role = {"produce": API_KEYS["produce"], "consume": API_KEYS["fetch"]}
    if api in by_role:
        api_key = by_role[api]
    elif api in API_KEYS:
        api_key = API_KEYS[api]
    elif api.isdigit():
        api_key = int(api)
    else:
        raise UsageError(
            f"--kafka: unknown role or API {words[0]!r} (e.g. produce, consume, metadata, "
            "joingroup, 19)"
        )
    if version and not version.lstrip("v").isdigit():
        raise UsageError(f"--kafka: bad API version {version!r}")
    names = [t for t in words[1].split(",") if t] if len(words) > 1 else []
    topics: list[str] = []
    # The positional resource is whatever that API's request names.
    if api_key in _GROUP_APIS:
        groups += names
    elif api_key in _TXN_APIS:
        txns += names
    else:
        topics = names
    client_id = words[2] if len(words) > 2 else None
    return KafkaRequest(
        api_key,
        int(version.lstrip("v") or 0),
        0,
        client_id,
        tuple(topics),
        tuple(groups),
        tuple(txns),
    )


def cql_requests(statement: str) -> list[CqlRequest]:
    from parsers.cql.lexer import classify

    return [
        CqlRequest(opcode="query", action=st.action, table=st.table, statement=statement)
        for st in classify(statement)
    ]


# --------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    compiled: CompiledPolicy
    src: Side
    dst: Side
    port: int
    notes: list[str] = field(default_factory=list)


def build_scenario(
    policies: list[Policy],
    endpoints: list[Endpoint],
    identities: IdentityAllocator,
    src_spec: PeerSpec,
    dst_spec: PeerSpec,
    port: int,
    *,
    audit_all: bool = False,
    host_prefixes: list[ipaddress.IPv4Network] | None = None,
    notes: list[str] | None = None,
) -> Scenario:
    """Compile ``policies`` for the node's ``endpoints`` plus a virtual endpoint for
    each peer given by labels, and resolve both peers."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a TCP port")
    endpoints = list(endpoints)
    by_name = {ep.name: ep for ep in endpoints}
    next_id = max((ep.id for ep in endpoints), default=FIRST_VIRTUAL_ID - 1) + 1
    chosen: dict[str, Endpoint | None] = {}
    for role, spec in (("from", src_spec), ("to", dst_spec)):
        if spec.endpoint_name is not None:
            ep = by_name.get(spec.endpoint_name)
            if ep is None:
                known = ", ".join(sorted(by_name)) or "none"
                raise UsageError(
                    f"--{role} {spec.text!r}: not labels (k=v,...), an IP/CIDR, "
                    f"or a known endpoint (known: {known})"
                )
            chosen[role] = ep
        elif spec.labels is not None:
            ep = Endpoint(next_id, f"[{spec.text}]", identities.for_labels(spec.labels), None)
            next_id += 1
            endpoints.append(ep)
            chosen[role] = ep
        else:
            chosen[role] = None

    compiled = compile_policy(
        policies,
        endpoints,
        identities,
        audit_all=audit_all,
        host_prefixes=host_prefixes if host_prefixes is not None else [LOOPBACK],
    )
    state = PolicyState(compiled)
    src = _side(state, src_spec, chosen["from"], 0)
    dst = _side(state, dst_spec, chosen["to"], port)
    return Scenario(compiled, src, dst, port, list(notes or []))


def _side(state: PolicyState, spec: PeerSpec, endpoint: Endpoint | None, port: int) -> Side:
    if endpoint is not None:
        return state.side(str(endpoint.ip) if endpoint.ip else "", port, endpoint)
    # An endpoint's own IP resolves to that endpoint; a peer given as neither
    # labels nor an endpoint name was given as an address.
    return state.side(spec.ip or "", port)


# --------------------------------------------------------------------------- the trace


def trace(scenario: Scenario, requests: Sequence[L7Request]) -> dict[str, Any]:
    """Run the real decision code with tracing on; return a plain dict."""
    compiled, src, dst, port = scenario.compiled, scenario.src, scenario.dst, scenario.port
    directions = []
    if dst.endpoint is not None:
        lines: list[str] = []
        v = compiled.port_verdict(dst.endpoint.id, INGRESS, src.identity, port, trace=lines)
        directions.append(_direction(INGRESS, dst.endpoint.name, src.identity, v, lines))
    if src.endpoint is not None:
        lines = []
        v = compiled.port_verdict(src.endpoint.id, EGRESS, dst.identity, port, trace=lines)
        directions.append(_direction(EGRESS, src.endpoint.name, dst.identity, v, lines))

    conn = ConnectionPolicy(PolicyState(compiled), src, dst)  # what the proxy builds per connection
    l4 = conn.l4
    out: dict[str, Any] = {
        "from": src.describe(compiled.identities),
        "to": dst.describe(compiled.identities),
        "port": port,
        "protocol": "TCP",
        "notes": list(scenario.notes),
        "l3l4": {
            "directions": directions,
            "allowed": l4.allowed,
            "audit": l4.audit,
            "reason": l4.reason,
            "parser": conn.parser,
            "tls": _tls_summary(conn.tls),
        },
        "l7": [],
    }
    if not directions:
        out["notes"].append("neither side is a local endpoint: no policy applies")

    if not l4.allowed:
        return _final(out, "DROPPED", False, "", "", f"L3/L4: {l4.reason}")
    if conn.parser is None:
        if requests:
            out["notes"].append(
                "no L7 rules apply on this port: traffic is not parsed, every request passes"
            )
        verdict = "AUDIT" if l4.audit else "FORWARDED"
        return _final(
            out, verdict, True, "", "", f"L3/L4: {l4.reason if directions else 'no policy'}"
        )
    if not requests:
        out["notes"].append(
            f"this port is parsed as {conn.parser}: give --http/--grpc/--kafka/--cql/--tls to "
            "trace a request"
        )
        return _final(
            out,
            "AUDIT" if l4.audit else "FORWARDED",
            True,
            "",
            "",
            f"L3/L4: {l4.reason}; requests are judged at L7",
        )

    for request in requests:
        family = request.family
        if family != conn.parser:
            out["notes"].append(
                f"this port is parsed as {conn.parser}, not {family}: real {family} traffic here "
                "would be a parse error"
            )
        lines = []
        decision = conn.decide(request, lines)
        out["l7"].append(
            {
                "request": {"protocol": request.protocol, **request.flow_fields()},
                "summary": request.describe(),
                "trace": lines,
                "decision": _decision(decision),
            }
        )
    decisions = [entry["decision"] for entry in out["l7"]]
    deciding = (
        next((d for d in decisions if not d["allowed"]), None)
        or next((d for d in decisions if d["audit"]), None)
        or decisions[0]
    )
    return _final(
        out,
        deciding["verdict"],
        deciding["allowed"],
        deciding["policy"],
        deciding["rule"],
        deciding["reason"],
    )


def _direction(
    direction: str, endpoint: str, peer: int, verdict: PortVerdict, lines: list[str]
) -> dict[str, Any]:
    return {
        "direction": direction,
        "endpoint": endpoint,
        "peer_identity": peer,
        "allowed": verdict.allowed,
        "audit": verdict.audit,
        "parser": verdict.parser,
        "reason": verdict.reason,
        "trace": [line.strip() for line in lines],
    }


def _decision(d: Decision) -> dict[str, Any]:
    return {
        "verdict": d.verdict,
        "allowed": d.allowed,
        "audit": d.audit,
        "policy": d.policy,
        "rule": d.rule,
        "reason": d.reason,
        "edits": [list(e) for e in d.edits],
    }


def _final(
    out: dict[str, Any], verdict: str, allowed: bool, policy: str, rule: str, reason: str
) -> dict[str, Any]:
    out["verdict"] = {
        "verdict": verdict,
        "allowed": allowed,
        "policy": policy,
        "rule": rule,
        "reason": reason,
    }
    return out


# --------------------------------------------------------------------------- output


def format_text(result: dict[str, Any], compiled: CompiledPolicy) -> str:
    lines = []

    def who(side: dict[str, Any]) -> str:
        ident = compiled.identities.get(side["identity"])
        name = side["endpoint"] or side["ip"]
        return f"{name}  identity {ident if ident else side['identity']}"

    lines.append(f"from: {who(result['from'])}")
    lines.append(f"to:   {who(result['to'])}  port {result['port']}/{result['protocol']}")
    for entry in result["l7"]:
        lines.append(f"request: {entry['summary']}")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append("L3/L4:")
    l4 = result["l3l4"]
    for d in l4["directions"]:
        peer = "from" if d["direction"] == INGRESS else "to"
        lines.append(f"  {d['direction']} of {d['endpoint']} {peer} identity {d['peer_identity']}:")
        if d["reason"] == "not enforced":
            lines.append("    no policy selects this endpoint in this direction -> allowed")
            continue
        lines += [f"    {t}" for t in d["trace"]]
        state = "AUDIT (would drop)" if d["audit"] else "allowed" if d["allowed"] else "DROPPED"
        lines.append(
            f"    -> {state}: {d['reason']}"
            + (f" (L7 parser: {d['parser']})" if d["parser"] else "")
        )
    if not l4["directions"]:
        lines.append("  no policy applies")
    tls = l4.get("tls")
    if tls:
        told = f"  TLS: terminated with secret {tls['terminating']}"
        if tls.get("originating"):
            told += f"; TLS to the server, verified with secret {tls['originating']}"
        else:
            told += "; cleartext to the server"
        lines.append(told)
    if result["l7"]:
        lines.append("")
        lines.append("L7:")
        for entry in result["l7"]:
            if len(result["l7"]) > 1:
                lines.append(f"  {entry['summary']}:")
            pad = "    " if len(result["l7"]) > 1 else "  "
            steps = entry["trace"]
            for i, t in enumerate(steps):
                lines.append(f"{pad}{t}")
                # A direction header with no rule lines under it: nothing enforces it.
                if not t.startswith(" ") and (
                    i + 1 == len(steps) or not steps[i + 1].startswith(" ")
                ):
                    lines.append(f"{pad}  no policy in this direction -> allowed")
            d = entry["decision"]
            lines.append(
                f"{pad}-> {d['verdict']}: {d['reason']}"
                + (f" [{_where(d)}]" if d["policy"] else "")
            )
            for op, name, value in d["edits"]:
                lines.append(f"{pad}   header edit: {op} {name}{': ' + value if value else ''}")
    v = result["verdict"]
    lines.append("")
    deciding = f" by {_where(v)}" if v["policy"] else ""
    lines.append(f"verdict: {v['verdict']}{deciding} ({v['reason']})")
    if v["verdict"] == "AUDIT":
        lines.append(
            "         audit mode: policy would deny this, but it is allowed and logged as AUDIT"
        )
    return "\n".join(lines)


def _where(d: dict[str, Any]) -> str:
    return f"policy {d['policy']}" + (f" rule {d['rule']}" if d["rule"] else "")


def _tls_summary(tls: PortTls | None) -> dict[str, str] | None:
    """The secrets a connection's TLS comes from (``terminatingTLS``, ``originatingTLS``)."""
    if tls is None or tls.terminating is None:
        return None
    out = {"terminating": tls.terminating.secret}
    if tls.originating is not None:
        out["originating"] = tls.originating.secret
    return out
