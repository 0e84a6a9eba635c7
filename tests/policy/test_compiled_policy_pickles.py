"""A compiled policy survives the trip to ``run --workers``' workers (a pickle on a pipe).

Every example policy (HTTP, gRPC, Kafka, Cassandra, TLS SNI, terminating and
originating TLS, L3/L4, deny) compiled with endpoints its selectors match,
used first (its matchers built), then pickled and unpickled: the copy gives
every connection the same L4 verdict and parser, every HTTP request the same
decision, and holds the same rules (Kafka, CQL, TLS, gRPC compiled rules
compared as values), endpoints, ipcache, identities and kernel entries.
"""

from __future__ import annotations

import ipaddress
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_paths
from l7proxy.policy.namespaces import NAMESPACE_LABEL
from l7proxy.policy.state import PolicyState
from parsers.requests import HttpRequest
from tests.support import REPO

EXAMPLES = sorted((REPO / "policies").glob("*.yaml"))


def found(node: Any, key: str) -> list[Any]:
    """Every value under ``key`` anywhere in a YAML document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in found(v, key)
        ]
    if isinstance(node, list):
        return [x for v in node for x in found(v, key)]
    return []


def compiled_with_endpoints(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    namespaces = {str(n) for n in found(docs, "namespace")} or {"default"}
    label_sets = [
        {str(k): str(v) for k, v in labels.items()} | {NAMESPACE_LABEL: namespace}
        for labels in found(docs, "matchLabels")
        for namespace in namespaces
    ]
    identities = IdentityAllocator()
    endpoints = [
        Endpoint(
            i + 1, f"ep{i}", identities.for_labels(labels), ipaddress.IPv4Address(f"10.7.0.{i + 1}")
        )
        for i, labels in enumerate(label_sets)
    ]
    ports = sorted({int(p) for p in found(docs, "port")} | {80})
    paths = sorted({str(p) for p in found(docs, "path")} | {"/"})
    methods = sorted({str(m) for m in found(docs, "method")} | {"GET"})
    return (
        compile_policy(load_paths([path]), endpoints, identities),
        endpoints,
        ports,
        paths,
        methods,
    )


def judge(compiled, endpoints, ports, paths, methods) -> list[tuple]:
    """Every endpoint pair, port and HTTP request: the L4 verdict and, where the
    port has an L7 parser, the decision on each request."""
    state = PolicyState(compiled)
    # The endpoints, this host, a CIDR the examples name, and the world.
    addresses = [str(ep.ip) for ep in endpoints] + ["127.0.0.1", "10.1.2.3", "203.0.113.9"]
    out = []
    for src in addresses:
        for dst in addresses:
            for port in ports:
                conn = state.connection(state.side(src, 40000), state.side(dst, port))
                row: tuple = (src, dst, port, conn.l4.allowed, conn.parser)
                if conn.l4.allowed and conn.parser == "http":
                    row += tuple(
                        conn.decide(HttpRequest(m, p, "svc", ())).allowed
                        for m in methods
                        for p in paths
                    )
                out.append(row)
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_a_pickled_compiled_policy_judges_as_the_original(path: Path):
    compiled, endpoints, ports, paths, methods = compiled_with_endpoints(path)
    before = judge(compiled, endpoints, ports, paths, methods)  # builds the matchers too
    copy = pickle.loads(pickle.dumps(compiled, protocol=pickle.HIGHEST_PROTOCOL))

    assert judge(copy, endpoints, ports, paths, methods) == before
    assert any(allowed for _, _, _, allowed, _ in (r[:5] for r in before)), "nothing selected"
    assert copy.directions == compiled.directions
    assert copy.policies == compiled.policies
    assert copy.endpoints_by_ip == compiled.endpoints_by_ip
    assert copy.ipcache.prefixes == compiled.ipcache.prefixes
    assert copy.identities.snapshot() == compiled.identities.snapshot()
    ports_of = {family: 10000 + i for i, family in enumerate(("http", "kafka", "cassandra", "tls"))}
    assert copy.kernel_entries(ports_of) == compiled.kernel_entries(ports_of)
