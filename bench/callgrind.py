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
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
