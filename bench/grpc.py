"""gRPC: {direct, haproxy h2c, l7proxy firewall} -> grpcio interop TestService.

    python -m bench.grpc [--calls N] [--download-mib M]

Two load generators of unary calls, each against all three paths in the same run:
- ``grpcio``: the real Python grpcio client, ``UnaryCall`` with 32 calls in flight
  on one channel (the client is often the bottleneck: compare the proxy's CPU);
- ``h2load``: nghttp2's h2load posting gRPC ``EmptyCall`` frames
  (content-type application/grpc, te: trailers), 4 connections x 16 streams.
Then a download: one grpcio ``StreamingOutputCall`` whose server streams
``--download-mib`` messages of 1 MiB (1 GiB by default), three rounds per path in
turn (medians): MiB/s as the client sees it, and the proxy's CPU per MiB.
The server runs in its own process; the proxy's CPU comes from /proc.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench.h2_tools import (
    DOWNLOAD_COLUMNS,
    REPO,
    free_port,
    h2load,
    haproxy_h2c,
    l7proxy_firewall,
    measure,
    median_downloads,
    table,
    top_functions,
    wait_port,
    write_results,
)

LABELS = {"app": "bench-grpc"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-grpc}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-grpc}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            grpc:
              - {{service: grpc.testing.TestService, method: "(Empty|Unary|StreamingOutput)Call"}}
"""

SERVER = """
import sys, grpc
from concurrent import futures
from tests.support.grpc_interop import interop, servicer_class
pb = interop()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
pb.test_pb2_grpc.add_TestServiceServicer_to_server(servicer_class(pb)(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop(None)
"""


@contextmanager
def interop_server_process():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("interop server did not start")
        wait_port(port)
        yield port, proc.pid
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def grpcio_calls(port: int, calls: int, in_flight: int = 32) -> dict:
    import grpc

    sys.path.insert(0, str(REPO))
    from tests.support.grpc_interop import interop

    pb = interop()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb.test_pb2_grpc.TestServiceStub(channel)
    request = pb.messages_pb2.SimpleRequest(
        response_size=64, payload=pb.messages_pb2.Payload(body=b"x" * 64)
    )
    try:
        stub.UnaryCall(request, timeout=10)  # connect
        slots = threading.BoundedSemaphore(in_flight)
        finished = threading.Event()
        lock = threading.Lock()
        tally = {"done": 0, "failed": 0}

        def on_done(future) -> None:
            with lock:
                tally["done"] += 1
                tally["failed"] += future.exception() is not None
                if tally["done"] == calls:
                    finished.set()
            slots.release()

        started = time.perf_counter()
        for _ in range(calls):
            slots.acquire()
            stub.UnaryCall.future(request, timeout=30).add_done_callback(on_done)
        finished.wait(600)
        failed = tally["failed"] + calls - tally["done"]
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
    return {"req_per_s": calls / elapsed, "succeeded": calls - failed, "failed": failed}


MIB = 1 << 20


def grpcio_download(port: int, mib: int) -> float:
    """One server-streaming call of ``mib`` messages of 1 MiB each, read to its end: MiB/s."""
    import grpc

    sys.path.insert(0, str(REPO))
    from tests.support.grpc_interop import CHANNEL_OPTIONS, interop

    pb = interop()
    messages = pb.messages_pb2
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = pb.test_pb2_grpc.TestServiceStub(channel)
    request = messages.StreamingOutputCallRequest(
        response_parameters=[messages.ResponseParameters(size=MIB) for _ in range(mib)]
    )
    try:
        received = 0
        started = time.perf_counter()
        for response in stub.StreamingOutputCall(request, timeout=600):
            received += len(response.payload.body)
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
    if received != mib * MIB:
        raise RuntimeError(f"download through port {port}: {received} of {mib * MIB} bytes")
    return mib / elapsed


def run(
    calls: int = 5000,
    h2load_calls: int = 20000,
    profile: bool = False,
    download_mib: int = 1024,
    download_rounds: int = 3,
) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    prof_path = workdir / "l7proxy.prof" if profile else None
    body = workdir / "empty-call.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x00")  # one empty grpc.testing.Empty message
    rows = []
    with interop_server_process() as (server_port, _server_pid):
        with (
            haproxy_h2c(server_port) as (ha_port, ha_pid),
            l7proxy_firewall(
                POLICY.format(port=server_port), server_port, LABELS, profile=prof_path
            ) as (
                fw_port,
                fw_pid,
            ),
        ):
            paths = (
                ("direct", server_port, None),
                ("haproxy", ha_port, ha_pid),
                ("l7proxy", fw_port, fw_pid),
            )
            for name, port, pid in paths:
                grpcio_calls(port, 500)  # warm-up
                result, cpu = measure(pid, lambda port=port: grpcio_calls(port, calls))
                rows.append(
                    {
                        "client": "grpcio",
                        "config": name,
                        **result,
                        "proxy_cpu_us_per_call": None if cpu is None else cpu * 1e6 / calls,
                    }
                )
            for name, port, pid in paths:
                url = f"http://127.0.0.1:{port}/grpc.testing.TestService/EmptyCall"
                extra = [
                    "-d",
                    str(body),
                    "-H",
                    "content-type: application/grpc",
                    "-H",
                    "te: trailers",
                ]
                h2load(url, requests=1000, clients=4, streams=16, extra=extra)
                result, cpu = measure(
                    pid,
                    lambda url=url, extra=extra: h2load(
                        url, requests=h2load_calls, clients=4, streams=16, extra=extra
                    ),
                )
                rows.append(
                    {
                        "client": "h2load",
                        "config": name,
                        **result,
                        "proxy_cpu_us_per_call": None if cpu is None else cpu * 1e6 / h2load_calls,
                    }
                )
            download = (
                median_downloads(
                    list(paths),
                    download_mib,
                    download_rounds,
                    lambda _name, port: grpcio_download(port, download_mib),
                )
                if download_mib
                else []
            )
    for client in ("grpcio", "h2load"):
        group = {r["config"]: r for r in rows if r["client"] == client}
        for r in group.values():
            r["vs_direct"] = r["req_per_s"] / group["direct"]["req_per_s"]
            r["vs_haproxy"] = r["req_per_s"] / group["haproxy"]["req_per_s"]
            ha = group["haproxy"]["proxy_cpu_us_per_call"]
            r["cpu_vs_haproxy"] = (
                None
                if r["proxy_cpu_us_per_call"] is None or not ha
                else r["proxy_cpu_us_per_call"] / ha
            )
    payload = {
        "benchmark": "grpc",
        "command": "python -m bench.grpc",
        "workload": {
            "grpcio_unary_calls": calls,
            "grpcio_in_flight": 32,
            "h2load_empty_calls": h2load_calls,
            "h2load": "-c 4 -m 16",
        },
        "rows": rows,
        "download": {"mib": download_mib, "rounds": download_rounds, "rows": download},
    }
    if prof_path is not None and prof_path.exists():
        payload["profile_top"] = top_functions(prof_path)
    return payload


COLUMNS = [
    ("client", "client", "{}"),
    ("config", "config", "{}"),
    ("req_per_s", "calls/s", "{:.0f}"),
    ("vs_direct", "x direct", "{:.2f}"),
    ("vs_haproxy", "x haproxy", "{:.2f}"),
    ("proxy_cpu_us_per_call", "proxy CPU us/call", "{:.1f}"),
    ("cpu_vs_haproxy", "CPU x haproxy", "{:.1f}"),
    ("failed", "failed", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--h2load-calls", type=int, default=20000)
    parser.add_argument(
        "--profile", action="store_true", help="run l7proxy under cProfile and print the top"
    )
    parser.add_argument("--download-mib", type=int, default=1024, help="0: no streaming download")
    args = parser.parse_args(argv or [])
    payload = run(
        args.calls, args.h2load_calls, profile=args.profile, download_mib=args.download_mib
    )
    path = write_results("grpc", payload)
    print(table(payload["rows"], COLUMNS))
    if payload["download"]["rows"]:
        print(table(payload["download"]["rows"], DOWNLOAD_COLUMNS))
    if "profile_top" in payload:
        print(payload["profile_top"])
    print(f"written {path.relative_to(path.parents[2])}")
    return 0 if all(r["failed"] == 0 for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
