"""The shipped policies/grpc-*.yaml examples load and decide as their comments say."""

from __future__ import annotations

import ipaddress

import pytest

from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_paths
from l7proxy.policy.state import PolicyState
from parsers.requests import GrpcCall, HttpRequest
from tests.support import POLICIES

ENDPOINTS = {
    "interop": ({"app": "interop"}, "10.7.0.10"),
    "billing": ({"app": "billing"}, "10.7.0.11"),
    "frontend": ({"app": "frontend"}, "10.7.0.20"),
    "monitoring": ({"app": "monitoring"}, "10.7.0.21"),
    "checkout": ({"app": "checkout"}, "10.7.0.22"),
    "batch": ({"app": "batch"}, "10.7.0.23"),
}


@pytest.fixture(scope="module")
def state():
    identities = IdentityAllocator()
    endpoints = [
        Endpoint(i + 1, name, identities.for_labels(labels), ipaddress.IPv4Address(ip))
        for i, (name, (labels, ip)) in enumerate(ENDPOINTS.items())
    ]
    policies = load_paths(sorted(POLICIES.glob("grpc-*.yaml")))
    return PolicyState(compile_policy(policies, endpoints, identities))


def call(service: str, method: str) -> GrpcCall:
    path = f"/{service}/{method}"
    return GrpcCall(
        service,
        method,
        HttpRequest("POST", path, "svc", (("content-type", "application/grpc"),), "2"),
    )


def allowed(state, src: str, dst: str, port: int, request) -> bool:
    conn = state.connection(
        state.side(ENDPOINTS[src][1], 40000), state.side(ENDPOINTS[dst][1], port)
    )
    return conn.decide(request).allowed


@pytest.mark.parametrize(
    "src, method, expected",
    [
        ("frontend", "UnaryCall", True),
        ("frontend", "EmptyCall", True),
        ("frontend", "StreamingOutputCall", True),
        ("frontend", "StreamingInputCall", False),
        ("frontend", "FullDuplexCall", False),
        ("frontend", "CacheableUnaryCall", False),
        ("monitoring", "EmptyCall", True),
        ("monitoring", "UnaryCall", False),
    ],
)
def test_interop_readonly(state, src, method, expected):
    assert (
        allowed(state, src, "interop", 50051, call("grpc.testing.TestService", method)) is expected
    )


def test_interop_readonly_refuses_other_services_and_plain_http(state):
    assert not allowed(
        state,
        "frontend",
        "interop",
        50051,
        call("grpc.testing.UnimplementedService", "UnimplementedCall"),
    )
    assert not allowed(state, "frontend", "interop", 50051, HttpRequest("GET", "/", "svc", (), "2"))


@pytest.mark.parametrize(
    "src, request_, expected",
    [
        ("batch", call("grpc.health.v1.Health", "Check"), True),
        ("batch", call("grpc.health.v1.Health", "Watch"), True),
        ("batch", call("billing.v1.Invoices", "Get"), False),
        ("checkout", call("billing.v1.Invoices", "Get"), True),
        ("checkout", call("billing.v1.Refunds", "Create"), True),
        ("checkout", call("billing.v1.Invoices", "DeleteInvoice"), False),
        ("checkout", call("billing.v2.Invoices", "Get"), False),
        ("batch", HttpRequest("GET", "/metrics", "billing", (), "2"), True),
        ("batch", HttpRequest("POST", "/metrics", "billing", (), "2"), False),
    ],
)
def test_billing_health_and_explicit_deny(state, src, request_, expected):
    assert allowed(state, src, "billing", 9000, request_) is expected


def test_a_plain_http_request_meets_no_grpc_rule_and_is_denied(state):
    conn = state.connection(
        state.side(ENDPOINTS["frontend"][1], 40000), state.side(ENDPOINTS["interop"][1], 50051)
    )
    trace: list[str] = []
    decision = conn.decide(HttpRequest("GET", "/", "svc", (), "2"), trace)
    assert (decision.allowed, decision.reason) == (False, "no L7 rule matches")
    # The grpc kind judges GrpcCall only: its rules are skipped, and the trace says so.
    assert "  grpc rules on this port do not judge HttpRequest requests: skipped" in trace
    assert not any("MATCH" in line or "no match" in line for line in trace)
