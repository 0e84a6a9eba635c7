"""Header-section helpers: gRPC recognition, method names, grpc-message encoding, RFC 9113
checks."""

from __future__ import annotations

import pytest

from parsers.http2.headers import (
    build_request,
    grpc_denial,
    grpc_names,
    is_grpc,
    percent_encode,
    request_problem,
    response_problem,
    trailers_problem,
)
from parsers.requests import GrpcCall, HttpRequest

BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"svc:50051"),
    (b":path", b"/pkg.v1.Svc/Do"),
]


@pytest.mark.parametrize(
    "ctype, grpc",
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"Application/GRPC; charset=utf-8", True),
        (b"application/grpc-web", False),  # gRPC-Web is a different protocol
        (b"application/json", False),
        (b"application/grpcx", False),
    ],
)
def test_grpc_is_recognised_by_content_type(ctype, grpc):
    assert is_grpc([*BASE, (b"content-type", ctype)]) is grpc


@pytest.mark.parametrize(
    "path, names",
    [
        ("/grpc.testing.TestService/UnaryCall", ("grpc.testing.TestService", "UnaryCall")),
        ("/Svc/M", ("Svc", "M")),
        ("/a/b/c", ("", "")),
        ("/onlyservice", ("", "")),
        ("//M", ("", "")),
        ("relative/M", ("", "")),
    ],
)
def test_grpc_names_from_the_path(path, names):
    assert grpc_names(path) == names


def test_build_request_types():
    call = build_request([*BASE, (b"content-type", b"application/grpc"), (b"x-b-bin", b"AAEC")])
    assert isinstance(call, GrpcCall)
    assert (call.service, call.method) == ("pkg.v1.Svc", "Do")
    assert call.http == HttpRequest(
        "POST",
        "/pkg.v1.Svc/Do",
        "svc:50051",
        (("content-type", "application/grpc"), ("x-b-bin", "AAEC")),
        "2",
    )
    plain = build_request(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.example")]
    )
    assert plain == HttpRequest("GET", "/", "h.example", (("host", "h.example"),), "2")


def test_grpc_message_is_percent_encoded_utf8():
    assert percent_encode("Access denied: 100% \u263a") == b"Access denied: 100%25 %E2%98%BA"
    headers = dict(grpc_denial("policy p rule r"))
    assert headers[b"grpc-status"] == b"7" and headers[b"grpc-message"] == b"policy p rule r"


@pytest.mark.parametrize(
    "headers, problem",
    [
        (BASE, None),
        ([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*")], None),
        ([(b":method", b"CONNECT"), (b":authority", b"h:443")], None),
        ([(b":method", b"CONNECT"), (b":authority", b"h:443"), (b":path", b"/")], "CONNECT"),
        ([*BASE, (b":method", b"GET")], "duplicate"),
        ([*BASE[:3], (b"accept", b"*/*"), BASE[3]], "pseudo-header after"),
        ([*BASE, (b":status", b"200")], "unknown pseudo-header"),
        ([*BASE, (b"Accept", b"*/*")], "invalid field name"),
        ([*BASE, (b"x", b" padded")], "invalid value"),
        ([*BASE, (b"x", b"a\nb")], "invalid value"),
        ([*BASE, (b"keep-alive", b"5")], "connection-specific"),
        ([*BASE, (b"te", b"gzip")], "te other than trailers"),
        ([*BASE, (b"te", b"trailers")], None),
        (BASE[1:], "missing :method"),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"")], "missing :path"),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"x")], "invalid :path"),
    ],
)
def test_request_problems(headers, problem):
    found = request_problem(headers)
    assert (found is None) if problem is None else (problem in found)


def test_response_and_trailer_problems():
    assert response_problem([(b":status", b"204")]) is None
    assert "status" in response_problem([(b":status", b"20")])
    assert "status" in response_problem([(b"server", b"x")])
    assert "pseudo" in response_problem([(b":status", b"200"), (b":status", b"200")])
    assert trailers_problem([(b"grpc-status", b"0")]) is None
    assert "pseudo" in trailers_problem([(b":status", b"200")])
