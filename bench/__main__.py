"""Run benchmarks: ``python -m bench`` runs all, ``python -m bench a b`` runs a subset.

A benchmark is any module of this package that exposes ``main()``; it is
called with no arguments (and ``sys.argv`` holding just its name, so an
argparse default of ``sys.argv[1:]`` sees no options) and returns 0/None
on success. One failing benchmark does not stop the others, but makes the
exit status non-zero.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import bench

NOT_BENCHMARKS = {"common"}


def discover() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS or info.ispkg:
            continue
        names.append(info.name)
    return sorted(names)


def run(names: list[str]) -> int:
    available = discover()
    unknown = [n for n in names if n not in available]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names or available:
        module = importlib.import_module(f"bench.{name}")
        entry = getattr(module, "main", None)
        if not callable(entry):
            continue  # a helper module, not a benchmark
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.monotonic()
        saved_argv, sys.argv = sys.argv, [f"bench.{name}"]
        try:
            status = entry()
        except Exception:  # noqa: BLE001 - report and go on with the next benchmark
            traceback.print_exc()
            status = 1
        finally:
            sys.argv = saved_argv
        print(
            f"=== bench.{name}: {'ok' if not status else 'FAILED'} in "
            f"{time.monotonic() - started:.0f} s ===",
            flush=True,
        )
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
