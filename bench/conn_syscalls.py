"""System calls per new connection: l7proxy against haproxy, counted by strace.

    python -m bench.conn_syscalls [--connections 200] [--tls] [--list 3]

``l7proxy firewall`` (the GET-only rule of ``bench/tls.py``) and haproxy (one thread,
the same rule, ``http-reuse never``: a server connection per client, as l7proxy makes)
run in front of nginx. Each proxy is warmed up, then ``strace -f -c`` is attached to all
its threads while a client makes ``--connections`` new connections one after another,
each ``GET /`` with ``Connection: close`` read to its end (with ``--tls``, behind a full
TLS 1.3 handshake, the certificate of ``bench/tls.py``), and the lingering closes behind
them end. The counts, divided by the connections, are printed side by side.

A count, not a time: the machine's load does not move it (a timer that fires in the
window adds a wake-up or two in all). ``--list N`` writes instead the calls of N
connections in order (``strace -f -tt``), one file per proxy, to see which call
belongs to which step. Nothing goes to ``bench/results``: it is a tool for finding
where a connection's cost goes (docs/benchmarks.md), as ``bench.conn_cost`` is for its
Python.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.common import LOOPBACK, Service, start_firewall, start_haproxy, start_nginx
from bench.conn_cost import LINGER_WAIT, REQUEST_CLOSE, WARM_UP
from bench.tls import (
    HAPROXY_RULES,
    NAME,
    firewall_tls_args,
    haproxy_tls_bind,
    make_certificate,
    policy_yaml,
)

# strace needs a moment to attach to every thread before the first connection.
ATTACH_WAIT = 1.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.conn_syscalls", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--connections", type=int, default=200, help="connections counted")
    p.add_argument("--tls", action="store_true", help="terminate TLS (a full handshake each)")
    p.add_argument(
        "--list", type=int, metavar="N", default=0, help="list the calls of N connections"
    )
    p.add_argument("--out", type=Path, default=Path("."), help="where --list writes")
    return p.parse_args(argv)


def connect_many(port: int, n: int, context: ssl.SSLContext | None) -> None:
    for _ in range(n):
        raw = socket.create_connection((LOOPBACK, port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=NAME) if context else raw as conn:
            conn.sendall(REQUEST_CLOSE)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        if not reply.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"unexpected reply: {reply[:200]!r}")


@contextmanager
def traced(pid: int, out: Path, listing: bool) -> Iterator[None]:
    """strace attached to every thread of ``pid`` while the block runs."""
    argv = ["strace", "-f", *(["-tt"] if listing else ["-c"]), "-o", str(out)]
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        argv += ["-p", tid]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        time.sleep(ATTACH_WAIT)
        yield
        time.sleep(LINGER_WAIT)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def counts(summary: str) -> dict[str, tuple[int, int]]:
    """``strace -c``'s table: calls and errors by system call."""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)$", line)
        if m and m[3] != "total":
            rows[m[3]] = (int(m[1]), int(m[2] or 0))
    return rows


def measure(
    service: Service, args: argparse.Namespace, context: ssl.SSLContext | None, out: Path
) -> None:
    connect_many(service.port, WARM_UP, context)
    time.sleep(LINGER_WAIT)
    with traced(service.pid, out, listing=bool(args.list)):
        connect_many(service.port, args.list or args.connections, context)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = "tls" if args.tls else "cleartext"
    with tempfile.TemporaryDirectory(prefix="bench-conn-syscalls-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        ca, cert, key, combined = make_certificate(workdir)
        nginx = stack.enter_context(start_nginx(workdir))
        upstream = (LOOPBACK, nginx.port)
        context = ssl.create_default_context(cafile=str(ca)) if args.tls else None
        tls_args = firewall_tls_args(cert, key)
        l7 = stack.enter_context(
            start_firewall(
                policy_yaml(nginx.port),
                upstream,
                {"app": "bench"},
                workdir,
                extra_args=tls_args if args.tls else (),
            )
        )
        bind = haproxy_tls_bind(combined) if args.tls else ""
        haproxy = stack.enter_context(
            start_haproxy(
                workdir,
                upstream,
                frontend_rules=HAPROXY_RULES,
                bind_options=bind,
                backend_lines="http-reuse never",
            )
        )
        found: dict[str, dict[str, tuple[int, int]]] = {}
        for service in (l7, haproxy):
            if args.list:
                out = args.out / f"syscalls-{service.name}-{mode}.txt"
                measure(service, args, context, out)
                print(f"{service.name}: the calls of {args.list} connections in {out}")
            else:
                out = workdir / f"{service.name}.strace"
                measure(service, args, context, out)
                found[service.name] = counts(out.read_text())
    if args.list:
        return 0
    n = args.connections
    names = sorted(set(found["l7proxy"]) | set(found["haproxy"]))
    names.sort(key=lambda name: -found["l7proxy"].get(name, (0, 0))[0])
    print(f"system calls per connection ({mode}, {n} connections; errors in brackets)\n")
    print(f"{'':16} {'l7proxy':>14} {'haproxy':>14}")
    for name in names:
        cells = []
        for proxy in ("l7proxy", "haproxy"):
            calls, errors = found[proxy].get(name, (0, 0))
            cell = f"{calls / n:.2f}" + (f" ({errors / n:.2f})" if errors else "")
            cells.append(cell)
        print(f"{name:16} {cells[0]:>14} {cells[1]:>14}")
    totals = [sum(c for c, _ in found[p].values()) / n for p in ("l7proxy", "haproxy")]
    print(f"{'total':16} {totals[0]:>14.2f} {totals[1]:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
