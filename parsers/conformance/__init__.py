"""Conformance runner: ``python -m parsers.conformance [--impl c|python|both] [--json]``.

Protocols plug their corpora into ``parsers.conformance.registry``; the
HTTP/1.x ones live in ``parsers.conformance.http1``. ``CORPUS_MODULES`` is
the list of modules imported to fill the registry.
"""

from __future__ import annotations

import importlib

from parsers.conformance.registry import (
    CORPORA_DIR,
    REGISTRY,
    Case,
    Corpus,
    Outcome,
    Result,
    register,
    run_corpus,
)

CORPUS_MODULES = ["parsers.conformance.http1"]

__all__ = [
    "CORPORA_DIR",
    "CORPUS_MODULES",
    "REGISTRY",
    "Case",
    "Corpus",
    "Outcome",
    "Result",
    "load_all",
    "register",
    "run_corpus",
]


def load_all() -> dict[str, Corpus]:
    """Import every corpus module (those whose data is present register themselves)."""
    for name in CORPUS_MODULES:
        importlib.import_module(name)
    return REGISTRY
