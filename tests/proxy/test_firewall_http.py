"""API-firewall mode with HTTP/1.1: the real CLI in front of a real aiohttp server."""

from __future__ import annotations

import http.client
import re
import socket
import time

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
        - {method: GET, path: "/v1/.*"}
        - {method: "GET|POST", path: /echo}
        - {method: GET, path: "/big([?].*)?"}  # the path includes the query string, as in Cilium
        - {method: GET, path: /ws, headers: [Upgrade]}
        - method: PUT
          path: /echo
          headerMatches: [{name: X-Fleet, value: imperial, mismatch: REPLACE}]
"""


@pytest.fixture
def upstream():
    with http_upstream() as up:
        yield up


@pytest.fixture
def firewall(upstream):
    with running_firewall(
        POLICY.replace("PORT", str(upstream.port)),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--header-timeout", "1"],
    ) as fw:
        yield fw


def raw_exchange(fw, data: bytes, *, expect_close: bool = False, timeout: float = 5.0) -> bytes:
    with socket.create_connection(fw.address, timeout=timeout) as s:
        s.sendall(data)
        if not expect_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_allowed_and_denied_requests_share_one_keepalive_connection(firewall, upstream):
    conn = http.client.HTTPConnection(*firewall.address, timeout=5)
    conn.request("GET", "/v1/ships")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"ok /v1/ships")
    conn.request("DELETE", "/v1/ships")
    r = conn.getresponse()
    assert (r.status, r.read()) == (403, b"Access denied")
    conn.request("GET", "/v1/after-deny")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"ok /v1/after-deny")
    conn.close()
    assert ("DELETE", "/v1/ships") not in upstream.requests
    flows = firewall.flows(wait_for=3)
    assert [(f["verdict"], f["l7"]["method"], f["reply"]["status"]) for f in flows] == [
        ("FORWARDED", "GET", 200),
        ("DENIED", "DELETE", 403),
        ("FORWARDED", "GET", 200),
    ]
    assert flows[1]["policy"] == "api" and flows[1]["source"]["identity"] == 1  # reserved:host


def test_pipelined_requests_answered_in_order_with_the_denial_in_the_middle(firewall, upstream):
    data = (
        b"GET /v1/a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PATCH /v1/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /v1/c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(
        firewall, data, expect_close=True
    )  # no half-close: aiohttp drops pipelined work on EOF
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"403", b"200"]
    assert reply.index(b"ok /v1/a") < reply.index(b"Access denied") < reply.index(b"ok /v1/c")
    assert [p for _, p in upstream.requests] == ["/v1/a", "/v1/c"]


def test_post_body_streams_through(firewall):
    conn = http.client.HTTPConnection(*firewall.address, timeout=10)
    body = b"z" * (5 << 20)
    conn.request("POST", "/echo", body=body)
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, f"POST /echo {len(body)} -".encode())


def test_header_mismatch_replace_rewrites_the_forwarded_header(firewall):
    conn = http.client.HTTPConnection(*firewall.address, timeout=5)
    conn.request("PUT", "/echo", body=b"x", headers={"X-Fleet": "rebel"})
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"PUT /echo 1 imperial")


def test_large_download_through_the_proxy(firewall):
    conn = http.client.HTTPConnection(*firewall.address, timeout=30)
    conn.request("GET", "/big?mb=64")
    r = conn.getresponse()
    total = 0
    while chunk := r.read(1 << 20):
        assert set(chunk) == {ord("x")}
        total += len(chunk)
    assert (r.status, total) == (200, 64 << 20)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    ],
    ids=["cl-and-te", "differing-cl", "obs-fold", "space-before-colon"],
)
def test_ambiguous_framing_is_rejected_with_400_and_never_forwarded(
    firewall, upstream, request_bytes
):
    reply = raw_exchange(firewall, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert upstream.requests == []


def test_oversized_header_section_gets_431(firewall, upstream):
    reply = raw_exchange(
        firewall, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (128 << 10) + b"\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert upstream.requests == []


def test_incomplete_request_head_gets_408_and_a_close_after_the_header_timeout(firewall):
    reply = raw_exchange(firewall, b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n", expect_close=True)
    # closed by the proxy (header timeout is 1 s here), not by our 5 s timeout
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close\r\n" in reply


def test_websocket_upgrade_is_tunnelled_after_an_allowed_request(firewall):
    import asyncio

    import aiohttp

    async def talk():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://{firewall.host}:{firewall.port}/ws") as ws:
                await ws.send_str("hello")
                msg = await ws.receive(timeout=5)
                return msg.data

    assert asyncio.run(talk()) == "echo:hello"


def test_policy_reload_applies_to_the_next_request_and_a_bad_file_keeps_the_last_good(
    firewall, upstream
):
    conn = http.client.HTTPConnection(*firewall.address, timeout=5)
    conn.request("DELETE", "/v1/ships")
    r = conn.getresponse()
    assert (r.status, r.read()) == (403, b"Access denied")

    firewall.replace_policy(
        POLICY.replace("PORT", str(upstream.port)).replace(
            '{method: GET, path: "/v1/.*"}', '{path: "/v1/.*"}'
        )
    )
    deadline = time.monotonic() + 10
    while True:  # the firewall polls its policy files
        conn.request("DELETE", "/v1/ships")
        r = conn.getresponse()
        status = (r.status, r.read())
        if status[0] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == (200, b"ok /v1/ships")  # same connection, new policy

    firewall.replace_policy(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: api}\nspec: "
        "{endpointSelector: {}, ingres: []}\n"
    )
    deadline = time.monotonic() + 10
    while "policy rejected" not in firewall.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"{firewall.policy}: spec.ingres: unknown field" in firewall.stderr_text()
    conn.request("DELETE", "/v1/ships")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"ok /v1/ships")  # the last good policy is still in force


def test_clients_outside_the_allowed_peers_are_dropped_at_l4(upstream):
    world_only = POLICY.replace("fromEntities: [host]", "fromCIDR: [192.0.2.0/24]")
    with running_firewall(
        world_only.replace("PORT", str(upstream.port)), ("127.0.0.1", upstream.port), {"app": "api"}
    ) as fw:
        with socket.create_connection(fw.address, timeout=5) as s:
            s.sendall(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        drops = fw.flows(wait_for=1)
        assert drops[0]["type"] == "drop" and drops[0]["reason"].startswith("default deny")
    assert upstream.requests == []


def test_refuses_to_start_on_a_bad_policy(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: "
        "{endpointSelector: {matchLabels: {app: [}}}\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "l7proxy",
            "firewall",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--labels",
            "app=x",
            "--policy",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert f"policy rejected: {bad}: line 4" in run.stderr


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_reader_does_not_grow_the_proxy_memory(firewall):
    baseline = _rss_kib(firewall.proc.pid)
    with socket.create_connection(firewall.address, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(b"GET /big?mb=512 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1024)  # the response has started
        time.sleep(3)  # the upstream can send 512 MiB in far less; only backpressure stops it
        grown_mib = (_rss_kib(firewall.proc.pid) - baseline) / 1024
        assert grown_mib < 32, (
            f"proxy RSS grew by {grown_mib:.0f} MiB while the client read nothing"
        )
        got = 0
        s.settimeout(30)
        while got < 8 << 20:  # and the stream still flows once the client reads
            chunk = s.recv(1 << 20)
            assert chunk
            got += len(chunk)


def test_observe_filters_the_flow_log(firewall):
    import json
    import subprocess
    import sys

    conn = http.client.HTTPConnection(*firewall.address, timeout=5)
    for method in ("GET", "DELETE", "GET"):
        conn.request(method, "/v1/x")
        conn.getresponse().read()
    firewall.flows(wait_for=3)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "l7proxy",
            "observe",
            "--file",
            str(firewall.flowlog),
            "--verdict",
            "DENIED",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["verdict"], r["l7"]["method"], r["reply"]["status"]) for r in records] == [
        ("DENIED", "DELETE", 403)
    ]
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "l7proxy",
            "observe",
            "--file",
            str(firewall.flowlog),
            "--protocol",
            "http",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert len(text.splitlines()) == 3 and "DENIED" in text and "DELETE http://" in text


def test_an_upstream_that_never_answers_its_connect_is_given_up_after_the_deadline():
    # A server whose accept queue is full: the kernel drops the proxy's SYNs, so its
    # connect neither succeeds nor fails. The proxy's connect deadline (5 s) ends it.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue
            with running_firewall(
                POLICY.replace("PORT", str(port)), ("127.0.0.1", port), {"app": "api"}
            ) as fw:
                started = time.monotonic()
                reply = raw_exchange(
                    fw, b"GET /v1/ships HTTP/1.1\r\nHost: a\r\n\r\n", expect_close=True,
                    timeout=15,
                )  # fmt: skip
                waited = time.monotonic() - started
                flows = fw.flows(wait_for=1)
    assert reply == b""  # nothing was forwarded, so nothing is answered: closed
    assert 4.5 < waited < 10
    assert [(f["l7"]["path"], f["reply"]) for f in flows] == [
        ("/v1/ships", {"closed": "upstream unreachable: timeout"})
    ]
