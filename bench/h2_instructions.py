"""Instructions per MiB of an HTTP/2 download, or per small GET, through l7proxy,
counted by callgrind.

    python -m bench.h2_instructions [--mib 8] [--downloads 4] [--tree DIR ...]
    python -m bench.h2_instructions --small [--requests 2000] [--tree DIR ...]

``bench.h2``'s 1 GiB download measures a rate and the proxy's CPU time, which on a
shared 2-core machine move with everything else running. Here the firewall (the
policy of ``bench.h2``) runs under callgrind (``bench/callgrind.py``) in front of
nghttpd while h2load downloads a sparse file of ``--mib`` MiB on one stream
(``-n 1 -c 1 -m 1``, its 1 GiB windows), ``--downloads`` times after a warm-up.
Counted: the proxy's user-space instructions per MiB (its Python, the interpreter,
uvloop, libc's copies; not the kernel's work in ``recv`` and ``writev``, about half
of the proxy's CPU time in a download).

``--small`` counts ``bench.h2``'s small requests instead: the firewall, with
``--flowlog`` as in production, in front of nghttpd serving a 64-byte file, and
h2load sending GETs on 4 connections of 16 streams each, once ``--requests``
and once three times as many. The difference of the two counts, over the
difference of the GETs, is what one GET costs with the connections' opening and
closing taken out.

``--tree DIR`` (repeatable) counts l7proxy from each source tree given, to compare
two versions on the same nghttpd in one run. Nothing is written to ``bench/results``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.callgrind import count, start_firewall
from bench.common import REPO, free_port, markdown_table
from bench.h2 import LABELS, POLICY
from bench.h2_tools import h2load, nghttpd

# The small GETs' shape, as bench.h2 sends them.
SMALL_CLIENTS = 4
SMALL_STREAMS = 16


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.h2_instructions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mib", type=int, default=8, help="size of the file downloaded")
    p.add_argument("--downloads", type=int, default=4, help="downloads counted")
    p.add_argument("--small", action="store_true", help="count small GETs (bench.h2's) instead")
    p.add_argument("--requests", type=int, default=2000, help="--small: GETs of the first count")
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        help="count l7proxy from this source tree (repeatable); default: this one",
    )
    return p.parse_args(argv)


def downloads(port: int, mib: int):
    """``run(n)``: n downloads of the file through ``port``, each checked whole."""

    def run(n: int) -> None:
        for _ in range(n):
            url = f"http://127.0.0.1:{port}/public/big.bin"
            result = h2load(url, requests=1, clients=1, streams=1)
            if result["failed"] or result["succeeded"] != 1:
                raise RuntimeError(f"download of {mib} MiB failed: {result}")

    return run


def small_gets(port: int):
    """``run(n)``: n GETs of the 64-byte file through ``port``, all checked."""

    def run(n: int) -> None:
        url = f"http://127.0.0.1:{port}/public/small.txt"
        result = h2load(url, requests=n, clients=SMALL_CLIENTS, streams=SMALL_STREAMS)
        if result["failed"] or result["succeeded"] != n:
            raise RuntimeError(f"{n} small GETs did not all succeed: {result}")

    return run


def proxies(
    trees: list[Path], workdir: Path, server_port: int, *, flowlog: bool = False
) -> Iterator[tuple[str, int, Path, int]]:
    """Each tree's firewall in turn under callgrind, in front of ``server_port``: its
    name, pid, dump directory and port (stopped before the next one starts)."""
    labels = ",".join(f"{k}={v}" for k, v in LABELS.items())
    policy = POLICY.format(port=server_port)
    for i, tree in enumerate(trees):
        dumps = workdir / f"dumps-{i}"
        dumps.mkdir()
        port = free_port()
        extra = ["--flowlog", str(workdir / f"flows-{i}.jsonl")] if flowlog else []
        with ExitStack() as stack:
            pid = start_firewall(
                stack, workdir, dumps, port, server_port, policy, labels, extra, tree
            )
            yield ("l7proxy" if tree == REPO else f"l7proxy@{tree}"), pid, dumps, port


def count_small(trees: list[Path], requests: int) -> int:
    """Instructions per small GET for each tree: (count of 3n - count of n) / 2n."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-h2-ir-") as tmp:
        workdir = Path(tmp)
        docroot = workdir / "docroot"
        (docroot / "public").mkdir(parents=True)
        (docroot / "public" / "small.txt").write_bytes(b"x" * 64)
        with nghttpd(docroot) as (server_port, _):
            for name, pid, dumps, port in proxies(trees, workdir, server_port, flowlog=True):
                run = small_gets(port)
                few = count(pid, dumps, run, requests)
                many = count(pid, dumps, run, 3 * requests)
                extra = 2 * requests
                libraries = many["by_library"].keys() & few["by_library"].keys()
                results[name] = {
                    "per_get": round((many["per_op"] * 3 - few["per_op"]) / 2),
                    "by_library": {
                        k: round((many["by_library"][k] * 3 * requests
                                  - few["by_library"][k] * requests) / extra)
                        for k in sorted(libraries, key=lambda k: -many["by_library"][k])
                    },
                }  # fmt: skip
    rows = [
        [
            name,
            f"{r['per_get']:,}",
            ", ".join(f"{k} {v / 1000:.1f}k" for k, v in r["by_library"].items()),
        ]
        for name, r in results.items()
    ]
    print(
        f"small GETs ({SMALL_CLIENTS} connections x {SMALL_STREAMS} streams): "
        f"{3 * requests} counted less {requests}, after a warm-up"
    )
    print(markdown_table(["proxy", "instructions per GET", "by library"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    trees = [Path(t).resolve() for t in args.tree] or [REPO]
    if args.small:
        return count_small(trees, args.requests)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-h2-ir-") as tmp:
        workdir = Path(tmp)
        docroot = workdir / "docroot"
        (docroot / "public").mkdir(parents=True)
        with open(docroot / "public" / "big.bin", "wb") as big:
            big.truncate(args.mib << 20)
        with nghttpd(docroot) as (server_port, _):
            for name, pid, dumps, port in proxies(trees, workdir, server_port):
                counted = count(pid, dumps, downloads(port, args.mib), args.downloads)
                results[name] = {
                    "per_mib": round(counted["per_op"] / args.mib),
                    "by_library": {
                        k: round(v / args.mib) for k, v in counted["by_library"].items()
                    },
                }
    rows = [
        [
            name,
            f"{r['per_mib']:,}",
            ", ".join(f"{k} {v / 1000:.0f}k" for k, v in r["by_library"].items()),
        ]
        for name, r in results.items()
    ]
    print(f"{args.downloads} downloads of {args.mib} MiB, after a warm-up")
    print(markdown_table(["proxy", "instructions per MiB", "by library"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
