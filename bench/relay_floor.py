"""What any Python proxy on uvloop pays per keep-alive request, before doing anything.

    python -m bench.relay_floor [--workload realistic|repeated] [--requests 1000]

A relay that only copies bytes (two ``asyncio.Protocol`` objects per connection,
each read written to the other side; no parsing, no policy, no log) runs under
valgrind's callgrind in front of ``bench.conn_cost``'s peer (its upstream and its
client, one request at a time on one kept connection). Then the same for l7proxy's
``Firewall`` (``bench.conn_cost --kept``). Each is run twice, with a few and with
many requests, and the difference of the two totals is divided by the difference of
the two counts: start-up and imports cancel out. Instructions are the process's
user-space ones (interpreter, uvloop, libc), a count the machine's load does not move.

The floor is what the event loop, the transports and the system call wrappers cost
per request; everything l7proxy executes above it is its own work (reading the
heads, judging, the flow record). haproxy's figure for the same exchange is in
``bench/results/http1_instructions.json``. Printed only: docs/http1.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import LOOPBACK, REPO

WARM_UP = 30


class _ToClient(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client.write(data)


class _FromClient(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream_address = upstream
        self._upstream: asyncio.BaseTransport | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._client
        upstream, _ = await loop.create_connection(
            lambda: _ToClient(client),  # type: ignore[arg-type]
            *self._upstream_address,
        )
        self._upstream = upstream
        for data in self._early:
            upstream.write(data)

    def data_received(self, data: bytes) -> None:
        if self._upstream is None:
            self._early.append(data)
        else:
            self._upstream.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> None:
        if self._upstream is not None:
            self._upstream.close()


async def _relay(requests: int, workload: str) -> None:
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.conn_cost", "--peer", "-",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert peer.stdin is not None and peer.stdout is not None
    try:
        upstream = (LOOPBACK, int(await peer.stdout.readline()))
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FromClient(upstream), LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        for count in (WARM_UP, requests):
            peer.stdin.write(f"{port} {count} {workload}\n".encode())
            await peer.stdin.drain()
            if await peer.stdout.readline() != b"done\n":
                raise RuntimeError("the peer failed")
        server.close()
    finally:
        if peer.returncode is None:
            peer.kill()
        await peer.wait()


def _instructions(argv: list[str], out: Path) -> int:
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        cwd=REPO, check=True, capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    summary = out.read_text()
    match = re.search(r"^summary:\s+(\d+)", summary, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary in {out}")
    return int(match.group(1))


def per_request(command: list[str], workload: str, requests: int, workdir: Path) -> float:
    few, many = requests // 5, requests
    totals = [
        _instructions([*command, *self_args], workdir / f"cg.{n}")
        for n, self_args in (
            (few, _args(command, workload, few)),
            (many, _args(command, workload, many)),
        )
    ]
    return (totals[1] - totals[0]) / (many - few)


def _args(command: list[str], workload: str, n: int) -> list[str]:
    if "bench.conn_cost" in command:
        return ["--kept", workload, "--instructions", "--connections", str(n)]
    return ["--run", workload, str(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.relay_floor", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workload", choices=("realistic", "repeated"), default="realistic")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--run", nargs=2, metavar=("WORKLOAD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        import uvloop

        uvloop.run(_relay(int(args.run[1]), args.run[0]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-relay-floor-") as tmp:
        work = Path(tmp)
        rows = [
            ("do-nothing relay", [sys.executable, "-m", "bench.relay_floor"]),
            ("l7proxy Firewall", [sys.executable, "-m", "bench.conn_cost"]),
        ]
        print(f"instructions per request ({args.workload}, {args.requests} requests):")
        for name, command in rows:
            print(f"  {name:18} {per_request(command, args.workload, args.requests, work):9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
