"""The HTTP/2 engine alone, in process: CPU microseconds per request, no sockets.

    python -m bench.h2_engine [--requests N] [--batch B] [--profile]

Replays what ``bench.h2`` puts through the proxy, as bytes: an h2load-like
client (HPACK with its dynamic table, so repeated requests are a few indexed
bytes) sending batches of GETs on fresh streams, and an nghttpd-like server
(which honours our SETTINGS_HEADER_TABLE_SIZE 0) answering each with HEADERS
and a 64-byte DATA frame. A gRPC variant does the same with unary calls
(request and response messages, trailers). Reported: microseconds per request,
the best of several rounds, for the engine with the real compiled policy's
``decide``. The figure excludes the event loop, the socket calls and the flow
log, which ``bench.h2`` and ``bench.grpc`` include.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from hpack import Encoder

from bench.common import write_results
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.state import ConnectionPolicy, PolicyState
from l7proxy.policy.trace import PeerSpec, build_scenario
from parsers.base import Close, Decide, ParseError
from parsers.http2.engine import H2Engine
from parsers.http2.frames import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    frame,
    settings_frame,
    window_update,
)

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-h2}
spec:
  endpointSelector: {matchLabels: {app: bench-h2}}
  ingress:
    - toPorts:
        - ports: [{port: "8080", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: "/public/.*"}
              - {method: POST, path: "/grpc.testing.TestService/.*"}
"""


def _decide() -> Decide:
    """The decide function the proxy builds for a connection from the host to the service."""
    src, dst = PeerSpec("host", ip="127.0.0.1"), PeerSpec("bench", labels={"app": "bench-h2"})
    scenario = build_scenario(load_text(POLICY), [], IdentityAllocator(), src, dst, 8080)
    return ConnectionPolicy(PolicyState(scenario.compiled), scenario.src, scenario.dst).decide


def workload(requests: int, batch: int, grpc: bool) -> tuple[list[bytes], list[bytes]]:
    """(client reads, server reads): one client read per batch of requests, and one
    server read answering that batch."""
    client_enc = Encoder()
    server_enc = Encoder()
    server_enc.header_table_size = 0  # it acknowledged our setting
    # h2load's default windows: 2^30 - 1 for each stream and for the connection.
    client_reads = [
        PREFACE
        + settings_frame({4: 2**30 - 1})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, 2**30 - 1 - 65535)
    ]
    server_reads = [settings_frame({3: 100}) + frame(SETTINGS, ACK, 0) + window_update(0, 1 << 20)]
    sid = 1
    for _ in range(0, requests, batch):
        c, s = [], []
        for _ in range(batch):
            if grpc:
                head = [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", b"/grpc.testing.TestService/UnaryCall"),
                    (b":authority", b"127.0.0.1:8080"),
                    (b"te", b"trailers"),
                    (b"content-type", b"application/grpc"),
                    (b"user-agent", b"grpc-python/1.66"),
                    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
                ]
                message = b"\x00\x00\x00\x00\x07" + b"x" * 7
                c.append(frame(HEADERS, END_HEADERS, sid, client_enc.encode(head)))
                c.append(frame(DATA, END_STREAM, sid, message))
                response = [(b":status", b"200"), (b"content-type", b"application/grpc")]
                s.append(frame(HEADERS, END_HEADERS, sid, server_enc.encode(response)))
                s.append(frame(DATA, 0, sid, message))
                trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
                s.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, server_enc.encode(trailers)))
            else:
                head = [
                    (b":method", b"GET"),
                    (b":path", b"/public/small.txt"),
                    (b":scheme", b"http"),
                    (b":authority", b"127.0.0.1:8080"),
                    (b"accept", b"*/*"),
                    (b"accept-encoding", b"gzip, deflate"),
                    (b"user-agent", b"h2load nghttp2/1.52.0"),
                ]
                c.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, client_enc.encode(head)))
                response = [
                    (b":status", b"200"),
                    (b"server", b"nghttpd nghttp2/1.52.0"),
                    (b"content-length", b"64"),
                    (b"cache-control", b"max-age=3600"),
                    (b"date", b"Mon, 07 Dec 2026 07:00:00 GMT"),
                    (b"last-modified", b"Mon, 07 Dec 2026 06:00:00 GMT"),
                ]
                s.append(frame(HEADERS, END_HEADERS, sid, server_enc.encode(response)))
                s.append(frame(DATA, END_STREAM, sid, b"x" * 64))
            sid += 2
        client_reads.append(b"".join(c))
        server_reads.append(b"".join(s))
    return client_reads, server_reads


def one_round(decide, client_reads: list[bytes], server_reads: list[bytes]) -> float:
    engine = H2Engine(decide)
    start = time.perf_counter()
    engine.client_data(client_reads[0])
    engine.server_data(server_reads[0])
    for c, s in zip(client_reads[1:], server_reads[1:], strict=True):
        for cmd in engine.client_data(c) + engine.server_data(s):
            if type(cmd) is ParseError or type(cmd) is Close:
                raise AssertionError(cmd)
    return time.perf_counter() - start


def run(requests: int = 20000, batch: int = 16, rounds: int = 5, profile: bool = False) -> dict:
    decide = _decide()
    rows = []
    for name, grpc in (("h2load GET", False), ("gRPC unary", True)):
        client_reads, server_reads = workload(requests, batch, grpc)
        if profile:
            prof = cProfile.Profile()
            prof.runcall(one_round, decide, client_reads, server_reads)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        best = min(one_round(decide, client_reads, server_reads) for _ in range(rounds))
        rows.append({"workload": name, "us_per_request": round(best / requests * 1e6, 2)})
        print(f"{name:12} {best / requests * 1e6:6.2f} us/request (best of {rounds})")
    return {"requests": requests, "batch": batch, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.requests, args.batch, profile=args.profile)
    write_results("h2_engine", {"command": "python -m bench.h2_engine", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
