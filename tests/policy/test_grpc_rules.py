"""rules.grpc: compile errors carry the YAML path; matching is exact or full-match regex."""

from __future__ import annotations

import pytest

from l7proxy.policy.errors import PolicyError, YamlPath
from l7proxy.policy.load import load_text
from l7proxy.policy.rules import kind
from l7proxy.policy.rules.grpc import compile_rule
from parsers.requests import GrpcCall, HttpRequest

HTTP = HttpRequest(
    "POST",
    "/grpc.testing.TestService/UnaryCall",
    "svc:50051",
    (("content-type", "application/grpc"),),
    "2",
)


def call(service: str, method: str) -> GrpcCall:
    http = HttpRequest(
        "POST", f"/{service}/{method}", "svc:50051", (("content-type", "application/grpc"),), "2"
    )
    return GrpcCall(service, method, http)


def rule(node):
    return compile_rule(node, YamlPath().key("rules").key("grpc").index(0))


def test_registered_under_the_http_parser_family():
    grpc = kind("grpc")
    assert grpc is not None and grpc.parser == "http" and not grpc.generic


@pytest.mark.parametrize(
    "node, where, reason",
    [
        ({"service": "a.B", "metod": "X"}, "rules.grpc[0].metod", "unknown field 'metod'"),
        ({"service": "grpc.(unclosed"}, "rules.grpc[0].service", "invalid regex"),
        ({"method": "Get[A-"}, "rules.grpc[0].method", "invalid regex"),
        ({"service": 42}, "rules.grpc[0].service", "expected a non-empty name"),
        ({"method": ""}, "rules.grpc[0].method", "expected a non-empty name"),
        ({"method": "Unary Call"}, "rules.grpc[0].method", "not a valid protobuf name"),
        ({"service": "grpc..testing"}, "rules.grpc[0].service", "not a valid protobuf name"),
        ({"method": "pkg.Svc"}, "rules.grpc[0].method", "not a valid protobuf name"),
        (["service", "x"], "rules.grpc[0]", "expected a mapping"),
    ],
)
def test_compile_errors_name_the_yaml_path(node, where, reason):
    with pytest.raises(PolicyError) as info:
        rule(node)
    assert info.value.path == where
    assert reason in info.value.reason


def test_exact_service_and_method():
    r = rule({"service": "grpc.testing.TestService", "method": "UnaryCall"})
    assert r.matches(call("grpc.testing.TestService", "UnaryCall"))
    assert not r.matches(call("grpc.testing.TestService", "EmptyCall"))
    assert not r.matches(call("grpc.testing.TestServiceX", "UnaryCall"))
    # A dot is literal in an exact name, not "any character".
    assert not r.matches(call("grpcXtesting.TestService", "UnaryCall"))
    assert (
        r.explain(call("grpc.testing.TestService", "EmptyCall"))
        == "method 'EmptyCall' does not match 'UnaryCall'"
    )
    assert r.describe() == "grpc grpc.testing.TestService/UnaryCall"


def test_regex_fields_are_full_match():
    r = rule({"service": r"grpc\.testing\..*", "method": "(Unary|Empty)Call"})
    assert r.matches(call("grpc.testing.TestService", "EmptyCall"))
    assert r.matches(call("grpc.testing.UnimplementedService", "UnaryCall"))
    assert not r.matches(call("grpc.testing.TestService", "UnaryCallX"))
    assert not r.matches(call("xgrpc.testing.TestService", "UnaryCall"))


def test_omitted_fields_match_everything_but_only_grpc_calls():
    any_method = rule({"service": "grpc.testing.TestService"})
    assert any_method.matches(call("grpc.testing.TestService", "StreamingInputCall"))
    assert not any_method.matches(call("grpc.health.v1.Health", "Check"))
    everything = rule({})
    assert everything.matches(call("a.B", "C"))
    # A plain HTTP/2 request is not a gRPC call: the kind says so, and the engine
    # never hands one to a grpc rule.
    grpc = kind("grpc")
    assert grpc is not None and grpc.request_types == (GrpcCall,)
    assert type(HTTP) not in grpc.request_types
    assert everything.describe() == "grpc */*"


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: grpc-demo}
spec:
  endpointSelector: {matchLabels: {app: interop}}
  ingress:
    - toPorts:
        - ports: [{port: "50051", protocol: TCP}]
          rules:
            grpc:
              - {service: grpc.testing.TestService, method: EmptyCall}
              - {method: "Streaming.*"}
            http:
              - {method: GET, path: /healthz}
"""


def test_grpc_and_http_rules_share_a_port_in_a_real_policy():
    (policy,) = load_text(POLICY)
    (port_rule,) = policy.rules[0].to_ports
    assert port_rule.parser == "http"
    assert [(ref.kind.key, ref.path) for ref in port_rule.l7] == [
        ("grpc", "spec.ingress[0].toPorts[0].rules.grpc[0]"),
        ("grpc", "spec.ingress[0].toPorts[0].rules.grpc[1]"),
        ("http", "spec.ingress[0].toPorts[0].rules.http[0]"),
    ]
    streaming = port_rule.l7[1].rule
    assert streaming.matches(call("grpc.testing.TestService", "StreamingOutputCall"))
    assert not streaming.matches(call("grpc.testing.TestService", "UnaryCall"))


def test_bad_grpc_rule_in_a_policy_names_its_place():
    text = POLICY.replace("method: EmptyCall", "methd: EmptyCall")
    with pytest.raises(PolicyError) as info:
        load_text(text)
    assert info.value.path == "spec.ingress[0].toPorts[0].rules.grpc[0].methd"
