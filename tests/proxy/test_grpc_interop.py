"""Real grpcio client -> l7proxy firewall (H2Engine) -> real grpcio interop TestService.

Each scenario runs twice, directly against the server and through the
firewall, and the results must be identical; values the interop spec fixes
(payload sizes, echoed metadata, status codes) are checked as well. The whole
matrix runs twice: in cleartext, and with the client's TLS terminated by the
firewall (grpcio's TLS credentials, ALPN h2, a certificate made by the test).
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")

from tests.support.firewall import running_firewall  # noqa: E402
from tests.support.grpc_interop import (  # noqa: E402
    ECHO_INITIAL,
    ECHO_TRAILING,
    RUNNING_SERVERS,
    channel_for,
    interop,
    interop_server,
    stub_for,
)
from tests.support.tls import make_pki  # noqa: E402

LABELS = {"app": "interop"}
# Everything in TestService except CacheableUnaryCall (and nothing from other services).
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: grpc-interop}}
spec:
  endpointSelector: {{matchLabels: {{app: interop}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            grpc:
              - service: grpc.testing.TestService
                method: "(Empty|Unary|Unimplemented)Call"
              - service: grpc.testing.TestService
                method: ".*(Output|Input|Duplex)Call"
"""


@pytest.fixture(scope="module")
def pb():
    return interop()


TLS_NAME = "interop.example.com"


@pytest.fixture(scope="module", params=["cleartext", "tls"])
def targets(request, pb, tmp_path_factory):
    """The interop server, and the firewall in front of it: cleartext, or terminating
    the client's TLS (the server behind it speaks cleartext HTTP/2)."""
    tls, args = None, []
    if request.param == "tls":
        pki = make_pki(tmp_path_factory.mktemp("pki"), [TLS_NAME])
        tls = (pki.ca.read_bytes(), TLS_NAME)
        args = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    with (
        interop_server() as port,
        running_firewall(
            POLICY.format(port=port), ("127.0.0.1", port), LABELS, extra_args=args
        ) as fw,
    ):
        direct_channel, direct = stub_for("127.0.0.1", port)
        proxy_channel, proxied = stub_for(fw.host, fw.port, tls=tls)

        def channel(**kwargs):
            """Another channel to the firewall, as the client of this run speaks."""
            return channel_for(fw.host, fw.port, tls=tls, **kwargs)

        try:
            yield {
                "direct": direct,
                "proxy": proxied,
                "firewall": fw,
                "port": port,
                "tls": tls is not None,
                "channel": channel,
            }
        finally:
            direct_channel.close()
            proxy_channel.close()


def both(targets, scenario):
    """Run ``scenario(stub)`` direct and through the proxy; they must agree."""
    direct = scenario(targets["direct"])
    proxied = scenario(targets["proxy"])
    assert proxied == direct
    return proxied


def outcome(fn):
    """(code name, details) of a call that may fail, or ("OK", value)."""
    try:
        return "OK", fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def test_empty_and_unary(targets, pb):
    m = pb.messages_pb2

    def scenario(stub):
        empty = stub.EmptyCall(pb.empty_pb2.Empty(), timeout=10)
        reply = stub.UnaryCall(
            m.SimpleRequest(response_size=314159, payload=m.Payload(body=b"\x00" * 271828)),
            timeout=10,
        )
        return empty.SerializeToString(), len(reply.payload.body)

    assert both(targets, scenario) == (b"", 314159)


def test_large_messages_both_ways(targets, pb):
    m = pb.messages_pb2
    size = 8 * 1024 * 1024

    def scenario(stub):
        reply = stub.UnaryCall(
            m.SimpleRequest(response_size=size, payload=m.Payload(body=b"\x07" * size)), timeout=60
        )
        return len(reply.payload.body), set(reply.payload.body)

    assert both(targets, scenario) == (size, {0})


def test_server_streaming(targets, pb):
    m = pb.messages_pb2
    sizes = [31415, 9, 2653, 58979]

    def scenario(stub):
        request = m.StreamingOutputCallRequest(
            response_parameters=[m.ResponseParameters(size=s) for s in sizes]
        )
        return [len(r.payload.body) for r in stub.StreamingOutputCall(request, timeout=10)]

    assert both(targets, scenario) == sizes


def test_client_streaming(targets, pb):
    m = pb.messages_pb2
    sizes = [27182, 8, 1828, 45904]

    def scenario(stub):
        requests = (m.StreamingInputCallRequest(payload=m.Payload(body=b"\x00" * s)) for s in sizes)
        return stub.StreamingInputCall(requests, timeout=10).aggregated_payload_size

    assert both(targets, scenario) == 74922


def test_bidi_ping_pong(targets, pb):
    m = pb.messages_pb2
    sizes = [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]

    def scenario(stub):
        outbox: queue.Queue = queue.Queue()
        responses = stub.FullDuplexCall(iter(outbox.get, None), timeout=10)
        got = []
        for response_size, payload_size in sizes:
            outbox.put(
                m.StreamingOutputCallRequest(
                    response_parameters=[m.ResponseParameters(size=response_size)],
                    payload=m.Payload(body=b"\x00" * payload_size),
                )
            )
            got.append(len(next(responses).payload.body))  # one answer before the next request
        outbox.put(None)
        assert list(responses) == []
        return got

    assert both(targets, scenario) == [s for s, _ in sizes]


def test_custom_and_binary_metadata_round_trip(targets, pb):
    m = pb.messages_pb2
    metadata = (
        (ECHO_INITIAL, "test_initial_metadata_value"),
        (ECHO_TRAILING, b"\xab\xab\xab"),
        ("x-other", "ignored"),
    )

    def scenario(stub):
        reply, call = stub.UnaryCall.with_call(
            m.SimpleRequest(response_size=1), metadata=metadata, timeout=10
        )
        initial = [(k, v) for k, v in call.initial_metadata() if k.startswith("x-grpc-test")]
        trailing = [(k, v) for k, v in call.trailing_metadata() if k.startswith("x-grpc-test")]
        return initial, trailing

    initial, trailing = both(targets, scenario)
    assert initial == [(ECHO_INITIAL, "test_initial_metadata_value")]
    assert trailing == [(ECHO_TRAILING, b"\xab\xab\xab")]


@pytest.mark.parametrize(
    "code, message",
    [
        (2, "test status message"),
        (5, "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"),
        (8, "resource exhausted"),
    ],
)
def test_status_codes_and_messages_are_echoed(targets, pb, code, message):
    m = pb.messages_pb2

    def scenario(stub):
        request = m.SimpleRequest(response_status=m.EchoStatus(code=code, message=message))
        return outcome(lambda: stub.UnaryCall(request, timeout=10))

    name, details = both(targets, scenario)
    assert grpc.StatusCode[name].value[0] == code
    assert details == message


def test_unimplemented_method_status(targets, pb):
    assert (
        both(
            targets,
            lambda stub: outcome(lambda: stub.UnimplementedCall(pb.empty_pb2.Empty(), timeout=10)),
        )[0]
        == "UNIMPLEMENTED"
    )


def test_deadline_exceeded(targets, pb):
    m = pb.messages_pb2
    request = m.StreamingOutputCallRequest(
        response_parameters=[m.ResponseParameters(size=1, interval_us=2_000_000)]
    )

    def scenario(stub):
        return outcome(lambda: list(stub.StreamingOutputCall(request, timeout=0.3)))[0]

    assert both(targets, scenario) == "DEADLINE_EXCEEDED"


def test_cancellation_then_channel_still_works(targets, pb):
    m = pb.messages_pb2

    def scenario(stub):
        outbox: queue.Queue = queue.Queue()
        call = stub.FullDuplexCall(iter(outbox.get, None), timeout=10)
        outbox.put(m.StreamingOutputCallRequest(response_parameters=[m.ResponseParameters(size=5)]))
        first = len(next(call).payload.body)
        call.cancel()
        outbox.put(None)
        after = stub.EmptyCall(pb.empty_pb2.Empty(), timeout=10).SerializeToString()
        return first, call.code().name, after

    assert both(targets, scenario) == (5, "CANCELLED", b"")


def test_many_concurrent_calls_on_one_channel(targets, pb):
    m = pb.messages_pb2

    def scenario(stub):
        calls = [
            stub.UnaryCall.future(m.SimpleRequest(response_size=i * 97), timeout=30)
            for i in range(200)
        ]
        return [len(c.result().payload.body) for c in calls]

    assert both(targets, scenario) == [i * 97 for i in range(200)]


def test_concurrent_streams_from_threads(targets, pb):
    m = pb.messages_pb2

    def one(stub, i):
        request = m.StreamingOutputCallRequest(
            response_parameters=[m.ResponseParameters(size=i * 1000 + j) for j in range(5)]
        )
        return [len(r.payload.body) for r in stub.StreamingOutputCall(request, timeout=30)]

    def scenario(stub):
        with futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda i: one(stub, i), range(40)))

    assert both(targets, scenario)[39] == [39000 + j for j in range(5)]


def test_denied_method_is_permission_denied_and_others_keep_working(targets, pb):
    m = pb.messages_pb2
    fw = targets["firewall"]
    stub = targets["proxy"]
    before = len(fw.flows())
    results = []
    for _ in range(3):
        results.append(
            outcome(lambda: stub.CacheableUnaryCall(m.SimpleRequest(response_size=5), timeout=10))
        )
        results.append(
            outcome(
                lambda: len(
                    stub.UnaryCall(m.SimpleRequest(response_size=5), timeout=10).payload.body
                )
            )
        )
    denied = [r for r in results[::2]]
    assert all(code == "PERMISSION_DENIED" for code, _ in denied)
    assert "grpc-interop" in denied[0][1]
    assert results[1::2] == [("OK", 5)] * 3
    # And directly, the method works: it is the proxy that refused it.
    assert (
        len(
            targets["direct"]
            .CacheableUnaryCall(m.SimpleRequest(response_size=5), timeout=10)
            .payload.body
        )
        == 5
    )

    # The flow log is written asynchronously: earlier tests' records may land after ``before``.
    records = fw.wait_flows(
        lambda r: r.get("l7", {}).get("method") in ("CacheableUnaryCall", "UnaryCall"),
        count=6,
        since=before,
    )
    verdicts = [(r["l7"]["method"], r["verdict"]) for r in records]
    assert verdicts.count(("CacheableUnaryCall", "DENIED")) == 3
    assert verdicts.count(("UnaryCall", "FORWARDED")) >= 3
    denied_reply = next(r["reply"] for r in records if r["verdict"] == "DENIED")
    assert denied_reply["grpc_status"] == 7
    if targets["tls"]:  # the denial was sent inside the client's TLS session
        assert {(r["tls"]["sni"], r["tls"]["alpn"]) for r in records} == {(TLS_NAME, "h2")}
    else:
        assert all("tls" not in r for r in records)
    ok_reply = [r["reply"] for r in records if r["verdict"] == "FORWARDED"][-1]
    assert (
        ok_reply["status"],
        ok_reply["grpc_status"],
        ok_reply["request_messages"],
        ok_reply["response_messages"],
    ) == (200, 0, 1, 1)


def test_denied_client_stream_body_never_reaches_server(targets, pb):
    """A denied streaming call gets PERMISSION_DENIED even while the client keeps sending."""
    m = pb.messages_pb2
    stop = threading.Event()

    chunk = m.StreamingOutputCallRequest(payload=m.Payload(body=b"\x00" * 1000)).SerializeToString()

    def endless():
        for _ in range(100_000):
            if stop.is_set():
                return
            yield chunk

    # Deny-by-omission: HalfDuplexCall matches ".*(Output|Input|Duplex)Call", so use another
    # service.
    channel = targets["channel"]()
    try:
        call = channel.stream_stream("/grpc.testing.OtherService/Chat")(endless(), timeout=10)
        code = outcome(lambda: list(call))[0]
        stop.set()
        # The channel is still usable for allowed calls after the refusal.
        ok = channel.unary_unary("/grpc.testing.TestService/EmptyCall")(b"", timeout=10)
    finally:
        stop.set()
        channel.close()
    assert code == "PERMISSION_DENIED"
    assert ok == b""


def _stop_server_on(port: int) -> None:
    RUNNING_SERVERS[port].stop(grace=10).wait(10)


def test_server_graceful_shutdown_lets_the_call_in_flight_finish(pb):
    """grpc's server.stop(grace) sends GOAWAY(NO_ERROR); the call in flight must still complete."""
    m = pb.messages_pb2
    request = m.StreamingOutputCallRequest(
        response_parameters=[m.ResponseParameters(size=7, interval_us=150_000) for _ in range(4)]
    )

    def run(through_proxy: bool):
        with interop_server() as port:
            with running_firewall(POLICY.format(port=port), ("127.0.0.1", port), LABELS) as fw:
                host, target = (fw.host, fw.port) if through_proxy else ("127.0.0.1", port)
                channel, stub = stub_for(host, target)
                try:
                    stub.EmptyCall(pb.empty_pb2.Empty(), timeout=10)  # connected
                    call = stub.StreamingOutputCall(request, timeout=20)
                    first = next(call)  # the call is in flight on the server
                    stopper = threading.Thread(target=lambda: _stop_server_on(port))
                    stopper.start()
                    rest = list(call)
                    stopper.join(10)
                    return [len(first.payload.body)] + [
                        len(r.payload.body) for r in rest
                    ], call.code().name
                finally:
                    channel.close()

    assert run(True) == run(False) == ([7, 7, 7, 7], "OK")


def _rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_stops_the_server_not_the_proxys_memory(targets, pb):
    """200 MB of server-streaming to a client that pauses: the proxy buffers a window, not the
    whole stream."""
    m = pb.messages_pb2
    fw = targets["firewall"]
    stub = targets["proxy"]
    size, count = 1024 * 1024, 200
    request = m.StreamingOutputCallRequest(
        response_parameters=[m.ResponseParameters(size=size) for _ in range(count)]
    )
    baseline = _rss_bytes(fw.proc.pid)
    call = stub.StreamingOutputCall(request, timeout=120)
    received = [len(next(call).payload.body)]
    peak = baseline
    for _ in range(20):  # the client pauses; sample the proxy while the server pushes
        threading.Event().wait(0.05)
        peak = max(peak, _rss_bytes(fw.proc.pid))
    received += [len(r.payload.body) for r in call]
    assert received == [size] * count
    # Bounded by the windows (a few MiB), far below the 200 MB that went through.
    assert peak - baseline < 40 * 1024 * 1024


def test_compressed_messages_and_keepalive_pings(targets, pb):
    """gzip-compressed messages (flag byte 1) and client keepalive PINGs pass unchanged."""
    m = pb.messages_pb2
    options = [
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]

    def run(through_proxy: bool):
        if through_proxy:
            channel = targets["channel"](options=options, compression=grpc.Compression.Gzip)
        else:
            channel = channel_for(
                "127.0.0.1", targets["port"], options=options, compression=grpc.Compression.Gzip
            )
        try:
            stub = pb.test_pb2_grpc.TestServiceStub(channel)
            sizes = []
            for _ in range(3):
                reply = stub.UnaryCall(
                    m.SimpleRequest(response_size=50_000, payload=m.Payload(body=b"\x00" * 50_000)),
                    timeout=10,
                )
                sizes.append(len(reply.payload.body))
                threading.Event().wait(0.3)  # idle long enough for a keepalive PING
            return sizes
        finally:
            channel.close()

    assert run(True) == run(False) == [50_000] * 3
