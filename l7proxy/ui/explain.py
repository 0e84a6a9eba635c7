"""Why a flow got its verdict: what its record says decided it, and the
``policy trace`` of the same flow against the policy in force now.

The trace is ``l7proxy.policy.trace`` itself (the decision code real traffic
runs, with a trace list), fed the record's two sides and its request rebuilt
from the record's fields. A record keeps no HTTP headers, so a rule on headers
is traced without them; the page says so, and says when the policy has changed
since the flow (the recorded verdict is what happened, the trace what the
policy says now).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from l7proxy.observe.flowlog import Record
from l7proxy.policy.engine import CompiledPolicy
from l7proxy.policy.identity import labels_key
from l7proxy.policy.state import PolicyState, Side
from l7proxy.policy.trace import Scenario, format_text, trace
from parsers.kafka.apis import policy_name
from parsers.requests import L7Request, from_flow_fields


def explain(record: Record, state: PolicyState | None) -> dict[str, Any]:
    kind = record.get("type")
    out: dict[str, Any] = {
        "recorded": {
            "verdict": record.get("verdict", ""),
            "policy": record.get("policy") or "",
            "rule": record.get("rule") or "",
            "reason": record.get("reason") or "",
        },
        "notes": [],
        "trace": None,
    }
    if kind == "limit":
        out["notes"].append(
            f"cut by the proxy's limit {record.get('limit')} ({record.get('reason')}): "
            "no policy decided this flow"
        )
        return out
    if state is None:
        out["notes"].append("the policy is not loaded yet: nothing to trace against")
        return out
    compiled = state.current
    source, destination = record.get("source") or {}, record.get("destination") or {}
    port = int(destination.get("port") or 0)
    if not 0 < port < 65536:
        out["notes"].append("the record names no destination port: nothing to trace")
        return out
    requests: list[L7Request] = []
    if kind == "l7":
        try:
            requests = [from_flow_fields(str(record.get("protocol")), record.get("l7") or {})]
        except ValueError as err:
            out["notes"].append(f"the request cannot be rebuilt from the record: {err}")
            return out
        if record.get("protocol") == "http":
            out["notes"].append(
                "a flow record keeps no HTTP headers: the trace sees only the Host header"
            )
    if record.get("protocol") == "udp":
        out["notes"].append("policy trace judges TCP: this UDP drop is traced as TCP")
    scenario = Scenario(compiled, _side(state, source, 0), _side(state, destination, port), port)
    result = trace(scenario, requests)
    traced = result["verdict"]
    out["trace"] = {
        "text": format_text(result, compiled),
        "verdict": traced,
        "revision": compiled.revision,
        "command": _command(compiled, source, destination, port, requests),
    }
    if traced["verdict"] != out["recorded"]["verdict"]:
        out["notes"].append(
            f"the policy in force now (revision {compiled.revision}) says "
            f"{traced['verdict']}, not {out['recorded']['verdict']}: it has changed since"
        )
    return out


def _side(state: PolicyState, side: Mapping[str, Any], port: int) -> Side:
    """The record's side as the policy sees it now: its endpoint by name if the
    node still has it, else its address (the ipcache gives the identity)."""
    name = side.get("endpoint")
    endpoint = next((e for e in state.current.endpoints.values() if e.name == name), None)
    return state.side(str(side.get("ip") or ""), port, endpoint)


def _command(
    compiled: CompiledPolicy,
    source: Mapping[str, Any],
    destination: Mapping[str, Any],
    port: int,
    requests: list[L7Request],
) -> str:
    """The ``l7proxy policy trace`` command line that asks the same question ("" for
    CQL, whose record keeps no statement)."""
    argv = ["l7proxy", "policy", "trace", "--from", _peer(source), "--to", _peer(destination)]
    argv += ["--port", str(port)]
    for request in requests[:1]:
        fields = request.flow_fields()
        if request.protocol == "http":
            argv += ["--http", f"{fields['method']} {fields['path']} {fields['host']}".rstrip()]
        elif request.protocol == "grpc":
            argv += ["--grpc", f"{fields['service']}/{fields['method']}"]
        elif request.protocol == "kafka":
            names = fields["topics"] or fields["groups"] or fields["transactional_ids"]
            api = f"{policy_name(fields['api_key'])}:{fields['api_version']}"
            argv += ["--kafka", " ".join([api, ",".join(names)]).rstrip()]
        elif request.protocol == "tls":
            words = [fields["sni"] or "-", ",".join(fields["alpn"])]
            argv += ["--tls", " ".join(w for w in words if w)]
        else:  # a CQL record keeps the action and table, not the statement to give --cql
            return ""
    return shlex.join(argv)


def _peer(side: Mapping[str, Any]) -> str:
    labels = dict(side.get("labels") or {})
    if labels and not any(k.startswith(("reserved:", "cidr:")) for k in labels):
        return labels_key(labels)
    return str(side.get("ip") or "")
