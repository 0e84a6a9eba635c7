"""HTTP/1.1 request heads through the engine, in process: ``python -m bench.http1_heads``.

The part of ``bench.http1_proxy``'s cost that is l7proxy's own, without sockets,
nginx or wrk: request heads go through the real ``Http1Engine`` (or the engine and
the driver's ``Pipe``, with transports that drop what they are given), judged by
the bench's real compiled policy (GET ``/.*`` from host), each answered with a
canned nginx response. Three workloads, as in ``bench.http1_proxy``:

- ``repeated``: ``GET /`` with the same head every time (the keep-alive memo's case);
- ``varied``: ``GET /?n=N``, only the target differs;
- ``realistic``: ``GET /public/item/N?q=M`` with ``X-Request-Id: hhhh-N``: path,
  query and one header differ on every request (issue 15).

Reported: microseconds per request/response pair, the minimum over ``--repeats``
runs (the least disturbed one on a shared machine). For instruction counts, which
do not depend on the machine's load, run one workload under callgrind:

    valgrind --tool=callgrind python -m bench.http1_heads --only realistic:engine \\
        --requests 3000 --repeats 1

Results go to ``bench/results/http1_heads.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

NAME = "http1_heads"
RESULTS = Path(__file__).resolve().parent / "results" / f"{NAME}.json"
UPSTREAM = ("127.0.0.1", 18080)
HOST = b"127.0.0.1:18080"
# What nginx 1.22 answers the bench's ``GET /`` (``return 200 "ok"``), byte for byte
# but the date.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 06:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


def workload(name: str, n: int) -> list[bytes]:
    """The request heads of one workload, as wrk sends them, built before timing."""
    if name == "repeated":
        return [b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST] * n
    if name == "varied":
        return [b"GET /?n=%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, HOST) for i in range(n)]
    if name == "realistic":
        return [
            b"GET /public/item/%d?q=%d HTTP/1.1\r\nHost: %s\r\nX-Request-Id: %04x-%d\r\n\r\n"
            % (i, i * 7919 % 100000, HOST, i * 40503 % 65536, i)
            for i in range(n)
        ]
    raise ValueError(f"unknown workload {name!r}")


WORKLOADS = ("repeated", "varied", "realistic")
MODES = ("engine", "pipe")


class Setup:
    """The compiled policy of ``bench.http1_proxy`` and a way to make engines and pipes."""

    def __init__(self, workdir: Path) -> None:
        from bench.http1_proxy import LABELS, policy_yaml
        from l7proxy.observe.flowlog import FlowLog
        from l7proxy.proxy.firewall import Firewall
        from parsers.registry import engine_factory

        policy_file = workdir / "policy.yaml"
        policy_file.write_text(policy_yaml(UPSTREAM[1]))
        fw = Firewall(
            listen=("127.0.0.1", 0),
            upstream=UPSTREAM,
            labels=LABELS,
            policy_paths=[policy_file],
            flowlog=FlowLog(),
        )
        state = fw.state
        assert state is not None
        self.policy = state.connection(
            state.side("127.0.0.1", 40000), state.side(UPSTREAM[0], UPSTREAM[1], fw.service)
        )
        self.factory = engine_factory(self.policy.parser)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def runner(self, mode: str, requests: list[bytes]) -> Callable[[], None]:
        policy, factory = self.policy, self.factory
        if mode == "engine":

            def run_engine() -> None:
                engine = factory(policy.decide)
                client, server = engine.client_data, engine.server_data
                for request in requests:
                    client(request)
                    server(RESPONSE)

            return run_engine

        from bench.http1_proxy import Sink
        from l7proxy.observe.flowlog import FlowLog
        from l7proxy.proxy.driver import Pipe, ProxyLimits, ProxyStats

        loop = self.loop

        def run_pipe() -> None:
            pipe = Pipe(
                loop,
                factory(policy.decide),
                FlowLog(),
                policy.parser,
                ProxyLimits(),
                ProxyStats(),
                client=Sink(),  # type: ignore[arg-type]
            )
            pipe.server_connected(Sink())  # type: ignore[arg-type]
            client, server = pipe.client_data, pipe.server_data
            for request in requests:
                client(request)
                server(RESPONSE)

        return run_pipe


def measure(run: Callable[[], None], n: int, repeats: int) -> float:
    """Microseconds per request/response pair: the least of ``repeats`` CPU times."""
    run()  # warm: imports, caches, the interpreter's specialisation
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best * 1e6 / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http1_heads", description=__doc__)
    p.add_argument("--requests", type=int, default=20000, help="request/response pairs per run")
    p.add_argument("--repeats", type=int, default=5, help="runs per case (the least is kept)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORKLOAD:MODE",
        help=f"one case (workloads {', '.join(WORKLOADS)}; modes {', '.join(MODES)}); repeatable",
    )
    p.add_argument("--no-write", dest="write", action="store_false", help="print only")
    return p.parse_args([] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [tuple(c.split(":", 1)) for c in args.only] or [
        (w, m) for w in WORKLOADS for m in MODES
    ]
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="l7bench-") as tmp:
        setup = Setup(Path(tmp))
        try:
            for work, mode in cases:
                requests = workload(work, args.requests)
                us = measure(setup.runner(mode, requests), args.requests, args.repeats)
                rows[f"{work}:{mode}"] = us
                print(f"{work:<10} {mode:<7} {us:7.2f} us per request/response", flush=True)
        finally:
            setup.close()
    if args.write and not args.only:
        from parsers.http1.engine import ACTIVE_IMPLEMENTATION

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {
                    "benchmark": NAME,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "python": sys.version.split()[0],
                    "machine": platform.machine(),
                    "parser": ACTIVE_IMPLEMENTATION,
                    "requests": args.requests,
                    "repeats": args.repeats,
                    "us_per_request": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
