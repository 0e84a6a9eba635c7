"""Print a pass/fail table per corpus and implementation, and the disagreements."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from parsers.conformance import load_all, run_corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parsers.conformance", description=__doc__)
    ap.add_argument("--impl", choices=["c", "python", "both"], default="both")
    ap.add_argument("--corpus", action="append", help="only this corpus (repeatable)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--failures", action="store_true", help="list the failing case ids")
    args = ap.parse_args(argv)

    report: dict[str, list[dict[str, Any]]] = {"corpora": [], "disagreements": []}
    for name, corpus in load_all().items():
        if args.corpus and name not in args.corpus:
            continue
        if corpus.source is not None and not corpus.source.exists():
            print(f"skip {name}: {corpus.source} not found", file=sys.stderr)
            continue
        impls = (
            corpus.implementations
            if args.impl == "both"
            else tuple(i for i in corpus.implementations if i == args.impl)
        )
        results, disagreements = run_corpus(corpus, impls)
        for impl, res in results.items():
            report["corpora"].append(
                {
                    "corpus": name,
                    "implementation": impl,
                    "cases": len(res.passed) + len(res.failed),
                    "passed": len(res.passed),
                    "failed": len(res.failed),
                    "failures": res.failed,
                }
            )
        for case_id, summaries in disagreements:
            report["disagreements"].append(
                {"corpus": name, "case": case_id, "summaries": summaries}
            )

    if args.json:
        print(json.dumps(report, indent=2, default=repr))
        return 0
    print(f"{'corpus':<16} {'impl':<7} {'cases':>5} {'pass':>5} {'fail':>5}")
    for row in report["corpora"]:
        print(
            f"{row['corpus']:<16} {row['implementation']:<7} {row['cases']:>5} {row['passed']:>5} "
            f"{row['failed']:>5}"
        )
        if args.failures:
            for case_id in row["failures"]:
                print(f"    fail: {case_id}")
    print(f"\ndisagreements between implementations: {len(report['disagreements'])}")
    for d in report["disagreements"]:
        print(f"  {d['corpus']} {d['case']}")
        for impl, summary in d["summaries"].items():
            print(f"    {impl}: {summary!r:.300}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
