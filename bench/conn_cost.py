"""What one new connection costs l7proxy in Python, counted rather than timed.

    python -m bench.conn_cost [--connections 200] [--tls] [--profile] [--top 30]
    python -m bench.conn_cost --kept realistic|repeated [--connections 2000]

The real ``Firewall`` (an L7 rule in force, as in ``bench/tls.py``: GET /.* allowed) runs
in this process on a uvloop loop; a peer process holds a tiny upstream and the client.
The client makes ``--connections`` new connections one after another, each sending
``GET / HTTP/1.1``, ``Host``, ``Connection: close`` and reading the answer to its end:
every one is accepted, judged, piped, connected upstream, logged and closed. With
``--tls`` each is a full TLS 1.3 handshake first (the certificate of ``bench/tls.py``).
With ``--kept``, the count is per request instead: the client sends ``--connections``
requests one at a time on one kept connection, each with a new path, query and
``X-Request-Id`` (``realistic``, as ``bench.http1_proxy``'s workload of that name) or
the same head every time (``repeated``); "per connection" below then reads "per request".

What it counts, after a warm-up, over the connections and the linger that follows them:

- Python opcodes executed, per connection, in all and by function (``sys.settrace``
  with ``f_trace_opcodes``): a count a busy machine does not move, the same to a
  fraction of a percent run after run, so a change's effect shows whole;
- with ``--profile``, the same load under cProfile instead (calls, and what calls what).

For instructions (the interpreter, uvloop and libc too), run it under callgrind
twice and take the difference, which removes the start-up:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m bench.conn_cost --connections 50 --instructions
    (and again with --connections 250; (total 250 - total 50) / 200)

Nothing is written to ``bench/results``: this is a tool for finding where a connection's
cost goes (docs/benchmarks.md), not a comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from bench.common import LOOPBACK, REPO
from bench.tls import NAME, make_certificate, policy_yaml

REQUEST_CLOSE = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
RESPONSE_KEPT = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WARM_UP = 30
# The pipe's lingering close ends each client transport this long after the answer
# (``driver.LINGER_SECONDS``): waited for, so every connection's close is counted.
LINGER_WAIT = 2.5


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.conn_cost", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--connections", type=int, default=200, help="connections counted")
    p.add_argument("--tls", action="store_true", help="terminate TLS (a full handshake each)")
    p.add_argument("--profile", action="store_true", help="cProfile instead of opcode counts")
    p.add_argument(
        "--kept",
        choices=("realistic", "repeated"),
        help="count requests instead: N requests on one kept connection, each with a new "
        "path, query and X-Request-Id (realistic) or all the same (repeated)",
    )
    p.add_argument(
        "--flowlog", action="store_true", help="write the flow log to a file (default: none)"
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count nothing in Python (for a run under callgrind)",
    )
    p.add_argument("--top", type=int, default=30, help="functions listed")
    # The peer process's own mode, with the CA its client trusts ("-": cleartext).
    p.add_argument("--peer", metavar="CA", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------- the peer process


def peer(ca: str) -> int:
    """The upstream (a thread per connection) and the client, driven by lines on stdin:
    ``PORT N`` makes N connections to PORT one after another, then answers ``done``."""
    upstream = socket.create_server((LOOPBACK, 0))
    context = ssl.create_default_context(cafile=ca) if ca != "-" else None

    def serve(conn: socket.socket) -> None:
        # Answers each head; the client's Connection: close gets the closing answer.
        with conn:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                head, _, pending = pending.partition(b"\r\n\r\n")
                if b"Connection: close" in head:
                    conn.sendall(RESPONSE)
                    return
                conn.sendall(RESPONSE_KEPT)

    def accept() -> None:
        while True:
            conn, _ = upstream.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(upstream.getsockname()[1], flush=True)
    for line in sys.stdin:
        port, n, kept = line.split()
        if kept != "-":
            if not _kept_requests(int(port), int(n), kept == "repeated", context):
                return 1
            print("done", flush=True)
            continue
        for _ in range(int(n)):
            raw = socket.create_connection((LOOPBACK, int(port)), timeout=30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=NAME) if context else raw as conn:
                conn.sendall(REQUEST_CLOSE)
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
            if not reply.startswith(b"HTTP/1.1 200 "):
                print(f"unexpected reply: {reply[:200]!r}", file=sys.stderr, flush=True)
                return 1
        print("done", flush=True)
    return 0


def _kept_requests(port: int, n: int, repeated: bool, context: ssl.SSLContext | None) -> bool:
    """N requests of ``http1_proxy``'s realistic workload (a new path, query and
    ``X-Request-Id`` each), or N times its first, one at a time on one kept connection
    (in one TLS session with a ``context``)."""
    from bench.http1_proxy import realistic_request

    raw = socket.create_connection((LOOPBACK, port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(raw, server_hostname=NAME) if context else raw as conn:
        for i in range(n):
            conn.sendall(realistic_request(0 if repeated else i, NAME.encode()))
            reply = b""
            while not reply.endswith(b"\r\n\r\nok"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
            if not reply.startswith(b"HTTP/1.1 200 "):
                print(f"unexpected reply: {reply[:200]!r}", file=sys.stderr, flush=True)
                return False
    return True


# --------------------------------------------------------------------- counting opcodes


class OpcodeCounter:
    """Opcodes executed per code object, on this thread, while it is on."""

    def __init__(self) -> None:
        self.opcodes: Counter[CodeType] = Counter()
        self.calls: Counter[CodeType] = Counter()

    def _global(self, frame: FrameType, event: str, arg: Any):
        frame.f_trace_opcodes = True
        self.calls[frame.f_code] += 1
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any):
        if event == "opcode":
            self.opcodes[frame.f_code] += 1
        return self._local

    def start(self) -> None:
        sys.settrace(self._global)

    def stop(self) -> None:
        sys.settrace(None)


def _where(code: CodeType) -> str:
    path = Path(code.co_filename)
    try:
        shown = str(path.relative_to(REPO))
    except ValueError:
        shown = "/".join(path.parts[-2:])
    return f"{shown}:{code.co_firstlineno} {code.co_qualname}"


def _area(code: CodeType) -> str:
    """The module's folder in this repository, else the library's module."""
    path = Path(code.co_filename)
    try:
        rel = path.relative_to(REPO)
    except ValueError:
        return "stdlib " + "/".join(path.parts[-2:]) if "asyncio" in path.parts else path.name
    return str(rel)


# --------------------------------------------------------------------- the proxy


async def measure(args: argparse.Namespace, workdir: Path) -> int:
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.proxy.firewall import Firewall
    from l7proxy.proxy.heap import steady_heap
    from l7proxy.proxy.tls import CommandLineTls, KeyPair, TlsStore

    ca = "-"
    pairs: tuple[KeyPair, ...] = ()
    if args.tls:
        ca_path, cert, key, _ = make_certificate(workdir)
        ca, pairs = str(ca_path), (KeyPair(cert, key),)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.conn_cost", "--peer", ca,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        upstream_port = int(await proc.stdout.readline())
        policy = workdir / "policy.yaml"
        policy.write_text(policy_yaml(upstream_port))
        # As ``l7proxy firewall`` builds it (a TlsStore always; certificates with --tls),
        # without the policy poll, whose timer would be counted too.
        fw = Firewall(
            listen=(LOOPBACK, 0),
            upstream=(LOOPBACK, upstream_port),
            labels={"app": "bench"},
            policy_paths=[policy],
            flowlog=FlowLog(workdir / "flows.jsonl" if args.flowlog else None),
            tls=TlsStore(None, CommandLineTls(pairs, alpn=("http/1.1",))),
            poll_interval=3600,
        )
        _, port = await fw.start()
        # As ``run_firewall`` does: the start-up heap frozen, full collections off.
        heap = asyncio.create_task(steady_heap())

        async def connections(n: int) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{port} {n} {args.kept or '-'}\n".encode())
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            if line != b"done\n":
                raise RuntimeError(f"the peer failed: {line!r}")
            await asyncio.sleep(LINGER_WAIT)

        await connections(WARM_UP)
        n = args.connections
        collections = [s["collections"] for s in gc.get_stats()]
        if args.instructions:
            await connections(n)
        elif args.profile:
            prof = cProfile.Profile()
            prof.enable()
            await connections(n)
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("ncalls").print_stats("{", args.top)
            print(out.getvalue())
        else:
            counter = OpcodeCounter()
            counter.start()
            await connections(n)
            counter.stop()
            report(counter, n, args.top)
        collected = [s["collections"] - c for s, c in zip(gc.get_stats(), collections, strict=True)]
        print(f"\ncyclic collections per connection, by generation: {[c / n for c in collected]}")
        heap.cancel()
        await fw.close()
        fw.proxy.flowlog.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return 0


def report(counter: OpcodeCounter, n: int, top: int) -> None:
    total = sum(counter.opcodes.values())
    print(f"opcodes per connection: {total / n:,.0f}")
    print(f"Python calls per connection: {sum(counter.calls.values()) / n:,.1f}\n")
    areas: Counter[str] = Counter()
    for code, ops in counter.opcodes.items():
        areas[_area(code)] += ops
    print("by module (opcodes per connection):")
    for area, ops in areas.most_common(top):
        print(f"  {ops / n:9,.0f}  {area}")
    print("\nby function (opcodes, calls per connection):")
    for code, ops in counter.opcodes.most_common(top):
        print(f"  {ops / n:9,.0f}  {counter.calls[code] / n:5.1f}  {_where(code)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.peer:
        return peer(args.peer)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="bench-conn-cost-") as tmp:
        started = time.monotonic()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            status = runner.run(measure(args, Path(tmp)))
        print(f"\n({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
