"""``policy suggest`` end to end: observe real traffic in audit mode, suggest, enforce.

Three real services, each behind the real ``l7proxy firewall`` on loopback:
the Death Star's HTTP API (Star Wars traffic plus ship ids), the gRPC interop
TestService (grpcio), and the Tansu Kafka broker (kafka-python). Each firewall
starts with a draft policy in audit mode that allows only part of the workload,
so the rest is recorded as AUDIT. Then:

1. the workload runs: everything is answered by the services;
2. ``l7proxy policy suggest`` (the shipped command) reads the three flow logs and
   writes one policy per service, replayed before it is written;
3. the suggestion replaces the drafts (enforced, no audit): the same workload
   runs again and nothing is denied, read off the wire by the clients;
4. requests that were never observed are denied with each protocol's own
   answer: ``403`` for ``PUT /v1/exhaust-port``, ``PERMISSION_DENIED`` for
   another gRPC method, ``TOPIC_AUTHORIZATION_FAILED`` for another topic; and a
   ship id never seen is still allowed, because the ids were generalised.
"""

from __future__ import annotations

import http.client
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import yaml

from tests.support import REPO
from tests.support.firewall import running_firewall
from tests.support.grpc_interop import interop, interop_server, stub_for
from tests.support.http_upstream import http_upstream
from tests.support.kafka_broker import available, free_port, running_broker
from tests.support.kafka_wire import assert_denied, metadata_frame, produce_frame, read_answer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

kafka = pytest.importorskip("kafka")
grpc = pytest.importorskip("grpc")

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

RUN = uuid.uuid4().hex[:6]
FLEET, SECRET = f"fleet.{RUN}", f"secret.{RUN}"
DEATHSTAR = {"org": "empire", "class": "deathstar"}
HOLONET = {"app": "holonet"}
BROKER = {"app": "kafka"}
SHIPS = (7, 42, 501, 1138, 2187, 4711)


def draft(name: str, labels: dict[str, str], port: int, rules: str) -> str:
    """A first policy, in audit mode: what it does not allow flows on as AUDIT."""
    selector = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return textwrap.dedent(
        f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: {name}
          annotations: {{l7proxy.io/audit: "true"}}
        spec:
          endpointSelector: {{matchLabels: {{{selector}}}}}
          ingress:
          - fromEntities: [host]
            toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              rules:
        """
    ) + textwrap.indent(rules, " " * 8)


# ----------------------------------------------------------------------------- workloads


def http_call(fw, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(fw.host, fw.port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def star_wars(fw) -> list[tuple[str, str, int]]:
    calls = [("GET", "/v1/")] * 2 + [("POST", "/v1/request-landing")] * 3
    calls += [("GET", f"/v1/ships/{n}") for n in SHIPS]
    return [(m, p, http_call(fw, m, p)[0]) for m, p in calls]


def holonet(fw) -> list[tuple[str, str]]:
    pb = interop()
    channel, stub = stub_for(fw.host, fw.port)
    try:
        out = []
        for _ in range(2):
            stub.EmptyCall(pb.empty_pb2.Empty(), timeout=10)
            out.append(("EmptyCall", "OK"))
        for size in (1, 2, 3):
            reply = stub.UnaryCall(pb.messages_pb2.SimpleRequest(response_size=size), timeout=10)
            out.append(("UnaryCall", f"OK {len(reply.payload.body)}"))
        return out
    finally:
        channel.close()


def fleet_traffic(broker, batch: str) -> list[bytes]:
    """Produce five messages to the fleet topic and read the topic back from its start."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    try:
        for i in range(5):
            producer.send(FLEET, f"{batch}-{i}".encode()).get(timeout=15)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(FLEET, 0)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            v.endswith(b"-4") and v.startswith(batch.encode()) for v in values
        ):
            for records in consumer.poll(timeout_ms=300).values():
                values += [r.value for r in records]
    finally:
        consumer.close()
    return values


def read_frame(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a whole response"
        data += chunk
    return data


def settled(fw, at_least: int = 1) -> list[dict]:
    """The firewall's flow records once its log stops growing (it is flushed each second)."""
    records = fw.flows(wait_for=at_least)
    while True:
        time.sleep(1.2)
        again = fw.flows()
        if len(again) == len(records):
            return again
        records = again


def load_policy(fw, text: str, policies: int) -> None:
    """Import into a running firewall: rewrite its policy file and wait for the reload."""
    fw.replace_policy(text)
    deadline = time.monotonic() + 10
    while f"policy loaded: {policies} policies" not in fw.stderr_text():
        assert time.monotonic() < deadline, fw.stderr_text()
        time.sleep(0.1)


# ----------------------------------------------------------------------------- the test


def test_observe_in_audit_mode_suggest_enforce_and_attacks_are_denied(tmp_path):
    kafka_port = free_port()
    with (
        http_upstream() as web,
        interop_server() as grpc_port,
        running_firewall(
            draft("deathstar-draft", DEATHSTAR, web.port, "http:\n- {method: GET, path: /v1/}\n"),
            ("127.0.0.1", web.port),
            DEATHSTAR,
        ) as fw_http,
        running_firewall(
            draft(
                "holonet-draft",
                HOLONET,
                grpc_port,
                "grpc:\n- {service: grpc.testing.TestService, method: EmptyCall}\n",
            ),
            ("127.0.0.1", grpc_port),
            HOLONET,
        ) as fw_grpc,
        running_firewall(
            draft(
                "kafka-draft", BROKER, kafka_port, f"kafka:\n- {{role: produce, topic: {FLEET}}}\n"
            ),
            ("127.0.0.1", kafka_port),
            BROKER,
        ) as fw_kafka,
        running_broker(port=kafka_port, advertise=fw_kafka.address) as broker,
    ):
        firewalls = (fw_http, fw_grpc, fw_kafka)
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
        try:
            admin.create_topics([NewTopic(FLEET, 1, 1)])
        finally:
            admin.close()

        # 1. Observe: in audit mode, everything is answered.
        assert [s for _, _, s in star_wars(fw_http)] == [200] * 11
        assert holonet(fw_grpc) == [("EmptyCall", "OK")] * 2 + [
            ("UnaryCall", "OK 1"),
            ("UnaryCall", "OK 2"),
            ("UnaryCall", "OK 3"),
        ]
        assert fleet_traffic(broker, "observe") == [f"observe-{i}".encode() for i in range(5)]
        seen = {fw: settled(fw) for fw in firewalls}
        for fw in firewalls:
            verdicts = {r["verdict"] for r in seen[fw] if r["type"] == "l7"}
            assert verdicts == {"FORWARDED", "AUDIT"}, (fw.flowlog, verdicts)

        # 2. Suggest, with the shipped command.
        out = tmp_path / "suggested.yaml"
        logs = [arg for fw in firewalls for arg in ("--flowlog", str(fw.flowlog))]
        run = subprocess.run(
            [sys.executable, "-m", "l7proxy", "policy", "suggest", *logs, "-o", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        observed = sum(len([r for r in seen[fw] if r["type"] == "l7"]) for fw in firewalls)
        assert f"enforced: {observed:,} of {observed:,} allowed" in run.stderr
        suggested = out.read_text()
        policies = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(suggested)}
        assert sorted(policies) == [
            "suggested-deathstar-empire",
            "suggested-holonet",
            "suggested-kafka",
        ]
        http_rules = policies["suggested-deathstar-empire"]["ingress"][0]["toPorts"][0]["rules"]
        assert http_rules["http"] == [
            {"method": "GET", "path": "/v1/"},
            {"method": "GET", "path": "/v1/ships/[0-9]+"},
            {"method": "POST", "path": "/v1/request-landing"},
        ]
        grpc_rules = policies["suggested-holonet"]["ingress"][0]["toPorts"][0]["rules"]["grpc"]
        assert grpc_rules == [
            {"service": "grpc.testing.TestService", "method": "EmptyCall"},
            {"service": "grpc.testing.TestService", "method": "UnaryCall"},
        ]
        kafka_rules = policies["suggested-kafka"]["ingress"][0]["toPorts"][0]["rules"]["kafka"]
        assert {"role": "produce", "topic": FLEET} in kafka_rules
        assert {"role": "consume", "topic": FLEET} in kafka_rules
        assert all(r.get("topic", FLEET) == FLEET and "topicPrefix" not in r for r in kafka_rules)
        assert f"# {len(SHIPS)} requests, e.g. /v1/ships/" in suggested

        # 3. Import, enforced: the same workload again, nothing denied.
        before = {fw: len(fw.flows()) for fw in firewalls}
        for fw in firewalls:
            load_policy(fw, suggested, 3)
        assert [s for _, _, s in star_wars(fw_http)] == [200] * 11
        assert [outcome for _, outcome in holonet(fw_grpc)] == ["OK"] * 2 + ["OK 1", "OK 2", "OK 3"]
        assert fleet_traffic(broker, "enforce")[-5:] == [f"enforce-{i}".encode() for i in range(5)]
        for fw in firewalls:
            rerun = [r for r in settled(fw, before[fw] + 1)[before[fw] :] if r["type"] == "l7"]
            assert rerun and {r["verdict"] for r in rerun} == {"FORWARDED"}
            assert all(r["policy"].startswith("suggested-") for r in rerun)

        # 4. What was never observed is denied, each in its protocol's own way.
        reached = len(web.requests)
        status, body = http_call(fw_http, "PUT", "/v1/exhaust-port")
        assert (status, body) == (403, b"Access denied")
        assert http_call(fw_http, "GET", "/v1/ships/x-wing")[0] == 403
        assert http_call(fw_http, "DELETE", "/v1/ships/7")[0] == 403
        assert web.requests[reached:] == []
        assert http_call(fw_http, "GET", "/v1/ships/99999") == (200, b"ok /v1/ships/99999")

        pb = interop()
        channel, stub = stub_for(fw_grpc.host, fw_grpc.port)
        try:
            with pytest.raises(grpc.RpcError) as denied:
                stub.CacheableUnaryCall(pb.messages_pb2.SimpleRequest(response_size=1), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "suggested-holonet" in denied.value.details()
        finally:
            channel.close()

        # Kafka: a Produce and a Metadata request for a topic never used, sent as a
        # client would and read back with kafka-python's own response classes.
        with socket.create_connection(fw_kafka.address, timeout=10) as sock:
            for frame in (produce_frame(7, SECRET, "raider"), metadata_frame(8, SECRET, "raider")):
                sock.sendall(frame)
                assert_denied(frame, read_frame(sock), 29)  # TOPIC_AUTHORIZATION_FAILED
            allowed = metadata_frame(9, FLEET, "raider")
            sock.sendall(allowed)
            codes = read_answer(allowed, read_frame(sock)).error_codes
            assert codes and {code for _, code in codes} == {0}  # the broker's own answer

        attacks = [
            r
            for fw in firewalls
            for r in settled(fw)
            if r["type"] == "l7" and r["verdict"] == "DENIED"
        ]
        assert {
            (r["protocol"], r["l7"].get("method") or r["l7"].get("topics", [""])[0])
            for r in attacks
        } >= {
            ("http", "PUT"),
            ("http", "GET"),
            ("http", "DELETE"),
            ("grpc", "CacheableUnaryCall"),
            ("kafka", SECRET),
        }
