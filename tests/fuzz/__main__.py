"""``python -m tests.fuzz --budget SECONDS``: every target, budget shared.

Each target runs in its own libFuzzer process (atheris), seeded from the
conformance and differential corpora, with a per-input timeout and an RSS
limit. Crashing inputs are written to ``--artifacts`` and the run fails.

The C extensions (the head scanner, ``parsers/http1/_quickscan.c``, and the fast
constructors, ``parsers/_fastnew.c``) are fuzzed as C: their targets run copies built
with clang for fuzzing (AddressSanitizer, and libFuzzer's edge coverage, so inputs that
reach new C branches are kept), atheris's ASan runtime preloaded. Without clang, they
run the ordinary builds (and say so).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from tests.fuzz.seeds import write_seeds
from tests.fuzz.targets import TARGETS

RUNS = re.compile(r"stat::number_of_executed_units: (\d+)")
PARSERS = Path(__file__).resolve().parents[2] / "parsers"
# The targets that fuzz a C extension: its module, source and the variable that names
# the instrumented build for ``tests.fuzz.run``.
C_TARGETS = {
    "quickscan": ("parsers.http1._quickscan", PARSERS / "http1" / "_quickscan.c"),
    "fastnew": ("parsers._fastnew", PARSERS / "_fastnew.c"),
}


def instrumented_build(target: str, directory: Path) -> dict[str, str]:
    """The environment that makes ``target`` run its C extension built for fuzzing in
    ``directory``; empty without clang (or if it fails to build)."""
    import atheris

    clang = shutil.which("clang")
    if clang is None:
        return {}
    module, source = C_TARGETS[target]
    stem = module.rsplit(".", 1)[1]
    obj = directory / f"{stem}.o"
    lib = directory / (stem + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    flags = ["-fPIC", "-O1", "-g", "-fsanitize=address,fuzzer-no-link"]
    try:
        subprocess.run(
            [clang, "-c", *flags, "-I", include, str(source), "-o", str(obj)], check=True
        )
        # (Linked without the sanitizer runtime: the preloaded one provides it.)
        subprocess.run([clang, "-shared", str(obj), "-o", str(lib)], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"{target}: the instrumented build failed ({exc})")
        return {}
    return {
        "L7PROXY_FUZZ_MODULE": f"{module}={lib}",
        "LD_PRELOAD": str(Path(atheris.path()) / "asan_with_fuzzer.so"),
        # Python frees little at exit on purpose: leaks are not findings here.
        "ASAN_OPTIONS": "detect_leaks=0",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--budget", type=float, default=60, help="total seconds over all targets")
    ap.add_argument("--targets", nargs="*", default=sorted(TARGETS))
    ap.add_argument(
        "--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "l7proxy-fuzz-artifacts"
    )
    ap.add_argument(
        "--timeout", type=int, default=5, help="seconds per input before it counts as a hang"
    )
    ap.add_argument("--rss-limit-mb", type=int, default=1024)
    args = ap.parse_args(argv)

    args.artifacts.mkdir(parents=True, exist_ok=True)
    each = max(1, int(args.budget / len(args.targets)))
    failed = False
    total = 0
    with tempfile.TemporaryDirectory(prefix="l7proxy-fuzz-") as tmp:
        seeds = Path(tmp) / "seeds"
        count = write_seeds(seeds)
        print(f"{count} seed inputs; {each}s per target")
        builds = {}
        for name in sorted(set(C_TARGETS) & set(args.targets)):
            builds[name] = instrumented_build(name, Path(tmp))
            how = "built with ASan and coverage" if builds[name] else "as built"
            print(f"{name}: {C_TARGETS[name][0]} {how}")
        for name in args.targets:
            corpus = Path(tmp) / name
            corpus.mkdir()
            cmd = [
                sys.executable, "-m", "tests.fuzz.run", name,
                f"-max_total_time={each}", f"-timeout={args.timeout}",
                f"-rss_limit_mb={args.rss_limit_mb}",
                f"-artifact_prefix={args.artifacts}/{name}-", "-print_final_stats=1",
                str(corpus), str(seeds),
            ]  # fmt: skip
            env = {**os.environ, **builds[name]} if builds.get(name) else None
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=each + 120, env=env)
            output = proc.stdout + proc.stderr
            runs = RUNS.search(output)
            tried = int(runs.group(1)) if runs else 0
            total += tried
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"{name:<14} {tried:>9} inputs  {status}")
            if proc.returncode != 0:
                failed = True
                print(output[-4000:])
    print(f"total inputs tried: {total}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
