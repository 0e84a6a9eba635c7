"""The HTTP/1 conformance corpora through both parsers: exact counts, so a
regression (or an unexplained change) fails CI. Every case a parser fails
against a corpus is a deliberate difference listed in docs/http1.md."""

from __future__ import annotations

import pytest

from parsers.conformance import load_all, run_corpus
from parsers.conformance.registry import CORPORA_DIR

pytestmark = pytest.mark.skipif(
    not (CORPORA_DIR / "http1").is_dir(), reason=f"conformance corpora not found at {CORPORA_DIR}"
)

# Deliberate differences from llhttp strict mode (docs/http1.md explains each).
LLHTTP_DELIBERATE = {
    "test/request/content-length.md:444",  # skipBody on a request: no such context for a proxy
    "test/request/method.md:135",  # M-SEARCH *: asterisk-form only with OPTIONS
    "test/request/method.md:372",  # ICE/1.0 protocol
    "test/request/method.md:400",  # RTSP/1.0 protocol
    "test/request/method.md:430",  # RTSP/1.0 protocol
    "test/request/sample.md:314",  # HTTP/0.9 request
    "test/request/transfer-encoding.md:751",  # fragment in target
    "test/request/transfer-encoding.md:793",  # fragment in target
    "test/request/uri.md:165",  # fragment in target
    "test/request/uri.md:222",  # userinfo in absolute-form
    "test/response/sample.md:40",  # RTSP response
    "test/response/sample.md:60",  # ICE response
    "test/response/sample.md:645",  # HTTP/0.9 status line
}
# Where h11 is lenient and this proxy is not.
H11_DELIBERATE = {
    "test_readers_unusual#12",  # bare LF
    "test_readers_unusual#13",  # bare LF
    "test_readers_unusual#14",  # bare LF
    "test_readers_unusual#15",  # obs-fold
    "test_ChunkedReader#33",  # whitespace around chunk-extension
    "test_ChunkedReader#34",  # whitespace after chunk size
    "test_allow_some_garbage_in_cookies#45",  # CTL in a field value
}
EXPECTED = {
    "http1/llhttp": (210, LLHTTP_DELIBERATE),
    "http1/h11": (46, H11_DELIBERATE),
}


@pytest.fixture(scope="module")
def runs():
    corpora = load_all()
    return {name: run_corpus(corpora[name], corpora[name].implementations) for name in EXPECTED}


@pytest.mark.parametrize("corpus", sorted(EXPECTED))
@pytest.mark.parametrize("impl", ["c", "python"])
def test_corpus_counts(runs, corpus, impl):
    results, _ = runs[corpus]
    total, deliberate = EXPECTED[corpus]
    result = results[impl]
    assert len(result.passed) + len(result.failed) == total
    assert set(result.failed) == deliberate
    assert len(result.passed) == total - len(deliberate)


@pytest.mark.parametrize("corpus", sorted(EXPECTED))
def test_implementations_agree(runs, corpus):
    _, disagreements = runs[corpus]
    assert disagreements == []


def test_runner_cli_prints_the_table():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "parsers.conformance", "--impl", "both"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "http1/llhttp     c         210   197    13" in out
    assert "http1/h11        python     46    39     7" in out
    assert "disagreements between implementations: 0" in out
