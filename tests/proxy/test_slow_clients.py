"""Slow clients (slowloris) against the real ``l7proxy firewall``: issue 14, findings 3 and 9.

A client that trickles its request head one byte at a time, or sends part of a
head, frame or body and goes silent, once held its connection for as long as it
liked: the header timeout restarted on every byte, a CQL frame's body and every
request body had no timeout at all. Now a head (an HTTP/1.1 request head, an
HTTP/2 header block, a Kafka or CQL frame) must be complete ``--header-timeout``
after its first byte, and a body may not go ``--body-timeout`` without a byte.

Each test is a real client on loopback, reading what comes back off the wire.
The firewalls run with both timeouts at 1 s; the cut must come within SLACK of
the deadline.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h2.events as ev
import pytest
from cassandra.protocol import ProtocolHandler, QueryMessage, StartupMessage
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import ProduceRequest

from tests.proxy.test_metrics import metrics_url, scrape, value
from tests.support.firewall import GET_ONLY_POLICY, RunningFirewall, running_firewall

TIMEOUT = 1.0  # --header-timeout and --body-timeout of every firewall here
SLACK = 1.0  # the most the cut may come after its deadline on a busy machine
TRICKLE = 0.2  # seconds between two bytes of a trickling client: well inside the old timeout

GET = b"GET /v1/items HTTP/1.1\r\nHost: api\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n"
    b"Connection: close\r\n\r\nRequest Timeout"
)

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
        - {{role: produce, topic: orders}}
"""
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
        - {{query_action: select, query_table: "ks\\\\..*"}}
"""


# --------------------------------------------------------------------------- the upstream


@dataclass
class Upstream:
    """One connection the proxy opened to the upstream: what it sent, and whether it closed."""

    received: bytes = b""
    ended: threading.Event = field(default_factory=threading.Event)


class RecordingUpstream:
    """Records every connection the proxy opens; answers each complete HTTP/1.1 request
    (head, and a Content-Length body) with OK, and nothing else at all."""

    def __init__(self) -> None:
        self.connections: list[Upstream] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            seen = Upstream()
            self.connections.append(seen)
            threading.Thread(target=self._serve, args=(conn, seen), daemon=True).start()

    def _serve(self, conn: socket.socket, seen: Upstream) -> None:
        with conn:
            conn.settimeout(30)
            unanswered = b""
            try:
                while chunk := conn.recv(65536):
                    seen.received += chunk
                    unanswered += chunk
                    while (request := _complete_http_request(unanswered)) is not None:
                        unanswered = unanswered[request:]
                        conn.sendall(OK)
            except OSError:
                pass
            seen.ended.set()

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        self._thread.join(5)


def _complete_http_request(data: bytes) -> int | None:
    """The length of the HTTP/1.1 request at the start of ``data``, if it is all there."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data[:1].isalpha() or data.startswith(b"PRI * HTTP/2.0"):
        return None
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, val = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(val)
    total = end + 4 + length
    return total if len(data) >= total else None


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as up:
        yield up


def firewall_for(policy: str, upstream: RecordingUpstream, *extra: str):
    return running_firewall(
        policy.format(port=upstream.port),
        ("127.0.0.1", upstream.port),
        {"app": "api"},
        extra_args=["--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT), *extra],
    )


@pytest.fixture(scope="module")
def http_fw(upstream: RecordingUpstream) -> Iterator[tuple[RunningFirewall, str]]:
    with firewall_for(GET_ONLY_POLICY, upstream, "--metrics", "127.0.0.1:0") as fw:
        yield fw, metrics_url(fw)


@pytest.fixture(scope="module")
def kafka_fw(upstream: RecordingUpstream) -> Iterator[RunningFirewall]:
    with firewall_for(KAFKA_POLICY, upstream) as fw:
        yield fw


@pytest.fixture(scope="module")
def cql_fw(upstream: RecordingUpstream) -> Iterator[RunningFirewall]:
    with firewall_for(CQL_POLICY, upstream) as fw:
        yield fw


# --------------------------------------------------------------------------- the client


@dataclass
class Ending:
    """What a client read before the proxy closed, and how long after its first byte it closed
    (None: still open when the client stopped waiting); ``port`` is the client's own."""

    reply: bytes
    closed_after: float | None
    port: int


def trickle(sock: socket.socket, data: bytes | list[bytes], every: float = TRICKLE) -> Ending:
    """Send ``data`` one byte (or one of its pieces) every ``every`` seconds, reading
    meanwhile; stop when the proxy closes. Then wait (bounded) for the proxy to close."""
    pieces = [data[i : i + 1] for i in range(len(data))] if isinstance(data, bytes) else data
    start = time.monotonic()
    reply = b""
    for piece in pieces:
        sock.sendall(piece)
        until = time.monotonic() + every
        while (left := until - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return Ending(reply, time.monotonic() - start, sock.getsockname()[1])
                reply += chunk
    return wait_for_close(sock, start, reply)


def wait_for_close(
    sock: socket.socket, start: float, reply: bytes = b"", limit: float = TIMEOUT + 2 * SLACK
) -> Ending:
    while (left := start + limit - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        chunk = sock.recv(65536)
        if not chunk:
            return Ending(reply, time.monotonic() - start, sock.getsockname()[1])
        reply += chunk
    return Ending(reply, None, sock.getsockname()[1])


def say_then_wait(fw: RunningFirewall, said: bytes) -> Ending:
    with socket.create_connection(fw.address, timeout=5) as s:
        start = time.monotonic()
        s.sendall(said)
        return wait_for_close(s, start)


def cut_at_the_deadline(ending: Ending) -> bool:
    return ending.closed_after is not None and TIMEOUT <= ending.closed_after < TIMEOUT + SLACK


def limit_record(fw: RunningFirewall, ending: Ending) -> dict:
    """The flow record of the limit that cut the client of ``ending``."""
    deadline = time.monotonic() + 5
    while True:  # the firewall flushes its flow log once a second
        found = [
            r for r in fw.flows() if r.get("type") == "limit" and r["source"]["port"] == ending.port
        ]
        if found or time.monotonic() > deadline:
            [record] = found
            return record
        time.sleep(0.1)


def header_cuts(metrics: str) -> float:
    samples = scrape(metrics)
    name = "l7proxy_proxy_limit_exceeded_total"
    return value(samples, name, limit="header_timeout", protocol="http") or 0.0


def new_connections(upstream: RecordingUpstream, before: int) -> list[Upstream]:
    return upstream.connections[before:]


# --------------------------------------------------------------------------- HTTP/1.1


def test_a_head_trickled_one_byte_at_a_time_gets_408_and_a_close_at_its_deadline(
    http_fw: tuple[RunningFirewall, str], upstream: RecordingUpstream
) -> None:
    fw, _ = http_fw
    before = len(upstream.connections)
    with socket.create_connection(fw.address, timeout=5) as s:
        ending = trickle(s, GET)  # 37 bytes, 7.4 s; each one well inside 1 s of the last

    assert ending.reply == REQUEST_TIMEOUT
    assert cut_at_the_deadline(ending), ending.closed_after
    assert new_connections(upstream, before) == []  # nothing of it reached the server


def test_a_silent_partial_head_gets_408_a_close_a_flow_record_and_a_metric(
    http_fw: tuple[RunningFirewall, str],
) -> None:
    fw, metrics = http_fw
    cuts = header_cuts(metrics)

    ending = say_then_wait(fw, b"GET /v1/silent HTTP/1.1\r\nHost: ap")

    assert ending.reply == REQUEST_TIMEOUT
    assert cut_at_the_deadline(ending), ending.closed_after
    record = limit_record(fw, ending)
    assert (record["limit"], record["verdict"], record["protocol"]) == (
        "header_timeout",
        "DROPPED",
        "http",
    )
    assert record["reason"] == "request head not complete 1 s after its first byte"
    assert header_cuts(metrics) == cuts + 1


def test_a_stalled_body_is_closed_on_both_sides(
    http_fw: tuple[RunningFirewall, str], upstream: RecordingUpstream
) -> None:
    fw, _ = http_fw
    before = len(upstream.connections)
    head = b"GET /v1/upload HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n"

    ending = say_then_wait(fw, head + b"0123456789")

    assert ending.reply == b""  # the server has the head: no second answer
    assert cut_at_the_deadline(ending), ending.closed_after
    [server_side] = new_connections(upstream, before)
    assert server_side.ended.wait(2), "the proxy left the server's side open"
    assert server_side.received == head + b"0123456789"
    record = limit_record(fw, ending)
    assert (record["limit"], record["reason"]) == (
        "body_timeout",
        "no byte of the request body for 1 s",
    )
    [request] = [f for f in fw.flows() if f.get("l7", {}).get("path") == "/v1/upload"]
    assert request["reply"] == {"closed": "body_timeout"}


def test_a_slow_client_within_its_deadlines_is_served(
    http_fw: tuple[RunningFirewall, str],
) -> None:
    # A control: slow, but never late. It passed before too, and must still pass.
    fw, _ = http_fw
    with socket.create_connection(fw.address, timeout=5) as s:
        for i in range(len(GET)):  # the whole head in 0.74 s
            s.sendall(GET[i : i + 1])
            time.sleep(0.02)
        assert s.recv(65536) == OK
        s.sendall(b"GET /v1/body HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\n\r\n")
        for byte in b"abc":  # 1.8 s of body, never 1 s without a byte
            time.sleep(0.6)
            s.sendall(bytes([byte]))
        assert s.recv(65536) == OK
        time.sleep(TIMEOUT + 0.3)  # idle between requests: not a head's time
        s.sendall(GET)
        assert s.recv(65536) == OK


# --------------------------------------------------------------------------- HTTP/2


def h2_client() -> H2Connection:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


def h2_headers(client: H2Connection, *, pieces: int) -> list[bytes]:
    """A GET's header block on stream 1: one HEADERS frame (``pieces`` 1), or a HEADERS
    frame and ``pieces - 1`` CONTINUATION frames, a byte of the block each."""
    block = client.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api"), (b":path", b"/v1/x")]
    )

    def frame(kind: int, flags: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big") + bytes([kind, flags]) + b"\x00\x00\x00\x01" + payload
        )

    if pieces == 1:
        return [frame(0x1, 0x5, block)]  # HEADERS, END_STREAM | END_HEADERS
    cut = len(block) - (pieces - 1)
    frames = [frame(0x1, 0x1, block[:cut])]  # HEADERS, END_STREAM; END_HEADERS still to come
    for i in range(cut, len(block)):
        frames.append(frame(0x9, 0x4 if i == len(block) - 1 else 0x0, block[i : i + 1]))
    return frames


@pytest.mark.parametrize("how", ["HEADERS frame byte by byte", "CONTINUATION frames one by one"])
def test_an_h2_header_block_trickled_gets_goaway_and_a_close_at_its_deadline(
    http_fw: tuple[RunningFirewall, str], how: str
) -> None:
    fw, _ = http_fw
    client = h2_client()
    with socket.create_connection(fw.address, timeout=5) as s:
        s.sendall(client.data_to_send())  # preface and SETTINGS
        if how == "HEADERS frame byte by byte":
            ending = trickle(s, h2_headers(client, pieces=1)[0])
        else:
            ending = trickle(s, h2_headers(client, pieces=12))  # a whole frame every 0.2 s

    events = client.receive_data(ending.reply)
    [goaway] = [e for e in events if type(e) is ev.ConnectionTerminated]
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, 0)
    assert goaway.additional_data == b"header_timeout"
    assert cut_at_the_deadline(ending), ending.closed_after


# --------------------------------------------------------------------------- Kafka


def kafka_metadata_request() -> bytes:
    request = MetadataRequest[4](topics=None, allow_auto_topic_creation=False)
    request.with_header(correlation_id=1, client_id="slowloris")
    return bytes(request.encode(version=4, header=True, framed=True))


def test_a_kafka_frame_trickled_is_closed_at_its_deadline(
    kafka_fw: RunningFirewall, upstream: RecordingUpstream
) -> None:
    before = len(upstream.connections)
    with socket.create_connection(kafka_fw.address, timeout=5) as s:
        ending = trickle(s, kafka_metadata_request())  # 31 bytes, 6.2 s

    assert ending.reply == b""  # Kafka has no answer for a request that never came
    assert cut_at_the_deadline(ending), ending.closed_after
    assert new_connections(upstream, before) == []
    assert limit_record(kafka_fw, ending)["limit"] == "header_timeout"


def test_a_large_produce_whose_rest_stalls_is_closed_on_both_sides(
    kafka_fw: RunningFirewall, upstream: RecordingUpstream
) -> None:
    P = ProduceRequest
    partition = P.TopicProduceData.PartitionProduceData(index=0, records=b"r" * 100_000)
    produce = P[9](
        acks=1,
        timeout_ms=1000,
        transactional_id=None,
        topic_data=[P.TopicProduceData(name="orders", partition_data=[partition])],
    )
    produce.with_header(correlation_id=7, client_id="stalls")
    wire = bytes(produce.encode(version=9, header=True, framed=True))
    before = len(upstream.connections)

    ending = say_then_wait(kafka_fw, wire[:70_000])  # judged on its first bytes, then silence

    assert ending.reply == b""
    assert cut_at_the_deadline(ending), ending.closed_after
    [server_side] = new_connections(upstream, before)
    assert server_side.ended.wait(2), "the proxy left the broker's side open"
    assert server_side.received == wire[:70_000]
    assert limit_record(kafka_fw, ending)["limit"] == "body_timeout"


# --------------------------------------------------------------------------- CQL


def cql(message, stream: int) -> bytes:
    return ProtocolHandler.encode_message(message, stream, 4, None, False)


def test_a_cql_frame_trickled_is_closed_at_its_deadline(
    cql_fw: RunningFirewall, upstream: RecordingUpstream
) -> None:
    before = len(upstream.connections)
    startup = cql(StartupMessage("3.4.5", {"CQL_VERSION": "3.4.5"}), 0)
    with socket.create_connection(cql_fw.address, timeout=5) as s:
        ending = trickle(s, startup)  # 31 bytes, 6.2 s

    assert ending.reply == b""  # CQL has no answer for a request that never came
    assert cut_at_the_deadline(ending), ending.closed_after
    assert new_connections(upstream, before) == []


def test_a_cql_frame_whose_body_stalls_is_closed_at_its_deadline(
    cql_fw: RunningFirewall, upstream: RecordingUpstream
) -> None:
    before = len(upstream.connections)
    query = cql(QueryMessage("SELECT * FROM ks.t", 1), 1)

    ending = say_then_wait(cql_fw, query[:15])  # the 9-byte header and 6 bytes of the body

    assert ending.reply == b""
    assert cut_at_the_deadline(ending), ending.closed_after
    assert new_connections(upstream, before) == []
    record = limit_record(cql_fw, ending)
    assert (record["limit"], record["protocol"]) == ("header_timeout", "cassandra")
