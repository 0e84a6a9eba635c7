"""Instructions per HTTP/1.1 keep-alive request, l7proxy against haproxy, counted by
valgrind's callgrind: the per-request cost without the machine's noise.

    python -m bench http1_instructions [--requests 400] [--tree DIR ...]

``bench/http1_proxy.py`` measures CPU time under wrk, which on a shared 2-core machine
moves by 20-40% between runs. Here each proxy (the API firewall with an L7 rule in
force, and haproxy with the equivalent ACL, both cleartext in front of nginx) runs under
callgrind (``bench/callgrind.py``) while one client sends requests on one kept
connection, one at a time, for each workload of ``bench.http1_proxy``: the same head
repeated, a new query each time (``varied``), and a new path, query and
``X-Request-Id`` each time (``realistic``). Counted: user-space instructions (the
proxy's code, the interpreter, uvloop, libc; not the kernel's work for the four
socket calls of each request, which both proxies make).

``--tree DIR`` (repeatable) counts l7proxy from each source tree given (its
``PYTHONPATH``), to compare two versions on the same nginx in one run. Results go to
``bench/results/http1_instructions.json``.
"""

from __future__ import annotations

import argparse
import socket
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
from bench.http1_proxy import HAPROXY_RULES, LABELS, policy_yaml, realistic_request, varied_request

WORKLOADS: dict[str, Callable[[int, bytes], bytes]] = {
    "repeated": lambda i, host: b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host,
    "varied": varied_request,
    "realistic": realistic_request,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.http1_instructions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--requests", type=int, default=400, help="requests counted per workload")
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        help="count l7proxy from this source tree too (repeatable); default: this one",
    )
    return p.parse_args(argv)


def kept_connection(port: int, make: Callable[[int, bytes], bytes], host: bytes):
    """A client on one kept connection: ``run(n)`` sends n requests, one at a time,
    each the next of the workload, and reads each reply (nginx's body is ``ok``)."""
    conn = socket.create_connection((LOOPBACK, port), timeout=60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0

    def run(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            sent += 1
            conn.sendall(make(sent, host))
            read_ok_reply(conn)

    return run, conn


def start_proxy(
    name: str, tree: Path | None, stack: ExitStack, workdir: Path, upstream: int
) -> tuple[int, int, Path]:
    """One proxy under callgrind: (pid, port, dumps directory)."""
    dumps = workdir / f"dumps-{name.replace('/', '_')}"
    dumps.mkdir()
    port = free_port()
    if tree is None:
        return start_haproxy(stack, workdir, dumps, port, upstream, HAPROXY_RULES), port, dumps
    labels = ",".join(f"{k}={v}" for k, v in LABELS.items())
    pid = start_firewall(
        stack, workdir, dumps, port, upstream, policy_yaml(upstream), labels, tree=tree
    )
    return pid, port, dumps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    trees = [Path(t).resolve() for t in args.tree] or [REPO]
    proxies: dict[str, Path | None] = {"haproxy": None}
    for tree in trees:
        proxies["l7proxy" if tree == REPO else f"l7proxy@{tree}"] = tree
    results: dict[str, dict[str, Any]] = {w: {} for w in WORKLOADS}
    with tempfile.TemporaryDirectory(prefix="bench-http1-ir-") as tmp:
        workdir = Path(tmp)
        nginx_stack = ExitStack()
        with nginx_stack:
            nginx = nginx_stack.enter_context(start_nginx(workdir))
            host = f"{LOOPBACK}:{nginx.port}".encode()
            for name, tree in proxies.items():
                with ExitStack() as stack:
                    pid, port, dumps = start_proxy(name, tree, stack, workdir, nginx.port)
                    for workload, make in WORKLOADS.items():
                        run, conn = kept_connection(port, make, host)
                        with conn:
                            results[workload][name] = count(pid, dumps, run, args.requests)
    headline = {
        f"{workload}_instructions_{name}_over_haproxy": round(
            by_proxy[name]["per_op"] / by_proxy["haproxy"]["per_op"], 3
        )
        for workload, by_proxy in results.items()
        for name in by_proxy
        if name != "haproxy"
    }
    doc = {
        "settings": {
            "requests": args.requests,
            "client": "Python, one kept connection, one request at a time, TCP_NODELAY",
            "valgrind": tool_version(["valgrind", "--version"]),
            "haproxy_version": tool_version(["haproxy", "-v"]),
        },
        "headline": headline,
        "results": results,
    }
    path = write_results("http1_instructions", doc)
    rows = [
        [
            workload,
            name,
            f"{r['per_op']:,}",
            ", ".join(f"{k} {v / 1000:.0f}k" for k, v in r["by_library"].items()),
        ]
        for workload, by_proxy in results.items()
        for name, r in by_proxy.items()
    ]
    print(markdown_table(["workload", "proxy", "instructions per request", "by library"], rows))
    for key, value in headline.items():
        print(f"{key}: {value}x")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
