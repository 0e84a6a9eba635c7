"""Request smuggling through the real firewall (both parser implementations)
in front of a real aiohttp server: the smuggled request never arrives."""

from __future__ import annotations

import re
import socket

import pytest

from tests.support.firewall import running_firewall
from tests.support.http_upstream import http_upstream

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - {method: "GET|POST", path: "/v1/.*"}
        - {method: "GET|POST", path: /echo}
"""

SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
ATTACKS = {
    "cl_te": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_cl": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n27\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "te_te": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: x\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_nbsp": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\xa0chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "obs_fold_te": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nX: y\r\n"
    b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "space_colon": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length : 4\r\n\r\nabcd" + SMUGGLED,
    "bare_lf": b"POST /v1/a HTTP/1.1\r\nHost: a\nContent-Length: 4\r\n\r\nabcd" + SMUGGLED,
    "dup_cl": b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 39\r\n\r\n"
    + SMUGGLED,
}


@pytest.fixture(params=["c", "python"])
def firewall(request, monkeypatch):
    monkeypatch.setenv("L7PROXY_HTTP1_PARSER", request.param)  # inherited by the firewall process
    with http_upstream() as up:
        policy = POLICY.replace("PORT", str(up.port))
        with running_firewall(policy, ("127.0.0.1", up.port), {"app": "api"}) as fw:
            yield fw, up


def exchange(address, data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_smuggling_attempts_get_400_and_nothing_reaches_the_server(firewall):
    fw, upstream = firewall
    for name, attack in ATTACKS.items():
        reply = exchange(fw.address, attack)
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (name, reply[:80])
        assert reply.count(b"HTTP/1.1 ") == 1, name
    assert upstream.requests == []


def test_a_legitimate_pipeline_still_flows(firewall):
    fw, upstream = firewall
    reply = exchange(
        fw.address,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n"
        b"DELETE /v1/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        half_close=False,  # the last request asks for the close
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"200", b"200", b"403"]
    assert b"POST /echo 3 -" in reply and b"ok /v1/x" in reply
    assert upstream.requests == [("POST", "/echo"), ("GET", "/v1/x")]
