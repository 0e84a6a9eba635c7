"""Kafka end to end: real clients (kafka-python, confluent-kafka) through the real
``l7proxy firewall`` to the real Tansu broker.

The broker advertises the firewall's address, so every connection the clients
open after bootstrap goes through the proxy too.
"""

from __future__ import annotations

import os
import socket
import struct
import textwrap
import time
import uuid

import pytest

from tests.support.firewall import running_firewall
from tests.support.kafka_broker import available, free_port, running_broker
from tests.support.kafka_wire import metadata_frame, produce_frame

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

kafka = pytest.importorskip("kafka")
confluent_kafka = pytest.importorskip("confluent_kafka")

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka import errors as kerrors  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

LABELS = {"app": "kafka"}
RUN = uuid.uuid4().hex[:6]
OK, SECRET = f"ok.{RUN}", f"secret.{RUN}"
CODECS = ("gzip", "lz4", "zstd")


def policy(port: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: kafka-e2e}}
        spec:
          endpointSelector: {{matchLabels: {{app: kafka}}}}
          ingress:
          - toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              rules:
                kafka:
                - {{role: produce, topicPrefix: "ok."}}
                - {{role: consume, topicPrefix: "ok.", group: billing}}
                - {{apiKey: createtopics}}
                - {{apiKey: describecluster}}
        """
    )


@pytest.fixture(scope="module")
def stack():
    port = free_port()
    with running_firewall(policy(port), ("127.0.0.1", port), LABELS) as fw:
        with running_broker(port=port, advertise=(fw.host, fw.port)) as broker:
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
            try:
                names = (
                    [OK, SECRET] + [f"{OK}.{c}" for c in CODECS] + [f"{OK}.ck.{c}" for c in CODECS]
                )
                admin.create_topics([NewTopic(n, 1, 1) for n in names])
            finally:
                admin.close()
            yield fw, broker


def wait_flows(fw, keep, timeout: float = 5.0) -> list[dict]:
    """Flow records ``keep`` selects, waiting for the firewall to flush its log."""
    return fw.wait_flows(lambda f: keep(f.get("l7", {}), f), timeout=timeout)


def flows_for(fw, api: int, topic: str) -> list[dict]:
    return wait_flows(fw, lambda l7, _f: l7.get("api_key") == api and topic in l7.get("topics", []))


def read_all(consumer, want: int, timeout: float = 30.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(values) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values += [r.value for r in records]
    return values


# ---------------------------------------------------------------------------
# Allowed traffic


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_idempotent_compressed_produce_and_groupless_consume(stack, codec):
    fw, broker = stack
    topic = f"{OK}.{codec}"
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap,
        enable_idempotence=True,
        compression_type=codec,
        acks="all",
    )
    try:
        sent = [f"{codec}-{i}".encode() * 20 for i in range(50)]
        for value in sent:
            producer.send(topic, value)
        producer.flush(timeout=20)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        assert read_all(consumer, len(sent)) == sent
    finally:
        consumer.close()
    produced = flows_for(fw, 0, topic)
    assert produced and all(
        f["verdict"] == "FORWARDED" and f["reply"]["error_code"] == 0 for f in produced
    )
    assert wait_flows(fw, lambda l7, _f: l7.get("api_key") == 22), (
        "InitProducerId went through the proxy"
    )


def test_confluent_compressed_produce_and_group_consume_with_commits(stack):
    fw, broker = stack
    errors = []
    for codec in CODECS:
        producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": broker.bootstrap,
                "enable.idempotence": True,
                "compression.codec": codec,
            }
        )
        for i in range(30):
            producer.produce(
                f"{OK}.ck.{codec}",
                f"ck-{codec}-{i}".encode(),
                on_delivery=lambda err, _m: err and errors.append(err),
            )
        assert producer.flush(20) == 0
    assert errors == []

    topic = f"{OK}.ck.zstd"
    conf = {
        "bootstrap.servers": broker.bootstrap,
        "group.id": "billing",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    consumer = confluent_kafka.Consumer(conf)
    got = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(got) < 30 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value())
        consumer.commit(asynchronous=False)
        committed = consumer.committed([confluent_kafka.TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    assert got == [f"ck-zstd-{i}".encode() for i in range(30)]
    assert committed[0].offset == 30
    commits = flows_for(fw, 8, topic)
    assert (
        commits
        and commits[-1]["verdict"] == "FORWARDED"
        and commits[-1]["l7"]["groups"] == ["billing"]
    )


# ---------------------------------------------------------------------------
# Denials: native errors, connection kept, allowed work continues


def test_kafka_python_produce_to_denied_topic_raises_and_producer_keeps_working(stack):
    fw, broker = stack
    # Not idempotent: kafka-python treats an authorization error as fatal for an
    # idempotent producer, exactly as it does against a broker with ACLs.
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, max_block_ms=10000, enable_idempotence=False
    )
    try:
        with pytest.raises(kerrors.TopicAuthorizationFailedError):
            producer.send(SECRET, b"nope").get(timeout=15)
        meta = producer.send(OK, b"still here").get(timeout=15)
        assert meta.topic == OK and meta.offset >= 0
    finally:
        producer.close()
    denied = wait_flows(
        fw, lambda l7, f: SECRET in l7.get("topics", []) and f["verdict"] == "DENIED"
    )
    assert denied and all(f["reply"]["error_code"] == 29 for f in denied)


def test_confluent_produce_to_denied_topic_fails_delivery_and_allowed_topic_works(stack):
    _fw, broker = stack
    results = {}
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": broker.bootstrap, "message.timeout.ms": 15000}
    )
    producer.produce(
        SECRET, b"nope", on_delivery=lambda err, m: results.__setitem__(m.topic(), err)
    )
    producer.produce(OK, b"fine", on_delivery=lambda err, m: results.__setitem__(m.topic(), err))
    producer.flush(20)
    assert (
        results[SECRET] is not None
        and results[SECRET].code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    assert results[OK] is None


def test_kafka_python_consume_denied_topic_raises_then_allowed_topic_consumes(stack):
    _fw, broker = stack
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    try:
        consumer.assign([TopicPartition(SECRET, 0)])
        with pytest.raises(kerrors.TopicAuthorizationFailedError):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                consumer.poll(timeout_ms=500)
        consumer.assign([TopicPartition(f"{OK}.gzip", 0)])
        consumer.seek_to_beginning()
        assert len(read_all(consumer, 50)) == 50
    finally:
        consumer.close()


def test_kafka_python_denied_group_raises_group_authorization_failed(stack):
    fw, broker = stack
    consumer = KafkaConsumer(
        OK, bootstrap_servers=broker.bootstrap, group_id="intruders", auto_offset_reset="earliest"
    )
    try:
        with pytest.raises(kerrors.GroupAuthorizationFailedError):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                consumer.poll(timeout_ms=500)
    finally:
        consumer.close()
    # FindCoordinator may pass (the produce role does not restrict groups); the join may not.
    joins = wait_flows(
        fw, lambda l7, _f: l7.get("api_key") == 11 and "intruders" in l7.get("groups", [])
    )
    assert joins and joins[0]["verdict"] == "DENIED" and joins[0]["reply"]["error_code"] == 30


def test_confluent_denied_group_reports_group_authorization_failed(stack):
    _fw, broker = stack
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": "intruders"}
    )
    codes = set()
    try:
        consumer.subscribe([OK])
        deadline = time.monotonic() + 20
        while (
            confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED not in codes
            and time.monotonic() < deadline
        ):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error():
                codes.add(msg.error().code())
    finally:
        consumer.close()
    assert confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED in codes


# ---------------------------------------------------------------------------
# Pipelining: a denied request in the middle keeps its place in the reply order.


def _read_frame(sock: socket.socket) -> bytes:
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    size = struct.unpack(">i", exactly(4))[0]
    return exactly(size)


def test_pipelined_frames_with_a_denied_one_in_the_middle_keep_order(stack):
    fw, _broker = stack
    from kafka.protocol.producer import ProduceResponse

    with socket.create_connection((fw.host, fw.port), timeout=15) as sock:
        sock.sendall(
            metadata_frame(101, OK, "pipeliner")
            + produce_frame(102, SECRET, "pipeliner")
            + metadata_frame(103, OK, "pipeliner")
        )
        replies = [_read_frame(sock) for _ in range(3)]
        assert [struct.unpack(">i", r[:4])[0] for r in replies] == [101, 102, 103]
        denied = ProduceResponse.decode(replies[1], version=9, header=True)
        assert denied.responses[0].partition_responses[0].error_code == 29
        # The connection is still usable after the denial.
        sock.sendall(metadata_frame(104, OK, "pipeliner"))
        assert struct.unpack(">i", _read_frame(sock)[:4])[0] == 104


# ---------------------------------------------------------------------------
# Cilium-style explicit API lists: what the rules leave out is denied natively,
# including librdkafka's KIP-714 telemetry request, and the client carries on.


def test_librdkafka_survives_denied_telemetry_under_explicit_api_rules():
    port = free_port()
    topic = f"plain.{RUN}"
    explicit = textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: kafka-explicit}}
        spec:
          endpointSelector: {{matchLabels: {{app: kafka}}}}
          ingress:
          - toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              rules:
                kafka:
                - {{apiKey: produce, topic: {topic}}}
                - {{apiKey: metadata}}
                - {{apiKey: apiversions}}
                - {{apiKey: createtopics}}
        """
    )
    with running_firewall(explicit, ("127.0.0.1", port), LABELS) as fw:
        with running_broker(port=port, advertise=(fw.host, fw.port)) as broker:
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
            try:
                admin.create_topics([NewTopic(topic, 1, 1)])
            finally:
                admin.close()
            results = []
            producer = confluent_kafka.Producer(
                {"bootstrap.servers": broker.bootstrap, "message.timeout.ms": 15000}
            )
            for i in range(5):
                producer.produce(
                    topic, f"m{i}".encode(), on_delivery=lambda err, _m: results.append(err)
                )
            assert producer.flush(20) == 0
            del producer
            assert results == [None] * 5
            telemetry = wait_flows(fw, lambda l7, _f: l7.get("api_key") == 71)
            assert telemetry and all(
                f["verdict"] == "DENIED" and f["reply"]["error_code"] == 31 for f in telemetry
            )


def test_large_messages_stream_through_both_ways(stack):
    """Requests and responses above 64 KiB take the streaming paths."""
    fw, broker = stack
    topic = f"{OK}.big"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    values = [bytes([65 + i]) * 300_000 for i in range(4)]
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=50, max_request_size=4_000_000
    )
    try:
        for value in values:
            producer.send(topic, value)
        producer.flush(timeout=20)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        assert read_all(consumer, len(values)) == values
    finally:
        consumer.close()
    produced = flows_for(fw, 0, topic)
    assert produced and all(
        f["verdict"] == "FORWARDED" and f["reply"]["error_code"] == 0 for f in produced
    )
    fetched = flows_for(fw, 1, topic)
    assert fetched and all(f["reply"].get("error_code") == 0 for f in fetched)


# ---------------------------------------------------------------------------
# Short connections end on both sides (issue 14, finding 10).


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(count, target: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := count()) > target and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_short_connections_are_closed_on_both_sides_once_the_client_leaves(stack):
    """Kafka has no half-close: after the client's EOF and its last response, the
    proxy ends the connection instead of holding two descriptors until the idle
    timeout (300 s)."""
    fw, _broker = stack
    before = settle(lambda: open_descriptors(fw.proc.pid), 0, timeout=0)
    for n in range(60):
        with socket.create_connection((fw.host, fw.port), timeout=15) as sock:
            sock.sendall(metadata_frame(1000 + n, OK, "pipeliner"))
            assert struct.unpack(">i", _read_frame(sock)[:4])[0] == 1000 + n
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # the proxy closes its side too
    assert settle(lambda: open_descriptors(fw.proc.pid), before + 4) <= before + 4
