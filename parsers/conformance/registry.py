"""A small registry of conformance corpora, so every protocol plugs in the same way.

A corpus names its cases and knows how to run one case through one
implementation of a parser. The runner (``python -m parsers.conformance``)
does the rest: a pass/fail table per corpus and implementation, and the
list of cases where the implementations disagree.

    register(Corpus(name="http1/llhttp", protocol="http1", load=..., run=...,
                    implementations=("c", "python")))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

# ../shared/corpora from the repository root (never copied into the repo).
CORPORA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"


@dataclass(slots=True)
class Case:
    id: str
    data: Any  # what ``run`` needs (bytes plus the corpus's own metadata)
    expected: Any  # what ``check`` compares against


@dataclass(slots=True)
class Outcome:
    """What one implementation made of one case. ``summary`` is a plain,
    comparable description (accept/reject and everything parsed); two
    implementations agree when their summaries are equal."""

    accepted: bool
    summary: Any
    error: Exception | None = None


@dataclass(slots=True)
class Corpus:
    name: str
    protocol: str
    load: Callable[[], list[Case]]
    run: Callable[[Case, str], Outcome]
    check: Callable[[Case, Outcome], bool]  # True when the outcome is what the corpus expects
    implementations: tuple[str, ...]
    description: str = ""
    source: Path | None = None


@dataclass(slots=True)
class Result:
    corpus: str
    implementation: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


REGISTRY: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
    REGISTRY[corpus.name] = corpus
    return corpus


# A case on which implementations disagree: (case id, {implementation: summary}).
Disagreement: TypeAlias = tuple[str, dict[str, Any]]


def run_corpus(
    corpus: Corpus, implementations: tuple[str, ...]
) -> tuple[dict[str, Result], list[Disagreement]]:
    """Run every case through each implementation.

    Returns (results per implementation, disagreements) where a disagreement
    is ``(case id, {impl: summary})`` for cases whose summaries differ.
    """
    cases = corpus.load()
    results = {impl: Result(corpus.name, impl) for impl in implementations}
    disagreements: list[Disagreement] = []
    for case in cases:
        outcomes: dict[str, Outcome] = {}
        for impl in implementations:
            outcome = corpus.run(case, impl)
            outcomes[impl] = outcome
            bucket = results[impl].passed if corpus.check(case, outcome) else results[impl].failed
            bucket.append(case.id)
        summaries = {impl: o.summary for impl, o in outcomes.items()}
        if len({repr(s) for s in summaries.values()}) > 1:
            disagreements.append((case.id, summaries))
    return results, disagreements
