"""HTTP/1 parser throughput: ``python -m bench.parser_http1``.

A realistic request mix (browser GETs with many headers, small API calls,
JSON POSTs with Content-Length, chunked uploads) is pipelined into one
stream and fed in 16 KiB reads, as a socket would deliver it. Measured for
each implementation: the request reader alone, and the whole engine
(judge, re-serialise, forward). Baselines in the same run: bare llhttp via
httptools (callbacks only, no checks) and h11. Figures are MB/s and
requests/s (best of several rounds); ratios are against bare llhttp.
Results go to ``bench/results/parser_http1.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import h11
import httptools

from parsers.base import allow_all
from parsers.http1.engine import Http1Engine, request_reader

RESULTS = Path(__file__).resolve().parent / "results" / "parser_http1.json"
READ_SIZE = 16384
ROUNDS = 5

BROWSER_GET = (
    b"GET /static/app/main.3f9a1c.js?v=20261122 HTTP/1.1\r\n"
    b"Host: shop.example.test\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://shop.example.test/catalog/shoes?page=2\r\n"
    b"Cookie: session=8c2f1e0b6a7d4e55a0c1; theme=dark; consent=1; ab=variant-b\r\n"
    b"Sec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
API_GET = (
    b"GET /api/v1/orders/123456?expand=items HTTP/1.1\r\nHost: api.internal\r\n"
    b"Authorization: Bearer abc.def.ghi\r\nAccept: application/json\r\n\r\n"
)
JSON_BODY = json.dumps(
    {"items": [{"sku": f"SKU-{i}", "qty": i % 3 + 1} for i in range(40)]}
).encode()
JSON_POST = (
    b"POST /api/v1/orders HTTP/1.1\r\nHost: api.internal\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(JSON_BODY) + JSON_BODY
)
UPLOAD = b"x" * 16384
CHUNKED_UPLOAD = (
    b"PUT /upload/blob-77 HTTP/1.1\r\nHost: files.internal\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"1000\r\n" + UPLOAD[i : i + 4096] + b"\r\n" for i in range(0, len(UPLOAD), 4096))
    + b"0\r\n\r\n"
)
MIX = [BROWSER_GET] * 4 + [API_GET] * 4 + [JSON_POST] * 2 + [CHUNKED_UPLOAD]


def stream(total_requests: int = 5500) -> tuple[bytes, int]:
    reps = total_requests // len(MIX)
    return b"".join(MIX) * reps, reps * len(MIX)


def reads(data: bytes) -> list[bytes]:
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def run_reader(impl: str, pieces: list[bytes]) -> int:
    reader = request_reader(impl)
    ends = 0
    for piece in pieces:
        for event in reader.feed(piece):
            ends += type(event).__name__ == "End"
    return ends


def run_engine(impl: str, pieces: list[bytes]) -> int:
    engine = Http1Engine(allow_all, parser=impl)
    accesses = 0
    for piece in pieces:
        for cmd in engine.client_data(piece):
            accesses += type(cmd).__name__ == "Access"
    return accesses


class _Callbacks:
    __slots__ = ("done",)

    def __init__(self):
        self.done = 0

    def on_message_complete(self):
        self.done += 1


def run_llhttp(pieces: list[bytes]) -> int:
    cb = _Callbacks()
    parser = httptools.HttpRequestParser(cb)
    for piece in pieces:
        parser.feed_data(piece)
    return cb.done


def run_h11(pieces: list[bytes]) -> int:
    conn = h11.Connection(h11.SERVER)
    done = 0
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                break
            if type(event) is h11.EndOfMessage:
                done += 1
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
    return done


def best_time(fn, *args, expect: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        got = fn(*args)
        elapsed = time.perf_counter() - start
        if got != expect:
            raise AssertionError(f"{fn.__name__} read {got} requests, expected {expect}")
        best = min(best, elapsed)
    return best


def main(argv: list[str] | None = None) -> int:
    data, count = stream()
    pieces = reads(data)
    runs = {
        "llhttp bare (baseline)": lambda: best_time(run_llhttp, pieces, expect=count),
        "h11 (baseline)": lambda: best_time(run_h11, pieces, expect=count),
        "reader c": lambda: best_time(run_reader, "c", pieces, expect=count),
        "reader python": lambda: best_time(run_reader, "python", pieces, expect=count),
        "engine c": lambda: best_time(run_engine, "c", pieces, expect=count),
        "engine python": lambda: best_time(run_engine, "python", pieces, expect=count),
    }
    rows = {}
    for name, measure in runs.items():
        seconds = measure()
        rows[name] = {
            "seconds": seconds,
            "mb_per_s": len(data) / seconds / 1e6,
            "requests_per_s": count / seconds,
        }
    base = rows["llhttp bare (baseline)"]["seconds"]
    for row in rows.values():
        row["time_vs_llhttp_bare"] = row["seconds"] / base

    print(
        f"HTTP/1 request parsing: {count} requests, {len(data) / 1e6:.1f} MB, {READ_SIZE} B "
        f"reads, best of {ROUNDS}"
    )
    print(f"{'parser':<24} {'MB/s':>9} {'req/s':>11} {'time vs bare llhttp':>20}")
    for name, row in rows.items():
        print(
            f"{name:<24} {row['mb_per_s']:>9.1f} {row['requests_per_s']:>11.0f} "
            f"{row['time_vs_llhttp_bare']:>19.2f}x"
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "parser_http1",
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "requests": count,
                "bytes": len(data),
                "read_size": READ_SIZE,
                "rounds": ROUNDS,
                "mix": {"browser_get": 4, "api_get": 4, "json_post": 2, "chunked_upload_16k": 1},
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    shown = RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS
    print(f"written {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
