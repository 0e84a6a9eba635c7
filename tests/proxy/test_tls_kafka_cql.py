"""Kafka and CQL inside TLS that the firewall terminates: kafka-python with
``security_protocol="SSL"`` in front of the Tansu broker (the port's ``terminatingTLS``,
from a secrets directory), and cassandra-driver with an SSL context in front of the CQL
test double (``--tls-cert``). The clients verify the proxy's certificate; their requests
are judged on the cleartext, and denials come back inside the session, as Kafka's
authorization error codes and CQL's Unauthorized."""

from __future__ import annotations

import logging
import shutil
import ssl
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.support.cql_server_double import running_cql_double
from tests.support.firewall import running_firewall
from tests.support.kafka_broker import available, free_port, running_broker
from tests.support.tls import Pki, make_leaf, make_pki

kafka = pytest.importorskip("kafka")
from cassandra import Unauthorized  # noqa: E402
from cassandra.cluster import Cluster  # noqa: E402
from cassandra.policies import RoundRobinPolicy  # noqa: E402
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka import errors as kerrors  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

RUN = uuid.uuid4().hex[:6]
OK, SECRET = f"ok.{RUN}", f"secret.{RUN}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA, and the proxy's certificate for the name and the address clients dial."""
    pki = make_pki(tmp_path_factory.mktemp("pki"), ["unused.example.com"])
    make_leaf(pki, "proxy", dns=["localhost"], ips=["127.0.0.1"])
    return pki


def proxy_pair(pki: Pki) -> tuple[Path, Path]:
    return pki.ca.parent / "proxy.pem", pki.ca.parent / "proxy.key"


def wait_flows(fw, keep, timeout: float = 5.0) -> list[dict]:
    return fw.wait_flows(keep, timeout=timeout)


# --------------------------------------------------------------------------- Kafka


def kafka_policy(port: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: kafka-tls, namespace: data}}
        spec:
          endpointSelector: {{matchLabels: {{app: kafka}}}}
          ingress:
          - toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              terminatingTLS:
                secret: {{name: kafka-tls}}
              rules:
                kafka:
                - {{role: produce, topicPrefix: "ok."}}
                - {{role: consume, topicPrefix: "ok."}}
                - {{apiKey: createtopics}}
        """
    )


@pytest.fixture(scope="module")
def kafka_stack(pki, tmp_path_factory):
    if available() is not None:
        pytest.skip(str(available()))
    secrets = tmp_path_factory.mktemp("secrets")
    secret = secrets / "data" / "kafka-tls"
    secret.mkdir(parents=True)
    cert, key = proxy_pair(pki)
    shutil.copy(cert, secret / "tls.crt")
    shutil.copy(key, secret / "tls.key")
    port = free_port()
    with running_firewall(
        kafka_policy(port),
        ("127.0.0.1", port),
        {"app": "kafka"},
        extra_args=["--tls-secrets-dir", str(secrets)],
    ) as fw:
        # The broker advertises the proxy: every connection after bootstrap is TLS too.
        with running_broker(port=port, advertise=(fw.host, fw.port)) as broker:
            admin = KafkaAdminClient(
                bootstrap_servers=broker.bootstrap, request_timeout_ms=10000, **ssl_options(pki)
            )
            try:
                admin.create_topics([NewTopic(OK, 1, 1), NewTopic(SECRET, 1, 1)])
            finally:
                admin.close()
            yield fw, broker


def ssl_options(pki: Pki) -> dict:
    return {"security_protocol": "SSL", "ssl_cafile": str(pki.ca), "ssl_check_hostname": True}


def test_kafka_python_over_ssl_produces_and_consumes_through_the_terminating_proxy(
    kafka_stack, pki
):
    fw, broker = kafka_stack
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, **ssl_options(pki))
    try:
        for i in range(3):
            producer.send(OK, f"m{i}".encode()).get(timeout=15)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, consumer_timeout_ms=10000, **ssl_options(pki)
    )
    try:
        consumer.assign([TopicPartition(OK, 0)])
        consumer.seek_to_beginning()
        values = []
        for record in consumer:
            values.append(record.value)
            if len(values) == 3:
                break
    finally:
        consumer.close()
    assert values == [b"m0", b"m1", b"m2"]
    produced = wait_flows(fw, lambda f: OK in f.get("l7", {}).get("topics", []))
    assert produced and all(f["verdict"] == "FORWARDED" for f in produced)
    assert all(f["tls"]["version"] == "TLSv1.3" for f in produced)
    assert all(f["tls"]["alpn"] is None for f in produced)


def test_kafka_python_produce_to_a_denied_topic_gets_the_error_inside_the_session(kafka_stack, pki):
    fw, broker = kafka_stack
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, retries=0, max_block_ms=10000, **ssl_options(pki)
    )
    try:
        with pytest.raises(kerrors.TopicAuthorizationFailedError):
            producer.send(SECRET, b"x").get(timeout=15)
        # The session goes on: an allowed topic still works on it.
        producer.send(OK, b"after").get(timeout=15)
    finally:
        producer.close()
    denied = wait_flows(
        fw, lambda f: f["verdict"] == "DENIED" and SECRET in f.get("l7", {}).get("topics", [])
    )
    assert denied and all("tls" in f for f in denied)


# --------------------------------------------------------------------------- CQL

CQL_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cql-tls}}
spec:
  endpointSelector: {{matchLabels: {{app: cassandra}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        l7proto: cassandra
        l7:
        - query_action: select
          query_table: "system(_schema|_virtual_schema)?\\\\..*"
        - query_action: create-keyspace
          query_table: ks
        - query_action: create-table
          query_table: "ks\\\\..*"
        - query_action: insert
          query_table: "ks\\\\.t"
        - query_action: select
          query_table: "ks\\\\.t"
"""


def test_cassandra_driver_over_ssl_through_the_terminating_proxy(pki):
    logging.getLogger("cassandra").setLevel(logging.ERROR)
    cert, key = proxy_pair(pki)
    context = ssl.create_default_context(cafile=str(pki.ca))  # verifies the name too
    with (
        running_cql_double() as double,
        running_firewall(
            CQL_POLICY.format(port=double.port),
            (double.host, double.port),
            {"app": "cassandra"},
            extra_args=["--tls-cert", str(cert), "--tls-key", str(key)],
        ) as fw,
    ):
        cluster = Cluster(
            [fw.host],
            port=fw.port,
            protocol_version=4,
            ssl_context=context,
            ssl_options={"server_hostname": "localhost"},
            load_balancing_policy=RoundRobinPolicy(),
        )
        try:
            s = cluster.connect()
            s.execute(
                "CREATE KEYSPACE ks WITH replication = "
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            s.execute("USE ks")
            s.execute("CREATE TABLE t (a int PRIMARY KEY, b text)")
            s.execute("INSERT INTO t (a, b) VALUES (%s, %s)", (1, "one"))
            assert s.execute("SELECT b FROM t WHERE a = 1").one().b == "one"
            before = len(double.seen)
            with pytest.raises(Unauthorized, match="select on ks.secret denied by policy cql-tls"):
                s.execute("SELECT * FROM ks.secret")
            assert double.seen[before:] == []  # the denied statement never reached the server
            assert s.execute("SELECT b FROM t WHERE a = 1").one().b == "one"
        finally:
            cluster.shutdown()
        denied = wait_flows(fw, lambda f: f.get("l7", {}).get("table") == "ks.secret")
        assert [(f["verdict"], f["reply"]["error_code"]) for f in denied] == [("DENIED", 0x2100)]
        assert denied[0]["tls"]["sni"] == "localhost"
