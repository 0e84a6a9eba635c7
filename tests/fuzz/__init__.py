"""Fuzzing the HTTP/1 parsers with atheris (libFuzzer, coverage-guided).

    python -m tests.fuzz --budget SECONDS     # all targets, budget split between them
    python -m tests.fuzz.run TARGET [libFuzzer flags]

Targets (``tests.fuzz.targets``): the request and response readers of each
implementation (only typed errors may come out, and the C and Python
parsers must agree on every input), and the engine (no exception at all).
libFuzzer's ``-timeout`` and ``-rss_limit_mb`` turn a hang or unbounded
memory into a failure.
"""
