"""The HTTP/2 engine alone, in process: CPU microseconds per request, no sockets.

    python -m bench.h2_engine [--requests N] [--batch B] [--profile]
    python -m bench.h2_engine --count [--requests N] [--top T]
    python -m bench.h2_engine --instructions [--grpc] [--requests N]
    python -m bench.h2_engine --download MIB [--grpc] [--read BYTES] [--instructions]

Replays what ``bench.h2`` puts through the proxy, as bytes: an h2load-like
client (HPACK with its dynamic table, so repeated requests are a few indexed
bytes) sending batches of GETs on fresh streams, and an nghttpd-like server
(which honours our SETTINGS_HEADER_TABLE_SIZE 0) answering each with HEADERS
and a 64-byte DATA frame. A gRPC variant does the same with unary calls
(request and response messages, trailers). Reported: microseconds per request,
the best of several rounds, for the engine with the real compiled policy's
``decide``. The figure excludes the event loop, the socket calls and the flow
log, which ``bench.h2`` and ``bench.grpc`` include.

``--count`` counts the same GET and gRPC unary workloads instead of timing
them: the Python opcodes the engine executes per request (not this module's
own loop), by function. Like ``--download``'s figure it does not move with
the machine's load.

For instructions per request, run ``--instructions`` (one workload built, then
relayed ``--rounds`` times by a fresh engine each; ``--grpc`` for the unary
calls; nothing timed or written) under callgrind, once with 1 round and once
with 3, and take the difference over twice the requests:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m bench.h2_engine --instructions --requests 4000 --rounds 1
    (and again with --rounds 3)

``--download`` counts instead of timing, so a busy machine does not move the
figure: the bytes of ``bench.h2``'s 1 GiB download (one GET answered by
nghttpd with 16 KiB DATA frames, read by the proxy in ``--read`` byte chunks
that end anywhere in a frame; with ``--grpc``, one streaming call answered with
1 MiB messages) go through the engine, and it reports the Python opcodes
executed per MiB (``sys.settrace`` with ``f_trace_opcodes``), by function. For
instructions (the interpreter and the copies too), run it twice under callgrind
with ``--instructions`` and take the difference per MiB:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m bench.h2_engine --download 16 --instructions --rounds 1
    (and again with --rounds 5; (total 5 - total 1) / 64 MiB: the same
    download built once, then relayed by a fresh engine each round)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

from hpack import Encoder

from bench.common import write_results
from bench.conn_cost import OpcodeCounter, _where
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.state import ConnectionPolicy, PolicyState
from l7proxy.policy.trace import PeerSpec, build_scenario
from parsers.base import Close, Decide, ParseError, ToClient
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


def count_requests(requests: int, batch: int, top: int) -> dict:
    """Python opcodes the engine executes per GET and per gRPC unary call."""
    decide = _decide()
    here = Path(__file__).resolve()
    rows = []
    for name, grpc in (("h2load GET", False), ("gRPC unary", True)):
        client_reads, server_reads = workload(requests, batch, grpc)
        one_round(decide, client_reads, server_reads)  # imports and caches warm
        counter = OpcodeCounter()
        counter.start()
        try:
            one_round(decide, client_reads, server_reads)
        finally:
            counter.stop()
        engine = {
            code: n
            for code, n in counter.opcodes.items()
            if Path(code.co_filename).resolve() != here
        }
        per_request = sum(engine.values()) / requests
        rows.append({"workload": name, "opcodes_per_request": round(per_request)})
        print(f"{name}: {per_request:.0f} Python opcodes per request in the engine")
        for code, n in sorted(engine.items(), key=lambda kv: -kv[1])[:top]:
            calls = counter.calls[code]
            print(f"{n / requests:10.1f} {calls / requests:6.2f} calls  {_where(code)}")
    return {"requests": requests, "batch": batch, "rows": rows}


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


MIB = 1 << 20
# What nghttpd writes and the proxy reads in one go during a download (docs/http2-grpc.md).
DOWNLOAD_READ = 131072


def download(mib: int, read: int, grpc: bool) -> tuple[list[bytes], list[bytes]]:
    """(client reads, server reads) of one ``mib`` MiB download on stream 1: the
    client grants h2load's windows (2^30 - 1, topped up each 512 MiB), the server
    sends 16 KiB DATA frames, cut into reads of ``read`` bytes wherever they fall."""
    window = 2**30 - 1
    client = [
        PREFACE
        + settings_frame({4: window})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, window - 65535)
    ]
    head = [
        (b":method", b"POST" if grpc else b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/grpc.testing.TestService/StreamingOutputCall" if grpc else b"/public/1g"),
        (b":authority", b"127.0.0.1:8080"),
    ]
    if grpc:
        head += [(b"te", b"trailers"), (b"content-type", b"application/grpc")]
        request = frame(HEADERS, END_HEADERS, 1, Encoder().encode(head))
        request += frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x02" + b"xx")
        answer = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        # 1 MiB messages, each behind its 5-byte prefix, as one byte stream.
        body = (b"\x00" + MIB.to_bytes(4, "big") + b"m" * MIB) * mib
    else:
        request = frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode(head))
        answer = [(b":status", b"200"), (b"content-length", str(mib * MIB).encode())]
        body = b"d" * (mib * MIB)
    client.append(request)
    encoder = Encoder()
    encoder.header_table_size = 0
    chunk = 16384
    frames = [settings_frame({3: 100}) + frame(SETTINGS, ACK, 0)]
    frames.append(frame(HEADERS, END_HEADERS, 1, encoder.encode(answer)))
    last = len(body) - chunk
    for at in range(0, len(body), chunk):
        end_stream = not grpc and at >= last
        frames.append(frame(DATA, END_STREAM if end_stream else 0, 1, body[at : at + chunk]))
    if grpc:
        trailers = [(b"grpc-status", b"0")]
        frames.append(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(trailers)))
    wire = b"".join(frames)
    server = [wire[at : at + read] for at in range(0, len(wire), read)]
    return client, server


def one_download(decide, client_reads: list[bytes], server_reads: list[bytes], read: int) -> int:
    """Bytes the engine sent the client for the download."""
    engine = H2Engine(decide)
    sent = 0
    for data in client_reads:
        engine.client_data(data)
    for at, data in enumerate(server_reads):
        for cmd in engine.server_data(data):
            kind = type(cmd)
            if kind is ToClient:
                sent += len(cmd.data)
            elif kind is ParseError or kind is Close:
                raise AssertionError(cmd)
        if at % 512 == 511:  # the client tops its windows up, as h2load would
            engine.client_data(window_update(0, 512 * read) + window_update(1, 512 * read))
    return sent


def run_download(
    decide, mib: int, read: int, grpc: bool, count: bool, top: int, rounds: int
) -> dict:
    client_reads, server_reads = download(mib, read, grpc)
    counter = OpcodeCounter()
    if count:
        counter.start()
    for _ in range(rounds):
        sent = one_download(decide, client_reads, server_reads, read)
        if sent < mib * MIB:
            raise AssertionError(f"{sent} bytes reached the client of {mib} MiB")
    counter.stop()
    reads = len(server_reads) * rounds
    mib *= rounds
    # The engine's own: this module's loop that feeds it is left out.
    here = Path(__file__).resolve()
    opcodes = sum(
        n for code, n in counter.opcodes.items() if Path(code.co_filename).resolve() != here
    )
    result = {
        "workload": "gRPC download" if grpc else "h2 download",
        "mib": mib,
        "read_bytes": read,
        "opcodes_per_mib": round(opcodes / mib),
        "reads_per_mib": round(reads / mib, 2),
    }
    if count:
        print(f"{result['workload']}: {mib} MiB in {reads} reads of {read} bytes")
        print(f"{opcodes / mib:10.0f} Python opcodes per MiB in the engine")
        for code, n in counter.opcodes.most_common(top):
            calls = counter.calls[code]
            print(f"{n / mib:10.0f} {calls / mib:8.1f} calls  {_where(code)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--count", action="store_true", help="count opcodes per request instead of timing"
    )
    parser.add_argument("--download", type=int, metavar="MIB", help="count a download instead")
    parser.add_argument(
        "--grpc", action="store_true", help="the download, or --instructions' workload, is gRPC"
    )
    parser.add_argument("--read", type=int, default=DOWNLOAD_READ, help="bytes per server read")
    parser.add_argument(
        "--instructions", action="store_true", help="count nothing (for a run under callgrind)"
    )
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    parser.add_argument(
        "--rounds", type=int, default=1, help="downloads (or --instructions' workloads) relayed"
    )
    args = parser.parse_args(argv)
    if args.download:
        run_download(
            _decide(),
            args.download,
            args.read,
            args.grpc,
            not args.instructions,
            args.top,
            args.rounds,
        )
        return 0
    if args.instructions:
        client_reads, server_reads = workload(args.requests, args.batch, args.grpc)
        decide = _decide()
        for _ in range(args.rounds):
            one_round(decide, client_reads, server_reads)
        return 0
    if args.count:
        count_requests(args.requests, args.batch, args.top)
        return 0
    result = run(args.requests, args.batch, profile=args.profile)
    write_results("h2_engine", {"command": "python -m bench.h2_engine", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
