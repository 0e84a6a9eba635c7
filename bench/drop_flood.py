"""A flood of denied SYNs against a node: what it costs the agent, with and without the
kernel's drop-report aggregation, in the same run.

    python -m bench.drop_flood [--syns N] [--rounds R]

Two endpoints in namespaces and the real agent (root, BPF). The policy lets only
``app=friend`` reach ``app=target`` on port 80, so every SYN the ``flooder`` sends
there is dropped in the kernel. The flooder opens N sockets as fast as it can, each
sending one SYN and closing with an RST-on-close (no retransmissions). Measured
per agent configuration: the agent's CPU from the first SYN until the flow log
holds every drop (or 5 s after the flood), the kernel's ``denied`` counter, and
the drop records written. ``--drop-report-interval 0`` is the old behaviour (one
event and one flow record per dropped packet); the default, 1 s, aggregates per
flow in the kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.common import CpuMeter, markdown_table, median, write_results

FLOOD = """
import socket, struct, sys
target, count = sys.argv[1], int(sys.argv[2])
linger = struct.pack("ii", 1, 0)
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((target, 80))
    except BlockingIOError:
        pass
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: only-friends}
spec:
  endpointSelector: {matchLabels: {app: target}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

ENDPOINTS = {"target": {"app": "target"}, "flooder": {"app": "flooder"}}


def drop_records(node: Any) -> tuple[int, int]:
    """(records, packets they stand for) of the drops in the agent's flow log."""
    drops = [r for r in node.flows() if r.get("type") == "drop"]
    return len(drops), sum(int(r.get("count", 1)) for r in drops)


def one_round(interval: float, syns: int) -> dict[str, Any]:
    from tests.support.node import running_node

    with running_node(ENDPOINTS, start_agent=False) as node:
        agent = node.start_agent("--drop-report-interval", f"{interval:g}")
        node.import_policy(POLICY)
        denied_before = node.kernel_counter("denied")
        records_before, _ = drop_records(node)
        cpu = CpuMeter(agent.pid)
        started = time.monotonic()
        flood = node.run_in(
            "flooder", [sys.executable, "-c", FLOOD, node.ip("target"), str(syns)], timeout=120
        )
        if flood.returncode != 0:
            raise RuntimeError(f"flooder failed: {flood.stderr}")
        flood_s = time.monotonic() - started
        deadline = time.monotonic() + 5 + 2 * interval
        while time.monotonic() < deadline:
            records, packets = drop_records(node)
            if packets >= syns:
                break
            time.sleep(0.2)
        agent_cpu = cpu.stop()
        denied = node.kernel_counter("denied") - denied_before
        records, packets = drop_records(node)
    return {
        "drop_report_interval_s": interval,
        "syns": syns,
        "flood_s": round(flood_s, 2),
        "kernel_denied": denied,
        "flow_records": records - records_before,
        "packets_in_records": packets,
        "agent_cpu_s": round(agent_cpu, 3),
        "agent_cpu_us_per_syn": round(agent_cpu * 1e6 / max(syns, 1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syns", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from l7proxy.datapath.loader import kernel_support

    problem = kernel_support()
    if problem:
        print(f"bench.drop_flood needs the kernel datapath: {problem}", file=sys.stderr)
        return 2
    rounds: dict[float, list[dict[str, Any]]] = {0.0: [], 1.0: []}
    for _ in range(args.rounds):
        for interval in rounds:  # alternate, so drift on this noisy machine hits both
            rounds[interval].append(one_round(interval, args.syns))

    rows = []
    for interval, results in rounds.items():
        rows.append(
            [
                "per packet (0)" if interval == 0 else f"aggregated ({interval:g} s)",
                median([r["kernel_denied"] for r in results]),
                median([r["flow_records"] for r in results]),
                median([r["packets_in_records"] for r in results]),
                median([r["agent_cpu_us_per_syn"] for r in results]),
            ]
        )
    per_packet, aggregated = (
        median([r["agent_cpu_us_per_syn"] for r in rounds[i]]) for i in (0.0, 1.0)
    )
    headline = {
        "aggregated_over_per_packet_agent_cpu": round(aggregated / per_packet, 3)
        if per_packet
        else None,
        # Per packet, the ring buffer overflows under a flood (events lost, counted
        # in the kernel's events_lost); aggregated, every drop is in a record.
        **{
            f"counts_exact_{'per_packet' if interval == 0 else 'aggregated'}": all(
                r["kernel_denied"] == r["syns"] == r["packets_in_records"] for r in results
            )
            for interval, results in rounds.items()
        },
    }
    path = write_results(
        "drop_flood",
        {
            "settings": {
                "syns": args.syns,
                "rounds": args.rounds,
                "flood": "one SYN per socket, RST on close, from an endpoint namespace",
                "agent": "l7proxy run, L3/L4 policy (default-deny for the flooder)",
            },
            "headline": headline,
            "rounds": {str(k): v for k, v in rounds.items()},
        },
    )
    print(
        markdown_table(
            ["drop reports", "kernel denied", "flow records", "drops in records", "agent µs/SYN"],
            rows,
        )
    )
    print(f"\nheadline: {headline}\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
