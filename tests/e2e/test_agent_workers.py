"""``l7proxy run --workers 2``: the agent's proxy in two processes, on a real node.

Endpoints in namespaces, the real agent with two proxy workers, curl-like
clients in the namespaces. The kernel redirects flows to one member of each
parser family's reuseport group and spreads them over the group; the flow
log's ``worker`` field says which worker judged each request.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import pytest

from tests.e2e.test_agent_e2e import OPEN_L7, RULE1_L7, SHIPS
from tests.e2e.test_restart import _successor, drain_report, spawn_load
from tests.proxy.test_workers import scrape
from tests.support.node import running_node

pytestmark = pytest.mark.root

EXHAUSTED = "503 Panic: deathstar exploded"

# Runs in a client's namespace: COUNT requests, each on a fresh connection (a new
# source port, so a new hash), all at once in threads; prints one line per
# request: "<status> <body>" or "error <exception>".
FRESH_CLIENT = textwrap.dedent(
    """
    import http.client, sys, threading
    host, method, path, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    out = [None] * count
    def one(i):
        conn = http.client.HTTPConnection(host, 80, timeout=10)
        try:
            conn.request(method, f"{path}/{i}" if path.endswith("/") else path)
            r = conn.getresponse()
            out[i] = f"{r.status} {r.read().decode().strip()}"
        except Exception as exc:
            out[i] = f"error {exc!r}"
        finally:
            conn.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\\n".join(out), flush=True)
    """
)


@pytest.fixture
def node():
    with running_node(SHIPS, start_agent=False) as n:
        n.start_agent("--workers", "2", "--metrics", "127.0.0.1:0")
        n.serve_http("deathstar", 80)
        yield n


def fresh(node, src: str, method: str, path: str, count: int) -> list[str]:
    run = node.run_in(
        src, [sys.executable, "-c", FRESH_CLIENT, node.ip("deathstar"), method, path, str(count)]
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def l7_flows(node, method: str, path_start: str, count: int) -> list[dict]:
    """The L7 records of these requests, once all ``count`` are in the log (each
    worker writes its batch on its own one-second timer)."""
    deadline = time.monotonic() + 10
    while True:
        records = [
            r
            for r in node.flows()
            if r["type"] == "l7"
            and r["l7"]["method"] == method
            and r["l7"]["path"].startswith(path_start)
        ]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def workers_on(node, revision: int) -> dict:
    return node.wait_status(
        lambda s: (
            s
            and s["policy_revision"] >= revision
            and all(w["policy_revision"] == s["policy_revision"] for w in s["workers"]["each"])
            and s["healthy"]
        ),
        what=f"both workers on policy revision {revision}",
    )


def metrics_url(node) -> str:
    for line in (node.root / "agent.log").read_text().splitlines():
        if line.startswith("l7proxy metrics on http://"):
            return line.rsplit(" ", 1)[-1]
    raise AssertionError("the agent did not report its metrics address")


def worker_pids(node) -> set[int]:
    return {w["pid"] for w in node.status()["workers"]["each"]}


def test_redirected_flows_reach_both_workers_and_a_policy_change_reaches_each(node):
    status = node.status()
    assert status["workers"]["count"] == 2 and status["healthy"]
    pids = worker_pids(node)
    assert len(pids) == 2 and node.agent.pid not in pids
    node.import_policy(RULE1_L7)
    revision = workers_on(node, node.status()["policy_revision"])["policy_revision"]

    # Fresh connections from the tiefighter, each redirected by the kernel.
    answers = fresh(node, "tiefighter", "PUT", "/v1/exhaust-port", 40)
    assert answers == ["403 Access denied"] * 40
    denied = l7_flows(node, "PUT", "/v1/exhaust-port", 40)
    assert len(denied) == 40 and {r["verdict"] for r in denied} == {"DENIED"}
    per_worker = {w: sum(r["worker"] == w for r in denied) for w in (0, 1)}
    print("denied PUTs per worker:", per_worker)
    assert per_worker[0] > 0 and per_worker[1] > 0
    # Identities came with the policy: each worker names both sides.
    assert {r["source"]["endpoint"] for r in denied} == {"tiefighter"}
    assert {r["destination"]["endpoint"] for r in denied} == {"deathstar"}
    assert {tuple(sorted(r["source"]["labels"].items())) for r in denied} == {
        (("class", "tiefighter"), ("org", "empire"))
    }

    # /metrics at the agent: both workers' L7 flows summed, the agent's own series
    # (policy, endpoints, datapath) counted once.
    samples = scrape(metrics_url(node))
    flows = "hubble_flows_processed_total"
    denied_http = frozenset({("type", "L7"), ("verdict", "DENIED"), ("protocol", "http")})
    assert samples[(flows, denied_http)] == 40
    assert samples[("l7proxy_proxy_connections_total", frozenset())] == 40
    assert samples[("cilium_policy", frozenset())] == 1
    assert samples[("cilium_endpoint", frozenset())] == len(SHIPS)
    assert samples[("l7proxy_workers_serving", frozenset())] == 2
    assert samples[("l7proxy_healthy", frozenset())] == 1

    shown = node.cli("status").stdout
    assert "workers (2, 0 restarts):" in shown
    for w in status["workers"]["each"]:
        assert f"worker {w['worker']}  pid {w['pid']}  serving  policy revision" in shown

    # A policy change: the agent compiles it once and both workers apply it.
    node.import_policy(OPEN_L7, "open")
    after = workers_on(node, revision + 1)
    assert {w["policy_revision"] for w in after["workers"]["each"]} == {after["policy_revision"]}
    answers = fresh(node, "tiefighter", "PUT", "/v1/exhaust-port", 40)
    assert set(answers) == {EXHAUSTED}
    allowed = [r for r in l7_flows(node, "PUT", "/v1/exhaust-port", 80) if r["verdict"] != "DENIED"]
    assert len(allowed) == 40 and {r["verdict"] for r in allowed} == {"FORWARDED"}
    assert {r["worker"] for r in allowed} == {0, 1}
    # The kernel still drops what no rule lets in at L3/L4.
    assert node.curl("xwing", "PUT", "deathstar", "/v1/exhaust-port", timeout=1.5).status is None
    assert worker_pids(node) == pids  # nobody was restarted for it


def test_a_killed_worker_is_restarted_on_its_sockets_and_no_new_connection_is_lost(node):
    node.import_policy(RULE1_L7)
    assert fresh(node, "tiefighter", "PUT", "/v1/exhaust-port", 10) == ["403 Access denied"] * 10
    before = node.wait_status(
        lambda s: s and s["proxy"]["connections_total"] == 10, what="both workers' counts"
    )["workers"]["each"]
    victim = before[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    # Right away, while worker 1 is dead or starting: connections the kernel
    # hashes to its socket wait in its accept queue, then the new worker serves them.
    answers = fresh(node, "tiefighter", "POST", "/v1/request-landing", 40)
    assert answers == [f"200 Ship landed (seen from {node.ip('tiefighter')})"] * 40
    records = l7_flows(node, "POST", "/v1/request-landing", 40)
    assert {r["worker"] for r in records} == {0, 1}
    status = node.wait_status(
        lambda s: s and s["workers"]["restarts"] == 1 and s["healthy"],
        what="worker 1 restarted and healthy",
    )
    # What the killed worker had counted stays in the totals.
    status = node.wait_status(
        lambda s: s and s["proxy"]["connections_total"] == 50, what="the totals after the restart"
    )
    each = status["workers"]["each"]
    assert each[0]["pid"] == before[0]["pid"] and each[1]["pid"] not in (victim, None)
    # The new worker got the policy in force before it listened.
    assert each[1]["policy_revision"] == status["policy_revision"]
    assert f"worker 1 (pid {victim}) killed by SIGKILL" in (node.root / "agent.log").read_text()


def test_takeover_with_workers_under_load_fails_no_request(node):
    node.import_policy(RULE1_L7)
    old = node.agent
    old_workers = worker_pids(node)
    stop_file = node.root / "stop-load"
    load = spawn_load(node, stop_file)
    try:
        time.sleep(1.0)  # load against the old agent's workers alone
        new = _successor(node, "--workers", "2", "--drain-timeout", "3")
        after = node.wait_status(
            lambda s: s and s["pid"] == new.pid and s["healthy"], what="the successor's status"
        )
        new_workers = {w["pid"] for w in after["workers"]["each"]}
        assert len(new_workers) == 2 and new_workers.isdisjoint(old_workers)
        assert old.wait(timeout=30) == 0
        # Every old worker drained and left.
        for pid in old_workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        time.sleep(1.0)  # load against the successor's workers alone
        assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
    finally:
        stop_file.touch()
        load.wait(timeout=30)

    summary = json.loads((node.root / "load.log").read_text().splitlines()[-1])
    print("load during takeover:", summary)
    assert summary["failures"] == []
    assert summary["fresh_ok"] > 20 and summary["fresh_denied"] > 20
    drain = drain_report(node)
    print("old agent's drain (both workers):", drain)
    assert drain["cut"] == 0
    # Both generations wrote the one flow log; the successor's records carry workers too.
    served = l7_flows(node, "POST", "/v1/request-landing", 1)
    assert {r["worker"] for r in served} == {0, 1}


def test_takeovers_from_one_process_to_two_workers_and_back_fail_no_request():
    with running_node(SHIPS) as node:  # a single-process agent, as before workers
        node.serve_http("deathstar", 80)
        node.import_policy(RULE1_L7)
        stop_file = node.root / "stop-load"
        load = spawn_load(node, stop_file)
        try:
            time.sleep(1.0)
            # One listener per family -> two workers: the successor adds a second
            # member to each inherited socket's reuseport group.
            first = node.agent
            two = _successor(node, "--workers", "2", "--drain-timeout", "2")
            status = node.wait_status(
                lambda s: s and s["pid"] == two.pid and s["healthy"], what="two workers"
            )
            assert status["workers"]["count"] == 2
            assert first.wait(timeout=30) == 0
            time.sleep(1.0)
            # Two sockets per family -> one process: it accepts on both.
            one = _successor(node, "--drain-timeout", "2")
            status = node.wait_status(
                lambda s: s and s["pid"] == one.pid and s["healthy"], what="one process again"
            )
            assert status["workers"] is None
            assert two.wait(timeout=30) == 0
            time.sleep(1.0)
            landed = fresh(node, "tiefighter", "POST", "/v1/request-landing", 20)
            assert landed == [f"200 Ship landed (seen from {node.ip('tiefighter')})"] * 20
        finally:
            stop_file.touch()
            load.wait(timeout=30)
        summary = json.loads((node.root / "load.log").read_text().splitlines()[-1])
        print("load during both takeovers:", summary)
        assert summary["failures"] == []
        assert summary["fresh_ok"] > 20 and summary["fresh_denied"] > 20


def test_an_agent_never_joins_a_reuseport_group_another_process_listens_in():
    """The agent's listeners are SO_REUSEPORT (so a successor can add workers); a
    stranger's reuseport listener on its proxy port must make it refuse to start,
    not share the port with it."""
    from l7proxy.proxy.server import make_listener

    with running_node(SHIPS, start_agent=False) as node:
        stranger = make_listener("127.0.0.1", 0, transparent=True, reuse_port=True)
        try:
            port = stranger.getsockname()[1]
            with node.store.locked() as state:
                state.proxy_ports["http"] = port
            with pytest.raises(RuntimeError) as failed:
                node.start_agent("--workers", "2")
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in str(failed.value)
        finally:
            stranger.close()
