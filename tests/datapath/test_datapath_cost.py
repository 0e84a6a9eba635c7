"""What the datapath costs, measured against itself in the same run (ratios
only, never absolute times):

- per-packet program time with 1 rule vs thousands of rules and endpoints
  (the lookups per packet are fixed, so the cost must not grow with rules);
- bulk TCP throughput between two endpoints with the programs attached vs
  the same veths with nothing attached.

Figures are printed (`-s` shows them) for docs/datapath.md."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time

import pytest

from l7proxy.datapath.loader import PolicyEntry
from tests.support.topology import skip_reason, topology

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=f"datapath: {skip_reason()}"),
]

TCP = 6


@contextlib.contextmanager
def bpf_stats():
    """Kernel run-time accounting for BPF programs, restored afterwards."""
    path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


def run_stats(prog_ids) -> tuple[int, int]:
    time_ns = count = 0
    for prog_id in prog_ids:
        out = subprocess.run(
            ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info = json.loads(out)
        time_ns += info.get("run_time_ns", 0)
        count += info.get("run_cnt", 0)
    return time_ns, count


def new_flows(t, server, count: int) -> None:
    for _ in range(count):
        conn = t.connect("client", server.ip, 8080, timeout=2)
        conn.close()


def ns_per_packet(t, server, flows: int) -> float:
    ids = list(t.dp.program_ids().values())
    t0, c0 = run_stats(ids)
    new_flows(t, server, flows)
    t1, c1 = run_stats(ids)
    return (t1 - t0) / max(c1 - c0, 1)


def many_rules(t, client, server, n: int) -> list[PolicyEntry]:
    entries = [PolicyEntry(server.endpoint_id, "ingress", client.identity, TCP, 8080, 0, "allow")]
    for i in range(n):
        # Other endpoints, other identities, odd ranges: all in the same maps.
        entries.append(
            PolicyEntry(
                5000 + i % 500,
                "ingress",
                2000 + i,
                TCP,
                1000 + i % 3000,
                1000 + i % 3000 + 37,
                "allow",
            )
        )
        entries.append(
            PolicyEntry(
                server.endpoint_id,
                "ingress",
                9000 + i,
                TCP,
                20000 + i,
                20000 + i + (i % 100),
                "deny",
            )
        )
    return entries


def test_per_packet_cost_does_not_grow_with_rules():
    with topology(["client", "server"]) as t, bpf_stats():
        client, server = t["client"], t["server"]
        t.attach("client", egress=False)
        t.attach("server", ingress=True)
        t.serve("server", 8080)
        t.dp.sync_policy(many_rules(t, client, server, 0))
        new_flows(t, server, 50)  # warm up
        small = min(ns_per_packet(t, server, 300) for _ in range(3))
        t.dp.sync_policy(many_rules(t, client, server, 4000))
        keys = t.dp.status()["policy_keys"]
        large = min(ns_per_packet(t, server, 300) for _ in range(3))
        print(
            f"\nper-packet program time: {small:.0f} ns with 1 rule, "
            f"{large:.0f} ns with 8001 rules ({keys} LPM keys): ratio {large / small:.2f}"
        )
        assert large / small < 2.0


def bulk(t, server, total: int) -> float:
    conn = t.connect("client", server.ip, 8081, timeout=5)
    chunk = b"x" * 65536
    start = time.perf_counter()
    sent = 0
    while sent < total:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(30)
    conn.recv(1)  # the sink closes after reading everything
    elapsed = time.perf_counter() - start
    conn.close()
    return total * 8 / elapsed / 1e9


def test_bulk_throughput_with_and_without_the_datapath():
    with topology(["client", "server"]) as t:
        client, server = t["client"], t["server"]
        sink = t.socket_in("server")
        sink.bind((str(server.ip), 8081))
        sink.listen(8)
        stop = threading.Event()
        sizes: list[int] = []

        def drain():
            sink.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = sink.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                received = 0
                with conn:
                    while data := conn.recv(1 << 20):
                        received += len(data)
                sizes.append(received)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        try:
            total = 256 << 20
            policy = [
                PolicyEntry(client.endpoint_id, "egress", server.identity, TCP, 8081, 0, "allow"),
                PolicyEntry(server.endpoint_id, "ingress", client.identity, TCP, 8081, 0, "allow"),
            ]
            t.dp.sync_policy(policy)
            bulk(t, server, 64 << 20)
            # Alternate so a busy neighbour on the machine hurts both sides alike.
            plain, with_dp = [], []
            for _ in range(3):
                plain.append(bulk(t, server, total))
                t.attach("client", egress=True)
                t.attach("server", ingress=True)
                with_dp.append(bulk(t, server, total))
                t.dp.detach(client.endpoint_id)
                t.dp.detach(server.endpoint_id)
            plain, with_dp = max(plain), max(with_dp)
        finally:
            stop.set()
            thread.join(timeout=2)
        print(
            f"\nbulk TCP endpoint->endpoint: {plain:.2f} Gbit/s without, "
            f"{with_dp:.2f} Gbit/s with the datapath: ratio {with_dp / plain:.2f}"
        )
        # Throughput on a shared 2-core machine is too noisy to bound here (bench/
        # owns speed); what must hold is that every byte made it through.
        assert sizes[-6:] == [total] * 6
