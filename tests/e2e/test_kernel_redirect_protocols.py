"""gRPC, Kafka and Cassandra behind the kernel redirect, with real peers in namespaces.

The client runs in one endpoint's namespace, the server in another's; the
agent's BPF datapath redirects the flow to the transparent proxy, which
judges every call and forwards to the real server. Each test checks one
allowed and one denied operation on the same connection or session, and the
flow log records from the proxy.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.support.node import REPO, running_node

pytestmark = [pytest.mark.root, pytest.mark.slow]

ENDPOINTS = {"server": {"app": "server"}, "client": {"app": "client"}}


def policy(port: int, rules: str) -> str:
    return (
        textwrap.dedent(
            f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: server-l7}}
        spec:
          endpointSelector: {{matchLabels: {{app: server}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{app: client}}}}]
            toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              rules:
        """
        )
        + textwrap.indent(textwrap.dedent(rules).strip("\n"), " " * 16)
        + "\n"
    )


def run_client(node, script: str, *args: str, timeout: float = 120) -> list[str]:
    run = node.run_in(
        "client", [sys.executable, "-c", textwrap.dedent(script), *args], timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()


GRPC_SERVER = """
import sys, time
from concurrent import futures
sys.path.insert(0, {repo!r})
import grpc
from tests.support.grpc_interop import CHANNEL_OPTIONS, interop, servicer_class
pb = interop()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=CHANNEL_OPTIONS)
pb.test_pb2_grpc.add_TestServiceServicer_to_server(servicer_class(pb)(), server)
server.add_insecure_port("0.0.0.0:50051")
server.start()
print("grpc ready", flush=True)
server.wait_for_termination()
"""

# Runs the same interop scenarios direct... through whatever address it is given,
# printing one "name result" line per scenario.
GRPC_CLIENT = """
import sys
from concurrent import futures
sys.path.insert(0, {repo!r})
import grpc
from tests.support.grpc_interop import CHANNEL_OPTIONS, ECHO_INITIAL, ECHO_TRAILING, interop
pb = interop()
m = pb.messages_pb2
channel = grpc.insecure_channel(sys.argv[1] + ":50051", options=CHANNEL_OPTIONS)
stub = pb.test_pb2_grpc.TestServiceStub(channel)
out = []
reply = stub.UnaryCall(m.SimpleRequest(response_size=10), timeout=10)
out.append(("unary", len(reply.payload.body)))
big = stub.UnaryCall(
    m.SimpleRequest(response_size=4 << 20, payload=m.Payload(body=b"x" * (3 << 20))), timeout=30
)
out.append(("large", len(big.payload.body)))
streamed = m.StreamingOutputCallRequest(
    response_parameters=[m.ResponseParameters(size=n) for n in (1, 10, 100, 1000)]
)
sizes = [len(r.payload.body) for r in stub.StreamingOutputCall(streamed, timeout=10)]
out.append(("server-streaming", sum(sizes)))
uploads = [m.StreamingInputCallRequest(payload=m.Payload(body=b"y" * n)) for n in (3, 30, 300)]
agg = stub.StreamingInputCall(iter(uploads), timeout=10)
out.append(("client-streaming", agg.aggregated_payload_size))
pings = [
    m.StreamingOutputCallRequest(response_parameters=[m.ResponseParameters(size=n)])
    for n in (5, 50)
]
bidi = [len(r.payload.body) for r in stub.FullDuplexCall(iter(pings), timeout=10)]
out.append(("bidi", sum(bidi)))
echoed = ((ECHO_INITIAL, "hello"), (ECHO_TRAILING, b"\\x00\\xff"))
call = stub.UnaryCall.with_call(m.SimpleRequest(response_size=1), metadata=echoed, timeout=10)[1]
initial, trailing = dict(call.initial_metadata()), dict(call.trailing_metadata())
echoed_back = initial.get(ECHO_INITIAL) == "hello" and trailing.get(ECHO_TRAILING) == b"\\x00\\xff"
out.append(("metadata", echoed_back))
try:
    failing = m.SimpleRequest(response_status=m.EchoStatus(code=5, message="no such ship"))
    stub.UnaryCall(failing, timeout=10)
except grpc.RpcError as exc:
    out.append(("status", exc.code().name + ":" + exc.details().replace(" ", "_")))
try:
    slow = m.StreamingOutputCallRequest(
        response_parameters=[m.ResponseParameters(size=1, interval_us=2_000_000)]
    )
    stub.StreamingOutputCall(slow, timeout=0.5).next()
except grpc.RpcError as exc:
    out.append(("deadline", exc.code().name))
with futures.ThreadPoolExecutor(16) as pool:
    def unary(size):
        return len(stub.UnaryCall(m.SimpleRequest(response_size=size), timeout=20).payload.body)

    results = list(pool.map(unary, range(100)))
out.append(("concurrent", sum(results)))
try:
    stub.EmptyCall(pb.empty_pb2.Empty(), timeout=10)
    out.append(("empty", "OK"))
except grpc.RpcError as exc:
    out.append(("empty", exc.code().name))
reply = stub.UnaryCall(m.SimpleRequest(response_size=20), timeout=10)
out.append(("unary-after-deny", len(reply.payload.body)))
for name, value in out:
    print(name, value)
"""

GRPC_EXPECTED = [
    "unary",
    "10",
    "large",
    str(4 << 20),
    "server-streaming",
    "1111",
    "client-streaming",
    "333",
    "bidi",
    "55",
    "metadata",
    "True",
    "status",
    "NOT_FOUND:no_such_ship",
    "deadline",
    "DEADLINE_EXCEEDED",
    "concurrent",
    str(sum(range(100))),
]


def test_grpc_interop_and_method_rules_behind_the_kernel_redirect():
    from tests.support.grpc_interop import interop

    interop()  # compile the protos once, outside the namespaces
    with running_node(ENDPOINTS) as node:
        node.spawn(
            [
                "ip",
                "netns",
                "exec",
                node.endpoint("server").netns,
                sys.executable,
                "-c",
                GRPC_SERVER.format(repo=str(REPO)),
            ],
            "grpc ready",
            "grpc-server",
        )
        client = GRPC_CLIENT.format(repo=str(REPO))
        # Without policy the flow never leaves the kernel: the reference behaviour.
        assert run_client(node, client, node.ip("server")) == GRPC_EXPECTED + [
            "empty",
            "OK",
            "unary-after-deny",
            "20",
        ]
        node.import_policy(
            policy(
                50051,
                "grpc:\n- {service: grpc.testing.TestService, method: "
                '"(Unary|StreamingOutput|StreamingInput|FullDuplex)Call"}\n',
            )
        )
        # Through the transparent proxy: the same results, and EmptyCall denied natively.
        assert run_client(node, client, node.ip("server")) == GRPC_EXPECTED + [
            "empty",
            "PERMISSION_DENIED",
            "unary-after-deny",
            "20",
        ]
        records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
        calls = [
            (r["l7"]["method"], r["verdict"], r["reply"].get("grpc_status"))
            for r in records
            if r.get("protocol") == "grpc"
        ]
        assert ("EmptyCall", "DENIED", 7) in calls and ("UnaryCall", "FORWARDED", 5) in calls
        assert sum(1 for c in calls if c[1] == "FORWARDED") == len(calls) - 1


KAFKA_CLIENT = """
import sys
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka import errors
bootstrap = sys.argv[1] + ":9092"
admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=20000)
admin.create_topics([NewTopic("orders", 1, 1), NewTopic("secrets", 1, 1)])
admin.close()
producer = KafkaProducer(
    bootstrap_servers=bootstrap, enable_idempotence=False, acks=1, retries=0, max_block_ms=20000
)
producer.send("orders", b"first").get(timeout=20)
print("orders", "ok")
try:
    producer.send("secrets", b"nope").get(timeout=20)
    print("secrets", "ok")
except errors.TopicAuthorizationFailedError:
    print("secrets", "TOPIC_AUTHORIZATION_FAILED")
producer.send("orders", b"second").get(timeout=20)
print("orders-after-deny", "ok")
producer.close()
"""


def test_kafka_topic_rules_behind_the_kernel_redirect():
    from tests.support.kafka_broker import TANSU, available

    if available():
        pytest.skip(available())
    with running_node(ENDPOINTS) as node:
        ip = node.ip("server")
        node.spawn(
            [
                "ip",
                "netns",
                "exec",
                node.endpoint("server").netns,
                str(TANSU),
                "broker",
                "--listener-url",
                f"tcp://{ip}:9092",
                "--advertised-listener-url",
                f"tcp://{ip}:9092",
                "--storage-engine",
                "memory://tansu/",
                "--cluster-id",
                f"redirect-{node.store.read().instance}",
            ],
            None,
            "tansu",
        )
        node.import_policy(
            policy(9092, "kafka:\n- {role: produce, topic: orders}\n- {apiKey: createtopics}\n")
        )
        out = run_client(node, KAFKA_CLIENT, ip)
        assert out == [
            "orders",
            "ok",
            "secrets",
            "TOPIC_AUTHORIZATION_FAILED",
            "orders-after-deny",
            "ok",
        ]
        records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
        denied = [r for r in records if r.get("verdict") == "DENIED"]
        assert (
            all(r["l7"]["topics"] == ["secrets"] for r in denied)
            and denied[0]["reply"].get("error_code") == 29
        )


CQL_CLIENT = """
import logging, sys
logging.disable(logging.CRITICAL)
from cassandra import Unauthorized
from cassandra.cluster import Cluster
from cassandra.policies import RoundRobinPolicy
cluster = Cluster(
    [sys.argv[1]], port=9042, protocol_version=4, load_balancing_policy=RoundRobinPolicy()
)
session = cluster.connect()
session.execute(
    "CREATE KEYSPACE shop WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
session.execute("CREATE TABLE shop.orders (id int PRIMARY KEY, item text)")
session.execute("INSERT INTO shop.orders (id, item) VALUES (1, 'saber')")
print("select", len(list(session.execute("SELECT * FROM shop.orders"))))
try:
    session.execute("DROP TABLE shop.orders")
    print("drop", "ok")
except Unauthorized:
    print("drop", "Unauthorized")
print("select-after-deny", len(list(session.execute("SELECT * FROM shop.orders"))))
cluster.shutdown()
"""


def test_cassandra_statement_rules_behind_the_kernel_redirect():
    with running_node(ENDPOINTS) as node:
        ip = node.ip("server")
        node.spawn(
            [
                "ip",
                "netns",
                "exec",
                node.endpoint("server").netns,
                sys.executable,
                "-m",
                "tests.support.cql_server_double",
                "--host",
                ip,
                "--port",
                "9042",
                "--max-version",
                "4",
            ],
            "listening on",
            "cql-double",
        )
        node.import_policy(
            policy(
                9042,
                """
            l7proto: cassandra
            l7:
            - {query_action: select}
            - {query_action: insert, query_table: "shop\\\\.orders"}
            - {query_action: create-keyspace}
            - {query_action: create-table}
            """,
            )
        )
        out = run_client(node, CQL_CLIENT, ip)
        assert out == ["select", "1", "drop", "Unauthorized", "select-after-deny", "1"]
        records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
        denied = [
            (r["l7"]["action"], r["l7"]["table"]) for r in records if r.get("verdict") == "DENIED"
        ]
        assert denied == [("drop-table", "shop.orders")]
