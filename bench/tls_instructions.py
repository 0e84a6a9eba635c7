"""Instructions per TLS handshake and per HTTPS keep-alive request, l7proxy against
haproxy, counted by valgrind's callgrind: a figure that a busy machine does not move.

    python -m bench tls_instructions [--handshakes 50] [--requests 400]

``bench/tls.py`` measures CPU time, which on a shared 2-core machine moves by 20% between
runs. Here each proxy runs under ``valgrind --tool=callgrind`` with instrumentation off
until it is ready, then counts the user-space instructions it executes (its own code,
Python's interpreter, uvloop, OpenSSL, libc; not the kernel's) while a client runs, one
at a time:

- handshakes: new connections, each a full TLS 1.3 handshake (X25519, the EC P-256
  certificate of ``bench/tls.py``), a GET and ``Connection: close``;
- keep-alive: GETs on one kept connection;

and the same for l7proxy in cleartext. The counts are split by library (``libcrypto``
is OpenSSL's cryptography, ``python3.11`` the interpreter running l7proxy's code). The
client sets TCP_NODELAY (Nagle's algorithm would hold its request behind the Finished
message until a delayed ACK). Results go to ``bench/results/tls_instructions.json``.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.callgrind import count, read_ok_reply, start_firewall, start_haproxy
from bench.common import (
    LOOPBACK,
    REPO,
    free_port,
    markdown_table,
    start_nginx,
    tool_version,
    write_results,
)
from bench.tls import (
    HAPROXY_RULES,
    NAME,
    firewall_tls_args,
    haproxy_tls_bind,
    make_certificate,
    policy_yaml,
)

REQUEST = f"GET /x HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()
REQUEST_CLOSE = f"GET /x HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
PROXIES = ("l7proxy", "haproxy", "l7proxy-cleartext")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.tls_instructions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--handshakes", type=int, default=50, help="connections counted")
    p.add_argument("--requests", type=int, default=400, help="keep-alive requests counted")
    return p.parse_args(argv)


# --------------------------------------------------------------------- the client


def _connect(port: int, context: ssl.SSLContext | None) -> socket.socket:
    raw = socket.create_connection((LOOPBACK, port), timeout=60)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname=NAME) if context else raw


def _read_to_end(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def new_connections(port: int, context: ssl.SSLContext | None, n: int) -> None:
    for _ in range(n):
        with _connect(port, context) as conn:
            conn.sendall(REQUEST_CLOSE)
            reply = _read_to_end(conn)
        if b" 200 " not in reply.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"unexpected reply: {reply[:200]!r}")


def kept_connection(port: int, context: ssl.SSLContext | None) -> Callable[[int], None]:
    conn = _connect(port, context)

    def requests(n: int) -> None:
        for _ in range(n):
            conn.sendall(REQUEST)
            read_ok_reply(conn)

    return requests


# --------------------------------------------------------------------- the proxies


def start_proxy(name: str, stack: ExitStack, workdir: Path, upstream: int, files) -> tuple:
    """One proxy under callgrind: (pid, port, dumps directory)."""
    _ca, cert, key, combined = files
    dumps = workdir / f"dumps-{name}"
    dumps.mkdir()
    port = free_port()
    if name == "haproxy":
        tls_bind = haproxy_tls_bind(combined)
        pid = start_haproxy(stack, workdir, dumps, port, upstream, HAPROXY_RULES, tls_bind)
        return pid, port, dumps
    tls = firewall_tls_args(cert, key)
    extra = tls if name == "l7proxy" else []
    pid = start_firewall(
        stack, workdir, dumps, port, upstream, policy_yaml(upstream), "app=bench", extra
    )
    return pid, port, dumps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results: dict[str, dict[str, Any]] = {"handshakes": {}, "keepalive": {}}
    with tempfile.TemporaryDirectory(prefix="bench-tls-ir-") as tmp:
        workdir = Path(tmp)
        files = make_certificate(workdir)
        client = ssl.create_default_context(cafile=str(files[0]))
        for name in PROXIES:
            with ExitStack() as stack:
                nginx = stack.enter_context(start_nginx(workdir, name=f"nginx-{name}"))
                pid, port, dumps = start_proxy(name, stack, workdir, nginx.port, files)
                context = None if name == "l7proxy-cleartext" else client
                results["handshakes"][name] = count(
                    pid,
                    dumps,
                    lambda n, port=port, context=context: new_connections(port, context, n),
                    args.handshakes,
                )
                results["keepalive"][name] = count(
                    pid, dumps, kept_connection(port, context), args.requests
                )
    hs, ka = results["handshakes"], results["keepalive"]
    doc = {
        "settings": {
            "handshakes": args.handshakes,
            "requests": args.requests,
            "client": "Python ssl, one connection at a time, TCP_NODELAY",
            "valgrind": tool_version(["valgrind", "--version"]),
            "openssl": tool_version(["openssl", "version"]),
            "haproxy_version": tool_version(["haproxy", "-v"]),
        },
        "headline": {
            "handshake_instructions_l7proxy_over_haproxy": round(
                hs["l7proxy"]["per_op"] / hs["haproxy"]["per_op"], 3
            ),
            "keepalive_instructions_l7proxy_over_haproxy": round(
                ka["l7proxy"]["per_op"] / ka["haproxy"]["per_op"], 3
            ),
        },
        "results": results,
    }
    path = write_results("tls_instructions", doc)
    rows = [
        [kind, name, f"{r['per_op']:,}"]
        + [", ".join(f"{lib} {v / 1000:,.0f}k" for lib, v in r["by_library"].items())]
        for kind in results
        for name, r in results[kind].items()
    ]
    print(markdown_table(["load", "proxy", "instructions per op", "by library"], rows))
    h = doc["headline"]
    print(
        f"\nhandshake, l7proxy / haproxy: {h['handshake_instructions_l7proxy_over_haproxy']}x"
        f"\nkeep-alive request, l7proxy / haproxy: "
        f"{h['keepalive_instructions_l7proxy_over_haproxy']}x"
    )
    print(f"\nwritten: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
