"""Metrics and readiness of a real ``l7proxy firewall --metrics`` subprocess.

A real aiohttp server behind the firewall, a real aiohttp client in front;
the counts scraped from ``/metrics`` must be exactly the traffic sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from aiohttp import web
from h2.config import H2Configuration
from h2.connection import H2Connection
from prometheus_client.parser import text_string_to_metric_families

from tests.support.firewall import running_firewall

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api-read}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: "/v1/.*"}}
"""

# Only an office range may connect: loopback (identity host) is dropped at L3/L4.
OFFICE_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: office-only}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromCIDR: [192.0.2.0/24]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
"""

SLOW = 0.25  # seconds the upstream waits before answering /v1/slow


# --------------------------------------------------------------------------- helpers


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(url: str, expected: dict[tuple, float], timeout: float = 10.0) -> dict:
    """Scrape until every (name, labels) in ``expected`` has its value; return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        wrong = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
        if not wrong or time.monotonic() > deadline:
            assert not wrong, f"metrics (got, want): {wrong}"
            return samples
        time.sleep(0.05)


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def healthz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def upstream_server():
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/v1/slow":
            await asyncio.sleep(SLOW)
        if request.path.startswith("/v1/missing"):
            return web.Response(status=404, text="no such item")
        return web.Response(text=f"item {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[:2]


def metrics_url(fw) -> str:
    line = fw.proc.stdout.readline().strip()
    assert line.startswith("l7proxy metrics on http://"), line
    return line.rsplit(" ", 1)[-1]


# --------------------------------------------------------------------------- tests


async def test_firewall_metrics_count_exactly_the_traffic_sent():
    runner, upstream = await upstream_server()
    try:
        with running_firewall(
            POLICY.format(port=upstream[1]),
            upstream,
            {"app": "api"},
            extra_args=["--metrics", "127.0.0.1:0"],
        ) as fw:
            url = metrics_url(fw)
            base = f"http://{fw.host}:{fw.port}"
            # Nothing yet: the levels are there, the flow counters are not.
            samples = await asyncio.to_thread(scrape, url)
            assert value(samples, "cilium_policy") == 1
            assert value(samples, "cilium_policy_max_revision") == 1
            assert (
                value(samples, "cilium_proxy_redirects", protocol="http") == 1
            )  # host -> the one port
            assert value(samples, "l7proxy_healthy") == 1
            assert value(samples, "l7proxy_proxy_connections_total") == 0
            assert (
                value(
                    samples,
                    "hubble_flows_processed_total",
                    type="L7",
                    verdict="FORWARDED",
                    protocol="http",
                )
                is None
            )

            statuses = []
            # One connection per request, so connection counts are exact too.
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as session:
                plan = (
                    [("GET", "/v1/items/1")] * 3
                    + [("GET", "/v1/slow")] * 2
                    + [("GET", "/v1/missing/1")] * 2
                    + [("DELETE", "/v1/items/1")] * 2
                    + [("POST", "/v1/items")]
                )
                for method, path in plan:
                    async with session.request(method, base + path) as resp:
                        await resp.read()
                        statuses.append(resp.status)
            assert statuses == [200] * 5 + [404] * 2 + [403] * 3

            samples = await asyncio.to_thread(
                wait_for,
                url,
                {
                    key(
                        "hubble_flows_processed_total",
                        type="L7",
                        verdict="FORWARDED",
                        protocol="http",
                    ): 7,
                    key(
                        "hubble_flows_processed_total", type="L7", verdict="DENIED", protocol="http"
                    ): 3,
                    key("cilium_policy_l7_total", rule="received", proxy_type="http"): 10,
                    key("cilium_policy_l7_total", rule="forwarded", proxy_type="http"): 7,
                    key("cilium_policy_l7_total", rule="denied", proxy_type="http"): 3,
                    key("cilium_proxy_upstream_reply_seconds_count", protocol="http"): 7,
                    key("l7proxy_proxy_connections_total"): 10,
                    key("l7proxy_proxy_connections_active"): 0,
                    key("l7proxy_proxy_connections_refused_total"): 0,
                },
            )
            # The two slow requests waited at least SLOW each at the upstream.
            assert (
                value(samples, "cilium_proxy_upstream_reply_seconds_sum", protocol="http")
                >= 2 * SLOW
            )
            assert (
                value(
                    samples, "cilium_proxy_upstream_reply_seconds_bucket", protocol="http", le="0.1"
                )
                <= 5
            )
            assert (
                value(
                    samples,
                    "cilium_proxy_upstream_reply_seconds_bucket",
                    protocol="http",
                    le="+Inf",
                )
                == 7
            )
            # The flow log and the metrics agree, record for record.
            flows = fw.flows(wait_for=10)
            assert sorted(f["verdict"] for f in flows) == ["DENIED"] * 3 + ["FORWARDED"] * 7

            # A request that is not HTTP: a parse error, counted by protocol and side.
            def garbage():
                with socket.create_connection((fw.host, fw.port), timeout=5) as s:
                    s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                    s.recv(4096)  # the proxy answers 400 and closes

            await asyncio.to_thread(garbage)
            await asyncio.to_thread(
                wait_for,
                url,
                {
                    key("l7proxy_proxy_parse_errors_total", protocol="http", side="client"): 1,
                    key("cilium_policy_l7_total", rule="parse_errors", proxy_type="http"): 1,
                    key("l7proxy_proxy_connections_total"): 11,
                },
            )

            # An HTTP/2 PING flood: GOAWAY, and the limit it broke, counted by name.
            def ping_flood():
                conn = H2Connection(H2Configuration(client_side=True))
                conn.initiate_connection()
                for n in range(200):
                    conn.ping(n.to_bytes(8, "big"))
                with socket.create_connection((fw.host, fw.port), timeout=5) as s:
                    s.sendall(conn.data_to_send())
                    while s.recv(65536):  # until the proxy closes
                        pass

            await asyncio.to_thread(ping_flood)
            await asyncio.to_thread(
                wait_for,
                url,
                {
                    key(
                        "l7proxy_proxy_limit_exceeded_total",
                        protocol="http",
                        limit="max_ping_frames",
                    ): 1,
                    key("l7proxy_proxy_parse_errors_total", protocol="http", side="client"): 2,
                },
            )

            status, body = await asyncio.to_thread(healthz, url.replace("/metrics", "/healthz"))
            assert (
                status == 200
                and body["healthy"] is True
                and body["policy_revision"] == 1
                and body["mode"] == "firewall"
            )
    finally:
        await runner.cleanup()


async def test_l3_l4_drops_policy_changes_and_readiness():
    runner, upstream = await upstream_server()
    try:
        with running_firewall(
            POLICY.format(port=upstream[1]),
            upstream,
            {"app": "api"},
            extra_args=["--metrics", "127.0.0.1:0"],
        ) as fw:
            url = metrics_url(fw)
            health = url.replace("/metrics", "/healthz")
            base = f"http://{fw.host}:{fw.port}"

            # Loopback is no longer allowed: every connection is refused at L3/L4.
            fw.replace_policy(OFFICE_ONLY.format(port=upstream[1]))
            await asyncio.to_thread(
                wait_for,
                url,
                {
                    key("cilium_policy_max_revision"): 2,
                    key("cilium_policy_change_total", outcome="success"): 2,
                },
            )

            def refused_request() -> bytes:
                # A raw socket: an HTTP client library might retry a dropped GET.
                with socket.create_connection((fw.host, fw.port), timeout=5) as s:
                    try:
                        s.sendall(b"GET /v1/items/1 HTTP/1.1\r\nHost: api\r\n\r\n")
                        return s.recv(4096)
                    except ConnectionError:
                        return b""

            for _ in range(4):
                assert (
                    await asyncio.to_thread(refused_request) == b""
                )  # no answer: the connection is dropped
            samples = await asyncio.to_thread(
                wait_for,
                url,
                {
                    key("cilium_drop_count_total", reason="default-deny", direction="INGRESS"): 4,
                    key(
                        "hubble_flows_processed_total",
                        type="L3_L4",
                        verdict="DROPPED",
                        protocol="tcp",
                    ): 4,
                    key("l7proxy_proxy_connections_refused_total"): 4,
                    key("l7proxy_proxy_connections_total"): 0,
                },
            )
            assert (
                value(samples, "cilium_proxy_redirects", protocol="http") is None
            )  # no L7 rules any more

            # A broken policy is rejected: the last good one stays, readiness says why.
            fw.replace_policy(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: "
                "broken}\nspec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: "
                "'eighty'}]}]}]}\n"
            )
            await asyncio.to_thread(
                wait_for,
                url,
                {
                    key("cilium_policy_import_errors_total"): 1,
                    key("cilium_policy_change_total", outcome="failure"): 1,
                    key("cilium_policy_max_revision"): 2,
                    key("l7proxy_healthy"): 0,
                },
            )
            status, body = await asyncio.to_thread(healthz, health)
            assert status == 503 and body["healthy"] is False and "eighty" in body["policy_error"]

            fw.replace_policy(POLICY.format(port=upstream[1]))
            await asyncio.to_thread(
                wait_for, url, {key("cilium_policy_max_revision"): 3, key("l7proxy_healthy"): 1}
            )
            status, body = await asyncio.to_thread(healthz, health)
            assert status == 200 and body["healthy"] is True and body["policy_error"] is None
            async with (
                aiohttp.ClientSession() as session,
                session.get(base + "/v1/items/1") as resp,
            ):
                assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_audit_mode_counts_audit_verdicts_as_forwarded():
    runner, upstream = await upstream_server()
    try:
        args = ["--metrics", "127.0.0.1:0", "--audit"]
        with running_firewall(
            POLICY.format(port=upstream[1]), upstream, {"app": "api"}, extra_args=args
        ) as fw:
            url = metrics_url(fw)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as session:
                for method in ("GET", "DELETE", "DELETE"):
                    async with session.request(
                        method, f"http://{fw.host}:{fw.port}/v1/items/1"
                    ) as resp:
                        assert resp.status == 200  # audit: would-denies are let through
            await asyncio.to_thread(
                wait_for,
                url,
                {
                    key(
                        "hubble_flows_processed_total",
                        type="L7",
                        verdict="FORWARDED",
                        protocol="http",
                    ): 1,
                    key(
                        "hubble_flows_processed_total", type="L7", verdict="AUDIT", protocol="http"
                    ): 2,
                    key("cilium_policy_l7_total", rule="forwarded", proxy_type="http"): 3,
                    key("cilium_proxy_upstream_reply_seconds_count", protocol="http"): 3,
                },
            )
            samples = await asyncio.to_thread(scrape, url)
            assert (
                value(samples, "cilium_policy_l7_total", rule="denied", proxy_type="http") is None
            )
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- agent mode


DEATHSTAR_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""


@pytest.mark.root
def test_agent_metrics_with_the_kernel_datapath():
    from tests.support.node import running_node

    ships = {
        "deathstar": {"org": "empire", "class": "deathstar"},
        "tiefighter": {"org": "empire", "class": "tiefighter"},
        "xwing": {"org": "alliance", "class": "xwing"},
    }
    with running_node(ships, start_agent=False) as node:
        node.serve_http("deathstar", 80)
        node.start_agent("--metrics", "127.0.0.1:0")
        line = next(
            x
            for x in (node.root / "agent.log").read_text().splitlines()
            if x.startswith("l7proxy metrics on ")
        )
        url = line.rsplit(" ", 1)[-1]
        node.import_policy(DEATHSTAR_L7)

        assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200
        assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
        assert (
            node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status
            is None
        )

        samples = wait_for(
            url,
            {
                key(
                    "hubble_flows_processed_total", type="L7", verdict="FORWARDED", protocol="http"
                ): 1,
                key(
                    "hubble_flows_processed_total", type="L7", verdict="DENIED", protocol="http"
                ): 1,
                key("cilium_policy_l7_total", rule="received", proxy_type="http"): 2,
                key("cilium_proxy_upstream_reply_seconds_count", protocol="http"): 1,
                key("l7proxy_proxy_connections_total"): 2,
                key("cilium_endpoint"): 3,
                key("cilium_policy"): 1,
                # deathstar's ingress from both empire identities (tiefighter, deathstar) on port 80
                key("cilium_proxy_redirects", protocol="http"): 2,
            },
        )
        # Every packet the kernel dropped for the X-wing was reported as an event
        # with its reason and direction: the two views agree.
        deadline = time.monotonic() + 10
        while True:
            samples = scrape(url)
            events = value(
                samples, "cilium_drop_count_total", reason="default-deny", direction="INGRESS"
            )
            counted = value(samples, "l7proxy_datapath_packets_total", counter="denied")
            if (events and events == counted) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert events is not None and events >= 1 and events == counted
        assert value(samples, "cilium_forward_count_total") > 0
        assert 0 < value(samples, "cilium_bpf_map_pressure", map_name="policy") < 1
        status, body = healthz(url.replace("/metrics", "/healthz"))
        assert status == 200 and body["healthy"] is True and body["mode"] == "agent"
