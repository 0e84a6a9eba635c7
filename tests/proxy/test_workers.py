"""``firewall --workers 2``: the real command, two worker processes on one port,
in front of a real aiohttp server; answers read on the wire, the flow log and
the summed metrics read as a user would."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO
from tests.support.firewall import running_firewall
from tests.support.http_upstream import http_upstream

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: "/v1/{allowed}"}}
"""


@pytest.fixture(scope="module")
def upstream():
    with http_upstream() as up:
        yield up


def policy(upstream, allowed: str) -> str:
    return POLICY.format(port=upstream.port, allowed=allowed)


def get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """One request on a fresh connection: the kernel hashes each to a worker."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def metrics_url(fw) -> str:
    line = fw.proc.stdout.readline().strip()
    assert line.startswith("l7proxy metrics on http://"), line
    return line.rsplit(" ", 1)[-1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


FORWARDED = (
    "hubble_flows_processed_total",
    frozenset({("type", "L7"), ("verdict", "FORWARDED"), ("protocol", "http")}),
)


def l7_flows(fw, part: str, count: int, timeout: float = 5.0) -> list[dict]:
    """The L7 records whose path holds ``part``, once ``count`` of them are written
    (each worker writes its records on its own one-second timer)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in fw.flows() if r.get("type") == "l7" and part in r["l7"]["path"]]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_two_workers_share_the_connections_and_judge_them_as_one_does(upstream):
    with running_firewall(
        policy(upstream, "allowed.*"),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--workers", "2", "--metrics", "127.0.0.1:0"],
    ) as fw:
        url = metrics_url(fw)
        assert len(children(fw.proc.pid)) == 2
        answers = {}
        for n in range(30):
            answers[f"/v1/allowed/{n}"] = get(fw.address, f"/v1/allowed/{n}")
            answers[f"/v1/secret/{n}"] = get(fw.address, f"/v1/secret/{n}")
        assert answers == {
            **{f"/v1/allowed/{n}": (200, f"ok /v1/allowed/{n}".encode()) for n in range(30)},
            **{f"/v1/secret/{n}": (403, b"Access denied") for n in range(30)},
        }
        assert not [p for _, p in upstream.requests if p.startswith("/v1/secret/")]

        # Every request is in the one flow log exactly once, made by both workers.
        records = l7_flows(fw, "/v1/", 60)
        assert Counter(r["l7"]["path"] for r in records) == Counter(set(answers))
        verdicts = {r["l7"]["path"]: r["verdict"] for r in records}
        assert {v for p, v in verdicts.items() if "secret" in p} == {"DENIED"}
        assert {v for p, v in verdicts.items() if "allowed" in p} == {"FORWARDED"}
        assert {r["worker"] for r in records} == {0, 1}

        # /metrics: totals over both workers; each worker's policy counted once.
        samples = scrape(url)
        flows = "hubble_flows_processed_total"
        assert (
            samples[
                (flows, frozenset({("type", "L7"), ("verdict", "FORWARDED"), ("protocol", "http")}))
            ]
            == 30
        )
        assert (
            samples[
                (flows, frozenset({("type", "L7"), ("verdict", "DENIED"), ("protocol", "http")}))
            ]
            == 30
        )
        assert samples[("l7proxy_proxy_connections_total", frozenset())] == 60
        assert samples[("cilium_policy", frozenset())] == 1
        assert samples[("l7proxy_workers_serving", frozenset())] == 2
        with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=10) as resp:
            health = json.loads(resp.read())
        assert health["healthy"] is True
        assert {w["pid"] for w in health["workers"]} == children(fw.proc.pid)


def test_one_worker_is_one_process_with_records_as_before(upstream):
    with running_firewall(
        policy(upstream, "allowed.*"), ("127.0.0.1", upstream.port), {"app": "api"}
    ) as fw:
        assert get(fw.address, "/v1/allowed/1")[0] == 200
        assert children(fw.proc.pid) == set()
        (record,) = fw.flows(wait_for=1)
        assert "worker" not in record


def test_a_policy_change_reaches_every_worker_and_a_bad_one_is_reported_once(upstream):
    with running_firewall(
        policy(upstream, "allowed.*"),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--workers", "2"],
    ) as fw:
        assert {get(fw.address, f"/v1/later/{n}")[0] for n in range(10)} == {403}
        fw.replace_policy(policy(upstream, "(allowed|later).*"))
        deadline = time.monotonic() + 10
        while True:  # each worker polls the files once a second
            statuses = [get(fw.address, f"/v1/later/{n}")[0] for n in range(20)]
            if set(statuses) == {200} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(statuses) == {200}
        # ... and from then on, on many fresh connections, served by both workers.
        assert {get(fw.address, f"/v1/later/after/{n}")[0] for n in range(30)} == {200}
        after = l7_flows(fw, "/after/", 30)
        assert len(after) == 30 and {r["worker"] for r in after} == {0, 1}

        fw.replace_policy("spec: [not, a, policy\n")
        time.sleep(3)  # both workers poll and reject it
        assert {get(fw.address, f"/v1/later/bad/{n}")[0] for n in range(10)} == {200}
        rejected = [line for line in fw.stderr_text().splitlines() if "policy rejected" in line]
        assert len(rejected) == 1, rejected
        assert "policy.yaml" in rejected[0]


def test_a_killed_worker_is_restarted_and_no_connection_is_refused(upstream):
    with running_firewall(
        policy(upstream, "allowed.*"),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--workers", "2", "--metrics", "127.0.0.1:0"],
    ) as fw:
        url = metrics_url(fw)
        assert {get(fw.address, f"/v1/allowed/before/{n}")[0] for n in range(20)} == {200}
        assert scrape(url)[FORWARDED] == 20
        # Each worker writes its records within a second; SIGKILL loses what is not
        # written yet, as it would with one process.
        assert len(l7_flows(fw, "/before/", 20)) == 20
        first = children(fw.proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # At once: connections hashed to the dead worker's socket wait in its queue
        # until the new worker accepts them.
        answers = [get(fw.address, f"/v1/allowed/{n}") for n in range(40)]
        assert {a[0] for a in answers} == {200}
        now = children(fw.proc.pid)
        assert len(now) == 2 and victim not in now and (first - {victim}) <= now
        records = l7_flows(fw, "/v1/allowed/", 60)
        assert len(records) == 60
        assert {r["worker"] for r in records} == {0, 1}
        assert "killed by SIGKILL" in fw.stderr_text() and "restarting it" in fw.stderr_text()
        # The totals keep what the dead worker had counted.
        samples = scrape(url)
        assert samples[FORWARDED] == 60
        assert samples[("l7proxy_worker_restarts_total", frozenset())] == 1


def test_sigterm_stops_every_process_and_sigkill_takes_the_workers_along(upstream):
    for stop in (signal.SIGTERM, signal.SIGKILL):
        with running_firewall(
            policy(upstream, "allowed.*"),
            ("127.0.0.1", upstream.port),
            {"app": "api"},
            extra_args=["--workers", "2"],
        ) as fw:
            assert get(fw.address, "/v1/allowed/x")[0] == 200
            workers = children(fw.proc.pid)
            assert len(workers) == 2
            fw.proc.send_signal(stop)
            code = fw.proc.wait(timeout=15)
            assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
            deadline = time.monotonic() + 5
            while any(alive(p) for p in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(alive(p) for p in workers)


def test_a_bad_policy_stops_the_start_before_any_worker(upstream, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [not, a, policy\n")
    done = subprocess.run(
        [sys.executable, "-m", "l7proxy", "firewall", "--listen", "127.0.0.1:0"]
        + ["--upstream", f"127.0.0.1:{upstream.port}", "--labels", "app=api"]
        + ["--policy", str(bad), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert done.stderr.count("policy rejected") == 1 and "bad.yaml" in done.stderr
    assert "listening" not in done.stdout


def test_a_worker_restarted_while_the_policy_file_is_bad_starts_with_the_last_good(upstream):
    with running_firewall(
        policy(upstream, "allowed.*"),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--workers", "2"],
    ) as fw:
        fw.replace_policy(policy(upstream, "(allowed|later).*"))
        deadline = time.monotonic() + 10
        while {get(fw.address, f"/v1/later/{n}")[0] for n in range(10)} != {200}:
            assert time.monotonic() < deadline, "the new policy never took effect"
            time.sleep(0.2)
        time.sleep(1.5)  # the supervisor copies the good files once a second
        fw.replace_policy("spec: [not, a, policy\n")
        time.sleep(2)
        victim = min(children(fw.proc.pid))
        os.kill(victim, signal.SIGKILL)

        # The new worker starts with the last good policy, not the one it replaced.
        answers = [get(fw.address, f"/v1/later/restart/{n}")[0] for n in range(40)]
        assert set(answers) == {200}
        records = l7_flows(fw, "/v1/later/restart/", 40)
        assert {r["worker"] for r in records} == {0, 1}
        assert "starting with the last good policy" in fw.stderr_text()
        assert victim not in children(fw.proc.pid) and len(children(fw.proc.pid)) == 2


async def test_workers_that_cannot_start_make_the_supervisor_exit_non_zero(caplog):
    from l7proxy.proxy.workers import Supervisor, reuseport_listeners

    socks = reuseport_listeners("127.0.0.1", 0, 2)
    port = socks[0].getsockname()[1]

    def command(worker: int, fds: list[int]) -> list[str]:
        # Worker 1 fails at once; worker 0 would have started.
        code = "raise SystemExit(3)" if worker == 1 else "import time; time.sleep(30)"
        return [sys.executable, "-c", code]

    lines: list[str] = []
    code = await Supervisor([[s] for s in socks], command).run(ready=lines.append)
    assert code == 1 and lines == []
    assert "worker 1 exited with exit code 3 before it was listening" in caplog.text
    # Everything was stopped and the port is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_web_ui_is_refused_with_workers(upstream, tmp_path: Path):
    good = tmp_path / "p.yaml"
    good.write_text(policy(upstream, "allowed.*"))
    done = subprocess.run(
        [sys.executable, "-m", "l7proxy", "firewall", "--listen", "127.0.0.1:0"]
        + ["--upstream", f"127.0.0.1:{upstream.port}", "--labels", "app=api"]
        + ["--policy", str(good), "--workers", "2", "--ui", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "--ui works with one worker only" in done.stderr
