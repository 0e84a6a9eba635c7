"""The UI's JSON and event-stream endpoints, against the real app: the firewall and
the UI in this test's event loop, a real aiohttp upstream, real clients through
the firewall, and an aiohttp client reading the UI.

The firewall protects app=deathstar (namespace empire). This host may GET /v1/*
and POST /v1/request-landing; 127.0.0.2 (a CIDR peer) may GET /v1/*; 127.0.0.3 is
denied at L3/L4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from l7proxy.observe.flowlog import FlowLog, read_records
from l7proxy.proxy.firewall import Firewall
from l7proxy.ui.server import LIVE_ROWS, FlowUi
from tests.support import REPO
from tests.support.http_upstream import http_upstream
from tests.ui import POLICY

LABELS = {"app": "deathstar", "io.kubernetes.pod.namespace": "empire"}


class Setup:
    def __init__(self, fw: Firewall, ui: FlowUi, upstream, policy_path, base: str):
        self.fw, self.ui, self.upstream, self.policy_path = fw, ui, upstream, policy_path
        self.base = base
        self.service = f"ep:service:127.0.0.1:{upstream.port}"

    async def send(self, method: str, path: str, source: str = "127.0.0.1") -> int:
        """One request through the firewall from ``source``; waits for its record."""
        before = self.ui.tap.emitted
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            host, port = self.fw.sock.getsockname()[:2]
            async with client.request(method, f"http://{host}:{port}{path}") as response:
                await response.read()
                status = response.status
        await self.until(lambda: self.ui.tap.emitted > before)
        return status

    async def refused(self, source: str) -> None:
        emitted = self.ui.tap.emitted
        host, port = self.fw.sock.getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        writer.write(b"GET /v1/ok HTTP/1.1\r\nHost: deathstar\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        await self.until(lambda: self.ui.tap.emitted > emitted)

    async def until(self, condition, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def get(self, path: str, **params) -> tuple[int, object]:
        async with aiohttp.ClientSession() as client:
            async with client.get(self.base + path, params=params) as response:
                body = await response.text()
                kind = response.headers.get("Content-Type", "")
                return response.status, json.loads(body) if "json" in kind else body


@contextlib.asynccontextmanager
async def firewall_and_ui(tmp_path, *, audit: bool = False):
    with http_upstream() as upstream:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.replace("PORT", str(upstream.port)))
        flowlog = FlowLog(tmp_path / "flows.jsonl")
        fw = Firewall(
            listen=("127.0.0.1", 0),
            upstream=("127.0.0.1", upstream.port),
            labels=LABELS,
            policy_paths=[policy],
            flowlog=flowlog,
            audit=audit,
        )
        await fw.start()
        # A tick of an hour: the test says when the UI takes its records (ui.tick()).
        ui = FlowUi(flowlog, lambda: fw.state, mode="firewall", tick=3600)
        await ui.start("127.0.0.1", 0)
        try:
            yield Setup(fw, ui, upstream, policy, ui.url.rstrip("/"))
        finally:
            await ui.close()
            await fw.close()
            flowlog.close()


@pytest.fixture
async def setup(tmp_path):
    async with firewall_and_ui(tmp_path) as s:
        yield s


async def workload(s: Setup) -> None:
    for _ in range(3):
        assert await s.send("GET", "/v1/ok") == 200
    for _ in range(2):
        assert await s.send("PUT", "/v1/exhaust-port") == 403
    for n in range(2):
        assert await s.send("GET", f"/v1/charts?page={n}", "127.0.0.2") == 200
    assert await s.send("POST", "/v1/request-landing", "127.0.0.2") == 403
    await s.refused("127.0.0.3")


async def test_the_map_counts_each_edge_by_verdict_with_its_l7_summary(setup):
    s = setup
    await workload(s)
    s.ui.tick()
    status, snapshot = await s.get("/api/map")
    assert status == 200
    assert {n["id"]: (n["kind"], n["group"]) for n in snapshot["nodes"]} == {
        "host": ("host", "node"),
        "cidr:127.0.0.2/32": ("cidr", "outside"),
        "cidr:127.0.0.3/32": ("cidr", "outside"),
        s.service: ("endpoint", "ns:empire"),
    }
    edges = {e["id"]: e for e in snapshot["edges"]}
    assert {k: e["verdicts"] for k, e in edges.items()} == {
        f"host->{s.service}": {"FORWARDED": 3, "DENIED": 2},
        f"cidr:127.0.0.2/32->{s.service}": {"FORWARDED": 2, "DENIED": 1},
        f"cidr:127.0.0.3/32->{s.service}": {"DROPPED": 1},
    }
    # The L7 summary leaves the query out: two pages of /v1/charts are one entry.
    assert [
        (x["key"], x["count"], x["verdicts"])
        for x in edges[f"cidr:127.0.0.2/32->{s.service}"]["l7"]
    ] == [
        ("GET /v1/charts", 2, {"FORWARDED": 2}),
        ("POST /v1/request-landing", 1, {"DENIED": 1}),
    ]
    assert edges[f"cidr:127.0.0.3/32->{s.service}"]["protocols"] == {"tcp": 1}
    assert edges[f"cidr:127.0.0.3/32->{s.service}"]["l7"] == []
    assert snapshot["flows"] == 9 and snapshot["records_missed"] == 0


async def test_the_flow_table_filters_and_pages_back_through_the_log(setup):
    s = setup
    await workload(s)
    for n in range(20):  # more history: 20 forwarded, 10 denied
        assert await s.send("GET", f"/v1/ok?n={n}") == 200
        if n % 2:
            assert await s.send("PUT", f"/v1/exhaust-port?n={n}") == 403
    s.fw.proxy.flowlog.flush()
    on_disk = list(read_records(s.fw.proxy.flowlog.path))
    denied = [r for r in reversed(on_disk) if r["verdict"] == "DENIED"]
    assert len(denied) == 13

    seen, cursor, pages = [], None, 0
    while True:
        params = {"verdict": "DENIED", "limit": "4", **({"before": cursor} if cursor else {})}
        status, page = await s.get("/api/flows", **params)
        assert status == 200
        assert len(page["flows"]) <= 4
        seen += page["flows"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages >= 4
    # Newest first, every denied request once, as the log holds them.
    assert [(r["time"], r["summary"]) for r in seen] == [
        (r["time"], f"{r['l7']['method']} {r['l7']['host']}{r['l7']['path']}") for r in denied
    ]
    assert {r["policy"] for r in seen} == {"deathstar-api"}

    _, page = await s.get("/api/flows", protocol="tcp")
    assert [(r["verdict"], r["source_node"]) for r in page["flows"]] == [
        ("DROPPED", "cidr:127.0.0.3/32")
    ]
    _, page = await s.get("/api/flows", endpoint="127.0.0.2")
    assert [r["summary"].split("/", 1)[1] for r in page["flows"]] == [
        "v1/request-landing",
        "v1/charts?page=1",
        "v1/charts?page=0",
    ]
    _, page = await s.get("/api/flows", source="cidr:127.0.0.2/32", verdict="FORWARDED")
    assert len(page["flows"]) == 2
    # A time window: only the workload's first five requests.
    first, fifth = on_disk[0]["time"], on_disk[4]["time"]
    _, page = await s.get("/api/flows", since=str(first), until=str(fifth))
    assert [r["time"] for r in page["flows"]] == [r["time"] for r in reversed(on_disk[:5])]
    assert page["next"] is None


async def test_bad_filters_and_cursors_are_refused_with_the_reason(setup):
    s = setup
    status, body = await s.get("/api/flows", verdict="MAYBE")
    assert (status, body.split(" (")[0]) == (400, "unknown verdict 'MAYBE'")
    status, body = await s.get("/api/flows", since="yesterday")
    assert (status, body) == (400, "since='yesterday': expected Unix seconds\n")
    status, body = await s.get("/api/flows", before="not-a-cursor")
    assert status == 400 and "not a flow-log position" in body
    status, body = await s.get("/api/flows/0.0.0")
    assert status == 404


async def test_a_flows_decision_is_its_policy_trace(setup):
    s = setup
    await workload(s)
    _, page = await s.get("/api/flows", verdict="DENIED", endpoint="127.0.0.2")
    (flow,) = page["flows"]
    status, detail = await s.get(f"/api/flows/{flow['id']}")
    assert status == 200
    assert detail["record"]["l7"]["path"] == "/v1/request-landing"
    explained = detail["explain"]
    assert explained["recorded"] == {
        "verdict": "DENIED",
        "policy": "deathstar-api",
        "rule": "",
        "reason": "no L7 rule matches",
    }
    # The same question asked of the shipped command line gives the same verdict,
    # from the same rules.
    command = explained["trace"]["command"]
    assert command.startswith("l7proxy policy trace --from 127.0.0.2 --to ")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            *command.split()[:1],
            *_args(command),
            "--policy",
            str(s.policy_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert cli.returncode == 1, cli.stderr  # denied
    ui_lines = explained["trace"]["text"].splitlines()
    cli_lines = cli.stdout.splitlines()
    assert (
        ui_lines[-1]
        == cli_lines[-1]
        == ("verdict: DENIED by policy deathstar-api (no L7 rule matches)")
    )
    rule_lines = [line.strip() for line in ui_lines if "spec.ingress" in line]
    assert rule_lines == [line.strip() for line in cli_lines if "spec.ingress" in line]

    # A kernel-style L3/L4 drop is traced at L3/L4.
    _, page = await s.get("/api/flows", verdict="DROPPED")
    _, detail = await s.get(f"/api/flows/{page['flows'][0]['id']}")
    assert detail["explain"]["trace"]["text"].splitlines()[-1] == (
        "verdict: DROPPED (L3/L4: denied by deathstar-api spec.ingressDeny[0])"
    )


async def test_a_decision_says_when_the_policy_changed_since_the_flow(setup):
    s = setup
    assert await s.send("PUT", "/v1/exhaust-port") == 403
    s.policy_path.write_text(
        s.policy_path.read_text().replace(
            "- {method: POST, path: /v1/request-landing}",
            "- {method: POST, path: /v1/request-landing}\n        - {method: PUT}",
        )
    )
    assert s.fw.source.poll()
    _, page = await s.get("/api/flows")
    _, detail = await s.get(f"/api/flows/{page['flows'][0]['id']}")
    assert detail["explain"]["recorded"]["verdict"] == "DENIED"
    assert detail["explain"]["trace"]["verdict"]["verdict"] == "FORWARDED"
    assert (
        "the policy in force now (revision 2) says FORWARDED, not DENIED: it has changed since"
        in detail["explain"]["notes"]
    )


async def test_audit_mode_flows_are_their_own_colour_and_say_what_would_have_happened(tmp_path):
    async with firewall_and_ui(tmp_path, audit=True) as s:
        assert await s.send("PUT", "/v1/exhaust-port") == 200  # let through, logged
        assert await s.send("GET", "/v1/ok") == 200
        s.ui.tick()
        _, snapshot = await s.get("/api/map")
        (edge,) = snapshot["edges"]
        assert edge["verdicts"] == {"AUDIT": 1, "FORWARDED": 1}
        assert [(x["key"], x["verdicts"]) for x in edge["l7"]] == [
            ("GET /v1/ok", {"FORWARDED": 1}),
            ("PUT /v1/exhaust-port", {"AUDIT": 1}),
        ]
        _, page = await s.get("/api/flows", verdict="AUDIT")
        (flow,) = page["flows"]
        _, detail = await s.get(f"/api/flows/{flow['id']}")
        text = detail["explain"]["trace"]["text"].splitlines()
        assert text[-2:] == [
            "verdict: AUDIT by policy deathstar-api (no L7 rule matches)",
            "         audit mode: policy would deny this, but it is allowed and logged as AUDIT",
        ]


def _args(command: str) -> list[str]:
    import shlex

    # "l7proxy policy trace ..." -> ["policy", "trace", ...] for python -m l7proxy
    return shlex.split(command)[1:]


async def test_the_event_stream_sends_a_bounded_batch_per_tick_not_every_record(setup):
    """3 ticks' worth of records, far more than a stream is sent per tick: the
    stream gets one map and at most LIVE_ROWS rows per tick, and counts the rest."""
    s = setup
    flowlog = s.fw.proxy.flowlog
    async with aiohttp.ClientSession() as client:
        async with client.get(s.base + "/api/events", params={"verdict": "DENIED"}) as events:
            assert events.headers["Content-Type"] == "text/event-stream"
            first = await _read_events(events, until="stats")
            assert [name for name, _ in first] == ["map", "stats"]
            for tick in range(3):
                for n in range(400):  # records as the proxy writes them
                    denied = n % 4 == 0
                    flowlog.emit(
                        {
                            "time": time.time(),
                            "type": "l7",
                            "protocol": "http",
                            "verdict": "DENIED" if denied else "FORWARDED",
                            "source": {"ip": "127.0.0.1", "port": 40000 + n, "identity": 1},
                            "destination": {"ip": "127.0.0.1", "port": 80, "identity": 256},
                            "l7": {"method": "GET", "path": f"/item/{tick}/{n}", "host": "x"},
                        }
                    )
                s.ui.tick()
                batch = await _read_events(events, until="stats")
                names = [name for name, _ in batch]
                assert names == ["map", "flows", "stats"]
                flows = dict(batch)["flows"]
                assert flows["matched"] == 100
                assert len(flows["rows"]) == min(100, LIVE_ROWS)
                assert {r["verdict"] for r in flows["rows"]} == {"DENIED"}
                assert flows["rows"][0]["summary"] == f"GET x/item/{tick}/396"  # newest first
                edge = dict(batch)["map"]["edges"][0]
                assert len(edge["l7"]) == s.ui.map.max_l7  # 400 distinct paths, bounded
            # A tick with nothing new sends the stats only.
            s.ui.tick()
            assert [name for name, _ in await _read_events(events, until="stats")] == ["stats"]


async def _read_events(response, until: str) -> list[tuple[str, dict]]:
    events, name = [], None
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
            if name == until:
                return events


async def test_it_answers_only_loopback_names(setup):
    s = setup
    async with aiohttp.ClientSession() as client:
        async with client.get(s.base + "/api/info", headers={"Host": "attacker.example"}) as r:
            assert r.status == 421
        async with client.get(s.base + "/") as r:
            assert r.status == 200
            assert r.headers["Content-Security-Policy"] == "default-src 'self'"
            assert '<script src="/static/ui.js"' in await r.text()
        async with client.get(s.base + "/static/ui.js") as r:
            assert r.status == 200 and "EventSource" in await r.text()


async def test_the_map_starts_from_the_logs_tail_and_counts_nothing_twice(tmp_path):
    flowlog = FlowLog(tmp_path / "flows.jsonl")
    old = {
        "type": "drop",
        "protocol": "tcp",
        "verdict": "DROPPED",
        "source": {"ip": "10.0.0.9", "port": 5, "identity": 2},
        "destination": {"ip": "10.0.0.1", "port": 80, "endpoint": "db", "labels": {}},
    }
    for n in range(30):
        flowlog.emit({**old, "time": 1000.0 + n})
    ui = FlowUi(flowlog, lambda: None, mode="agent", tick=3600, seed_records=25)
    await ui.start("127.0.0.1", 0)
    try:
        flowlog.emit({**old, "time": 2000.0, "verdict": "AUDIT"})  # after the start: live
        for _ in range(100):
            if ui._seeding is None and ui._seeder is not None and ui._seeder.done():
                break
            await asyncio.sleep(0.02)
            ui.tick()
        ui.tick()
        (edge,) = ui.map.snapshot()["edges"]
        assert edge["id"] == "world->ep:db"
        assert edge["verdicts"] == {"DROPPED": 25, "AUDIT": 1}
    finally:
        await ui.close()
        flowlog.close()


async def test_without_a_flow_log_file_history_is_what_the_ui_kept(tmp_path):
    flowlog = FlowLog(None)
    ui = FlowUi(flowlog, lambda: None, mode="firewall", tick=3600)
    await ui.start("127.0.0.1", 0)
    try:
        for n in range(7):
            flowlog.emit(
                {
                    "time": float(n),
                    "type": "limit",
                    "verdict": "DROPPED",
                    "limit": "header_timeout",
                    "reason": f"no complete head in {n} s",
                }
            )
        ui.tick()
        base = ui.url.rstrip("/")
        async with aiohttp.ClientSession() as client:
            async with client.get(base + "/api/flows", params={"limit": "3"}) as r:
                page = await r.json()
            assert [row["reason"] for row in page["flows"]] == [
                f"no complete head in {n} s" for n in (6, 5, 4)
            ]
            async with client.get(base + "/api/flows", params={"before": page["next"]}) as r:
                rest = await r.json()
            assert [row["reason"] for row in rest["flows"]] == [
                f"no complete head in {n} s" for n in (3, 2, 1, 0)
            ]
            assert rest["next"] is None
            async with client.get(f"{base}/api/flows/{page['flows'][0]['id']}") as r:
                detail = await r.json()
            assert detail["explain"]["notes"] == [
                "cut by the proxy's limit header_timeout (no complete head in 6 s): "
                "no policy decided this flow"
            ]
    finally:
        await ui.close()
