"""Large Kafka and CQL frames against the real ``l7proxy firewall`` (issue 14, findings 8, 9).

The attack: a few clients each send most of a very large frame and stop. Every
request frame was held whole (up to 256 MiB for CQL, 100 MiB for Kafka), in about
three copies: three CQL clients sending 200 MiB of a 255 MiB QUERY took the proxy
to 834 MiB. Now

- a CQL QUERY or EXECUTE is judged on its query string or prepared id and its bound
  values stream to the server (or, denied, are dropped as they arrive): nothing is
  held, whatever the frame's size;
- what must be held whole to be judged (a CQL BATCH, a Kafka request other than a
  one-topic Produce) may be at most 16 MiB, else the client gets its protocol's
  answer (CQL: ProtocolError on the frame's stream) and a close;
- all connections together hold at most ``--max-held-bytes``: past it a client
  holding a frame is not read, and its head deadline ends it.

Scaled down: 40 MiB frames, ``--max-held-bytes 16M``. The proxy's memory is read from
``/proc/PID/status``: its peak resident size (``VmHWM``, reset after a warm-up) may
grow by at most ``ALLOWED_GROWTH`` over its size before the attack. Each client is a
plain socket; answers are decoded with the driver's own codecs
(``tests/support/cql_wire.py``). The last tests send large allowed and denied
requests through to the CQL server test double with the real driver.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cassandra import ConsistencyLevel, Unauthorized
from cassandra.protocol import (
    BatchMessage,
    ErrorMessage,
    ProtocolHandler,
    QueryMessage,
    StartupMessage,
)
from cassandra.query import BatchType
from kafka.protocol.producer import ProduceRequest

from tests.proxy.test_cassandra_e2e import KEYSPACE, session_to
from tests.proxy.test_cassandra_e2e import POLICY as CQL_E2E_POLICY
from tests.support.cql_server_double import running_cql_double
from tests.support.cql_wire import assert_unauthorized, client_envelopes
from tests.support.firewall import RunningFirewall, running_firewall

MiB = 1 << 20
FRAME = 40 * MiB  # the attack's frame, scaled down from 255 MiB
SENT = 36 * MiB  # how much of it each attacker sends before it stops
ALLOWED_GROWTH = 40 * MiB  # RSS the proxy may gain during an attack (the budget is 16 MiB)
TIMEOUT = 3.0  # --header-timeout and --body-timeout of the firewalls here
INSERT = "INSERT INTO ks.t (a, b) VALUES (1, ?)"
SECRET = "INSERT INTO ks.secret (a, b) VALUES (1, ?)"
PROTOCOL_ERROR = 0x000A

CQL_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cql}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        l7proto: cassandra
        l7:
        - {{query_action: insert, query_table: "ks\\\\.t"}}
        - {{query_action: select, query_table: "ks\\\\.t"}}
"""
KAFKA_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: kafka}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        kafka:
        - {{role: produce, topicPrefix: "orders"}}
"""


@pytest.fixture(autouse=True)
def quiet_driver():
    logging.getLogger("cassandra").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- the upstream


class Sink:
    """An upstream that reads everything and answers nothing; counts per connection."""

    def __init__(self) -> None:
        self.received: list[int] = []  # bytes, per connection, in the order accepted
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.received.append(0)
            threading.Thread(
                target=self._drain, args=(conn, len(self.received) - 1), daemon=True
            ).start()

    def _drain(self, conn: socket.socket, i: int) -> None:
        with conn:
            try:
                while chunk := conn.recv(1 << 20):
                    self.received[i] += len(chunk)
            except OSError:
                pass

    def wait_for(self, total: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while sum(self.received) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        return sum(self.received) >= total

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@contextmanager
def firewall(policy: str, upstream_port: int, *extra: str) -> Iterator[RunningFirewall]:
    with running_firewall(
        policy.format(port=upstream_port),
        ("127.0.0.1", upstream_port),
        {"app": "api"},
        extra_args=["--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT), *extra],
    ) as fw:
        yield fw


# --------------------------------------------------------------------------- memory


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextmanager
def peak_growth(fw: RunningFirewall) -> Iterator[list[int]]:
    """Yields a list that holds, once the block is done, how far the proxy's peak
    resident size rose above its resident size at the start."""
    pid = fw.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from here
    before = status(pid, "VmRSS")
    growth: list[int] = []
    yield growth
    growth.append(status(pid, "VmHWM") - before)


# --------------------------------------------------------------------------- clients


def cql(message, stream: int) -> bytes:
    return ProtocolHandler.encode_message(message, stream, 4, None, False)


def query(text: str, stream: int, value_size: int) -> bytes:
    message = QueryMessage(text, ConsistencyLevel.ONE)
    message.query_params = [b"v" * value_size]
    return cql(message, stream)


def batch(stream: int, value_size: int) -> bytes:
    return cql(BatchMessage(BatchType.LOGGED, [(False, INSERT, [b"v" * value_size])], 1), stream)


def two_topic_produce(size: int) -> bytes:
    P = ProduceRequest
    topics = [
        P.TopicProduceData(
            name=name,
            partition_data=[P.TopicProduceData.PartitionProduceData(index=0, records=b"r" * size)],
        )
        for name in ("orders", "orders.audit")
    ]
    request = P[9](acks=1, timeout_ms=1000, transactional_id=None, topic_data=topics)
    request.with_header(correlation_id=1, client_id="hog")
    return bytes(request.encode(version=9, header=True, framed=True))


class Attacker:
    """Sends ``data`` (most of one frame) in a thread and stops there; then reads what
    comes back until the proxy closes or ``until`` passes."""

    def __init__(self, fw: RunningFirewall, data: bytes):
        self.sock = socket.create_connection(fw.address, timeout=10)
        self.port = self.sock.getsockname()[1]
        self.data = data
        self.reply = b""
        self.closed_after: float | None = None
        self._thread = threading.Thread(target=self._send, daemon=True)
        self.start = time.monotonic()
        self._thread.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.data)  # blocks while the proxy does not read us
        except OSError:
            pass

    def wait_for_close(self, until: float) -> None:
        while (left := until - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_after = time.monotonic() - self.start
                return
            self.reply += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a sendall still blocked
        self.sock.close()
        self._thread.join(5)


def attack(fw: RunningFirewall, frames: list[bytes], wait: float) -> list[Attacker]:
    attackers = [Attacker(fw, data) for data in frames]
    until = time.monotonic() + wait
    for a in attackers:
        a.wait_for_close(until)
    return attackers


def limit_records(fw: RunningFirewall, limit: str, wait_for: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:  # the firewall flushes its flow log once a second
        found = [r for r in fw.flows() if r.get("type") == "limit" and r["limit"] == limit]
        if len(found) >= wait_for or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def warm_up_cql(fw: RunningFirewall, sink: Sink) -> None:
    """One small request, so that the engine's modules are loaded before we measure."""
    before = sum(sink.received)
    frame = query(INSERT, 0, 10)
    with socket.create_connection(fw.address, timeout=5) as s:
        s.sendall(frame)
        assert sink.wait_for(before + len(frame), 5)


# --------------------------------------------------------------------------- CQL


def test_clients_sending_most_of_a_large_query_make_the_proxy_hold_nothing(sink: Sink) -> None:
    allowed, denied = query(INSERT, 1, FRAME), query(SECRET, 2, FRAME)
    with firewall(CQL_POLICY, sink.port, "--max-held-bytes", "16M") as fw:
        warm_up_cql(fw, sink)
        before = sum(sink.received)
        with peak_growth(fw) as growth:
            attackers = [Attacker(fw, f[:SENT]) for f in (allowed, allowed, denied)]
            streamed = sink.wait_for(before + 2 * SENT, timeout=20)
        for a in attackers:
            a.close()

    assert streamed, "the two allowed queries' values reached the server as they came"
    assert growth[0] < ALLOWED_GROWTH, f"the proxy grew by {growth[0] / MiB:.0f} MiB"


def test_a_batch_past_the_held_limit_is_refused_on_its_stream_at_once(sink: Sink) -> None:
    with firewall(CQL_POLICY, sink.port) as fw:
        [attacker] = attack(fw, [batch(7, FRAME)[:SENT]], wait=2.0)
        attacker.close()

    assert attacker.closed_after is not None and attacker.closed_after < 2.0
    [envelope] = client_envelopes(attacker.reply, 4)
    message = envelope.decode()
    assert isinstance(message, ErrorMessage) and envelope.stream == 7
    assert message.code == PROTOCOL_ERROR and "the most held for one request" in message.message
    [record] = limit_records(fw, "max_held_frame", 1)
    assert (record["protocol"], record["source"]["port"]) == ("cassandra", attacker.port)
    assert sum(sink.received) == 0


def test_frames_held_by_many_clients_stay_within_the_budget_and_their_deadlines_end_them(
    sink: Sink,
) -> None:
    held = batch(3, 15 * MiB)  # under the 16 MiB held for one request: held whole
    with firewall(CQL_POLICY, sink.port, "--max-held-bytes", "16M") as fw:
        warm_up_cql(fw, sink)
        with peak_growth(fw) as growth:
            attackers = attack(fw, [held[: 14 * MiB]] * 5, wait=TIMEOUT + 2)
        # Meanwhile and after, others are served.
        before = sum(sink.received)
        legit = query(INSERT, 4, 100)
        with socket.create_connection(fw.address, timeout=5) as s:
            s.sendall(legit)
            served = sink.wait_for(before + len(legit), 5)
        paused = limit_records(fw, "max_held_bytes", 1)
        cut = limit_records(fw, "header_timeout", len(attackers))
        for a in attackers:
            a.close()

    assert growth[0] < ALLOWED_GROWTH, f"the proxy grew by {growth[0] / MiB:.0f} MiB"
    assert all(a.closed_after is not None for a in attackers), "every hog is cut"
    assert paused and all(r["verdict"] == "PAUSED" for r in paused)
    assert {r["source"]["port"] for r in cut} >= {a.port for a in attackers}
    assert served


# --------------------------------------------------------------------------- Kafka


def test_kafka_clients_sending_most_of_a_request_that_must_be_held_are_closed(
    sink: Sink,
) -> None:
    produce = two_topic_produce(FRAME // 2)  # two topics: read whole to be judged
    with firewall(KAFKA_POLICY, sink.port) as fw:
        with peak_growth(fw) as growth:
            attackers = attack(fw, [produce[:SENT]] * 3, wait=2.0)
        records = limit_records(fw, "max_held_frame", 3)
        for a in attackers:
            a.close()

    assert all(a.closed_after is not None and a.reply == b"" for a in attackers)
    assert {r["source"]["port"] for r in records} == {a.port for a in attackers}
    assert growth[0] < ALLOWED_GROWTH, f"the proxy grew by {growth[0] / MiB:.0f} MiB"
    assert sum(sink.received) == 0


def test_kafka_frames_held_by_many_clients_stay_within_the_budget(sink: Sink) -> None:
    produce = two_topic_produce(7 * MiB)  # 14 MiB: held whole
    with firewall(KAFKA_POLICY, sink.port, "--max-held-bytes", "16M") as fw:
        with peak_growth(fw) as growth:
            attackers = attack(fw, [produce[: 13 * MiB]] * 5, wait=TIMEOUT + 2)
        paused = limit_records(fw, "max_held_bytes", 1)
        for a in attackers:
            a.close()

    assert growth[0] < ALLOWED_GROWTH, f"the proxy grew by {growth[0] / MiB:.0f} MiB"
    assert all(a.closed_after is not None for a in attackers), "every hog is cut"
    assert paused


# --------------------------------------------------------------------------- CQL, intact


@contextmanager
def proxied_double() -> Iterator[tuple[object, RunningFirewall]]:
    with running_cql_double() as double:
        with running_firewall(
            CQL_E2E_POLICY.format(port=double.port),
            (double.host, double.port),
            {"app": "cassandra"},
        ) as fw:
            yield double, fw


@pytest.mark.parametrize(
    "version, compression",
    [
        pytest.param(4, False, id="v4"),
        pytest.param(5, False, id="v5"),
        pytest.param(5, "lz4", id="v5-lz4"),
    ],
)
def test_a_large_prepared_insert_goes_through_intact_and_the_session_carries_on(
    version, compression
):
    value = bytes(range(256)) * (24 * MiB // 256)  # more than is ever held: it must stream
    options = {"protocol_version": version, "compression": compression}
    with proxied_double() as (double, fw), session_to(fw, **options) as (_, s):
        s.execute(KEYSPACE)
        s.execute("CREATE TABLE ks.t (a int PRIMARY KEY, b blob)")
        insert = s.prepare("INSERT INTO ks.t (a, b) VALUES (?, ?)")
        s.execute(insert, (1, value), timeout=30)  # one EXECUTE of 24 MiB
        [row] = s.execute("SELECT b FROM ks.t WHERE a = 1", timeout=30)
        with pytest.raises(Unauthorized):
            s.execute("INSERT INTO ks.secret (a, b) VALUES (2, 'x')")
        assert list(s.execute("SELECT a FROM ks.t WHERE a = 1")) != []

    assert row.b == value
    assert not [st for st in double.statements() if "secret" in st]


def test_large_queries_with_bound_values_pass_or_are_answered_on_their_stream():
    value = bytes(range(256)) * (24 * MiB // 256)
    with proxied_double() as (double, fw):
        with socket.create_connection(fw.address, timeout=10) as s:
            s.sendall(cql(StartupMessage("3.4.5", {"CQL_VERSION": "3.4.5"}), 0))
            assert read_envelopes(s, 1)[0].opcode == 0x02  # READY
            for stream, text in [
                (1, KEYSPACE),
                (2, "CREATE TABLE ks.t (a int PRIMARY KEY, b blob)"),
            ]:
                s.sendall(cql(QueryMessage(text, ConsistencyLevel.ONE), stream))
                read_envelopes(s, 1)
            allowed = cql_query_with(INSERT, 4, value)
            denied = cql_query_with(SECRET, 5, value)
            s.sendall(allowed + denied)
            answers = {e.stream: e for e in read_envelopes(s, 2)}

        assert answers[4].opcode == 0x08  # RESULT: the server had all of it
        # Decoded with the driver's own codec; its 24 MiB were dropped as they came.
        assert_unauthorized(answers[5].raw, 4, stream=5, message_contains="ks.secret")
        assert not [st for st in double.statements() if "secret" in st]
        assert double.store.table("ks", "t").rows[(1,)]["b"] == value


def cql_query_with(text: str, stream: int, value: bytes) -> bytes:
    message = QueryMessage(text, ConsistencyLevel.ONE)
    message.query_params = [value]
    return cql(message, stream)


class _Read:
    def __init__(self, envelope, raw: bytes):
        self.stream, self.opcode, self.raw = envelope.stream, envelope.opcode, raw


def read_envelopes(s: socket.socket, count: int, timeout: float = 30.0) -> list[_Read]:
    """``count`` whole envelopes from the proxy (v4, uncompressed), each with its bytes."""
    data = b""
    found: list[_Read] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        while len(data) >= 9 and len(data) >= 9 + struct.unpack_from(">I", data, 5)[0]:
            size = 9 + struct.unpack_from(">I", data, 5)[0]
            raw, data = data[:size], data[size:]
            [envelope] = client_envelopes(raw, 4)
            found.append(_Read(envelope, raw))
        if len(found) >= count:
            break
        left = deadline - time.monotonic()
        assert left > 0 and select.select([s], [], [], left)[0], "no answer in time"
        chunk = s.recv(1 << 20)
        assert chunk, "closed"
        data += chunk
    return found
