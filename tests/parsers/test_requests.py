"""Typed requests say by themselves how they appear in flow logs and traces."""

from __future__ import annotations

import dataclasses
import json

import pytest

from l7proxy.observe.flowlog import request_fields
from parsers.requests import (
    REQUEST_TYPES,
    CqlRequest,
    GrpcCall,
    HttpRequest,
    KafkaRequest,
    TlsClientHello,
    from_flow_fields,
    quick_init,
)

HEAD = HttpRequest("POST", "/pkg.Svc/Get", "api:50051", (("content-type", "application/grpc"),))

CASES = [
    (
        HttpRequest("GET", "/v1", "api", (("host", "api"),)),
        "http",
        "http",
        {"method": "GET", "path": "/v1", "host": "api", "version": "1.1"},
        "http GET /v1 host=api",
    ),
    (
        GrpcCall("pkg.Svc", "Get", HEAD),
        "grpc",
        "http",
        {"service": "pkg.Svc", "method": "Get", "path": "/pkg.Svc/Get", "host": "api:50051"},
        "grpc pkg.Svc/Get",
    ),
    (
        KafkaRequest(0, 9, 7, "billing", ("orders", "refunds"), transactional_ids=("tx",)),
        "kafka",
        "kafka",
        {
            "api_key": 0,
            "api_version": 9,
            "correlation_id": 7,
            "client_id": "billing",
            "topics": ["orders", "refunds"],
            "groups": [],
            "transactional_ids": ["tx"],
        },
        "kafka produce (apiKey 0 v9) topics=orders,refunds transactionalIDs=tx clientID=billing",
    ),
    (
        CqlRequest("query", "select", "ks.t", "SELECT * FROM ks.t", stream=5),
        "cassandra",
        "cassandra",
        {"opcode": "query", "action": "select", "table": "ks.t", "stream": 5, "version": 4},
        "cql select ks.t",
    ),
    (
        TlsClientHello("api.example.com", ("h2", "http/1.1"), ("TLSv1.3", "TLSv1.2")),
        "tls",
        "tls",
        {
            "sni": "api.example.com",
            "alpn": ["h2", "http/1.1"],
            "versions": ["TLSv1.3", "TLSv1.2"],
            "ech": False,
        },
        "tls sni=api.example.com alpn=h2,http/1.1",
    ),
    (
        TlsClientHello("public.example.com", versions=("TLSv1.3",), ech=True),
        "tls",
        "tls",
        {"sni": "public.example.com", "alpn": [], "versions": ["TLSv1.3"], "ech": True},
        "tls sni=public.example.com ech (outer name)",
    ),
    (
        TlsClientHello(""),
        "tls",
        "tls",
        {"sni": "", "alpn": [], "versions": [], "ech": False},
        "tls (no sni)",
    ),
]


@pytest.mark.parametrize("request_, protocol, family, fields, line", CASES)
def test_protocol_family_fields_and_trace_line(request_, protocol, family, fields, line):
    assert (request_.protocol, request_.family) == (protocol, family)
    assert request_.flow_fields() == fields
    assert request_fields(request_) == (protocol, fields)
    json.dumps(fields)  # a flow record is JSON
    assert request_.describe() == line


def test_every_request_type_is_covered():
    assert {type(case[0]) for case in CASES} == set(REQUEST_TYPES)


def test_http_rules_read_the_same_head_from_a_request_or_a_call():
    assert HEAD.http is HEAD
    assert GrpcCall("pkg.Svc", "Get", HEAD).http is HEAD


@pytest.mark.parametrize("request_, protocol, family, fields, line", CASES)
def test_a_flow_record_gives_back_the_request_it_was_made_from(
    request_, protocol, family, fields, line
):
    """What ``flow_fields`` wrote, read back through JSON, is the same request: same
    type, fields and trace line (a UI or a replay judges it again)."""
    again = from_flow_fields(protocol, json.loads(json.dumps(fields)))
    assert type(again) is type(request_)
    assert again.flow_fields() == fields
    assert again.describe() == line


def test_a_request_read_back_has_only_the_headers_a_record_keeps():
    http = from_flow_fields("http", {"method": "GET", "path": "/v1", "host": "api"})
    assert http.headers == (("host", "api"),)
    call = from_flow_fields("grpc", {"service": "pkg.Svc", "method": "Get", "host": "api"})
    assert call.http.path == "/pkg.Svc/Get"
    assert call.http.header_values("content-type") == ["application/grpc"]


def test_a_record_of_no_request_type_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="no request type has the protocol 'tcp'"):
        from_flow_fields("tcp", {})
    with pytest.raises(ValueError, match="a kafka flow record without its 'api_key'"):
        from_flow_fields("kafka", {"topics": ["orders"]})
    with pytest.raises(ValueError, match="a http flow record without its 'path'"):
        from_flow_fields("http", {"method": "GET", "path": ""})
    with pytest.raises(ValueError, match="a kafka flow record without its 'api_version'"):
        from_flow_fields("kafka", {"api_key": 0, "api_version": "9"})


# --------------------------------------------------------------------------- quick_init


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
def test_requests_built_by_quick_init_stay_frozen_and_equal_by_value(request_type):
    request = next(r for r, *_ in CASES if type(r) is request_type)
    copy = dataclasses.replace(request)  # built again by its __init__, from its fields

    assert copy == request and hash(copy) == hash(request) and copy is not request
    first = dataclasses.fields(request)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(copy, first, getattr(request, first))


def test_quick_init_fills_defaults_and_takes_fields_by_name():
    request = HttpRequest(path="/v1", method="GET", host="api", headers=())

    assert request.version == "1.1"
    assert request == HttpRequest("GET", "/v1", "api", (), "1.1")
    produce = KafkaRequest(0, 9, 7, "c")
    assert produce.topics == () and produce.undecodable is None


def test_quick_init_refuses_a_class_whose_init_it_cannot_write():
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        names: list[str] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        size: int

        def __post_init__(self) -> None:
            assert self.size >= 0

    with pytest.raises(TypeError, match="WithFactory.names: quick_init wants a plain field"):
        quick_init(WithFactory)
    with pytest.raises(TypeError, match="does not call __post_init__"):
        quick_init(Checked)
