"""Instructions a running process executes while a client works, by valgrind's callgrind.

A count does not move with the machine's load, as CPU time does on a shared 2-core
machine: ``bench.tls_instructions`` and ``bench.http1_instructions`` use it to compare
l7proxy with haproxy, and one version of l7proxy with another. The process runs under
``valgrind_argv`` with instrumentation off; ``count`` switches it on, warms up, zeroes,
runs the client, and reads the dump (user-space instructions: the program, the
interpreter, libraries; not the kernel's).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import LOOPBACK, REPO, started, wait_port

# Operations run before counting: imports, caches and the allocator warm.
WARM_UP = 20


def valgrind_argv(dumps: Path) -> list[str]:
    """The command prefix: callgrind, counting nothing until ``count`` switches it on."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={dumps}/callgrind.out.%p",
    ]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def by_library(dump: Path) -> tuple[int, dict[str, int]]:
    """Total instructions of a callgrind dump, and their split by shared object."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    totals = re.search(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+PROGRAM TOTALS", text, re.M)
    if totals is None:
        raise RuntimeError(f"no PROGRAM TOTALS in callgrind_annotate's output of {dump}")
    total = int(totals[1].replace(",", ""))
    split: Counter[str] = Counter()
    for count, obj in re.findall(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+\S.*\[(.+)\]$", text, re.M):
        split[Path(obj).name.split(".cpython")[0].split(".so")[0]] += int(count.replace(",", ""))
    return total, dict(split)


def count(pid: int, dumps: Path, run: Callable[[int], None], n: int) -> dict[str, Any]:
    """Instructions ``pid`` executes while ``run(n)`` runs, per operation."""
    _control(pid, "--instr=on")
    run(WARM_UP)
    time.sleep(0.5)  # what the warm-up left to do (closes, timers) is not counted
    _control(pid, "--zero")
    run(n)
    time.sleep(0.5)
    before = set(dumps.glob("callgrind.out*"))
    _control(pid, "--dump")
    for _ in range(100):
        new = set(dumps.glob("callgrind.out*")) - before
        if new:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # written whole
    total, split = by_library(max(new, key=os.path.getmtime))
    _control(pid, "--instr=off")
    top = sorted(split.items(), key=lambda kv: -kv[1])[:6]
    return {
        "per_op": round(total / n),
        "by_library": {k: round(v / n) for k, v in top},
        "operations": n,
    }


# ----------------------------------------------------------- the proxies, counted


def start_haproxy(
    stack: ExitStack,
    workdir: Path,
    dumps: Path,
    port: int,
    upstream: int,
    rules: str,
    bind_options: str = "",
) -> int:
    """haproxy (one thread, HTTP mode, keep-alive) under callgrind on ``port`` in
    front of ``upstream``, with ``rules`` in its frontend; its pid."""
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""
global
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
frontend bench
    bind {LOOPBACK}:{port} {bind_options}
    {rules}
    default_backend upstream
backend upstream
    server up {LOOPBACK}:{upstream}
""")
    argv = [*valgrind_argv(dumps), "haproxy", "-db", "-f", str(conf)]
    proc, _ = stack.enter_context(started(argv, log=workdir / "haproxy.log"))
    wait_port(LOOPBACK, port, timeout=120, proc=proc, log=workdir / "haproxy.log")
    return proc.pid


def start_firewall(
    stack: ExitStack,
    workdir: Path,
    dumps: Path,
    port: int,
    upstream: int,
    policy_yaml: str,
    labels: str,
    extra_args: Sequence[str] = (),
    tree: Path = REPO,
) -> int:
    """``l7proxy firewall`` from source tree ``tree`` under callgrind on ``port`` in
    front of ``upstream``; its pid."""
    policy = workdir / f"policy-{dumps.name}.yaml"
    policy.write_text(policy_yaml)
    argv = [
        *valgrind_argv(dumps), sys.executable, "-m", "l7proxy", "firewall",
        "--listen", f"{LOOPBACK}:{port}", "--upstream", f"{LOOPBACK}:{upstream}",
        "--labels", labels, "--policy", str(policy), *extra_args,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(tree))
    proc, _ = stack.enter_context(
        started(
            argv,
            log=workdir / f"{dumps.name}.log",
            ready_line="listening on",
            cwd=tree,  # ``-m l7proxy`` imports from the working directory first
            env=env,
            timeout=300,
        )
    )
    return proc.pid


def read_ok_reply(conn: socket.socket) -> bytes:
    """One reply of nginx's ``ok`` location (its 2-byte body ends it), checked to be a 200."""
    reply = b""
    while not reply.endswith(b"\r\n\r\nok"):
        chunk = conn.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed after {reply[:200]!r}")
        reply += chunk
    if b" 200 " not in reply.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"unexpected reply: {reply[:200]!r}")
    return reply
