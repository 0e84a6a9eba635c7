"""Common request heads read with one regular expression; anything else by the full parser.

Most request heads on the wire are plain: a common method, an origin-form target
of unreserved characters, HTTP/1.1, and field lines written ``Name: value``.
``QuickRequestHead`` sits in front of either head parser (``parsers.http1.fast`` or
``parsers.http1.head``) and reads such a head with one ``fullmatch`` (which checks
every byte) and one ``findall`` (which cuts the fields out), instead of llhttp's
Python callbacks or the pure-Python parser's line-by-line checks. How the body is
framed is decided by the shared ``frame_request``, as for every head.

``SIMPLE_REQUEST_HEAD`` accepts a strict subset of what both parsers accept: no
obs-text, HTAB, empty value or surrounding whitespace in a field value, no
``://`` in the target, no Transfer-Encoding. A head outside it (or one
``frame_request`` refuses) goes to the full parser, which accepts it or raises its
own typed error, so what is accepted, refused and how, is the full parser's
everywhere. ``tests/parsers/http1/test_http1_quick.py`` checks that whatever the
scan accepts, both full parsers accept with the same result.

A head read this way is also canonical: its bytes are exactly what
``parsers.http1.engine.serialise_request`` would write for it (one space after
each colon, no framing field but a last ``Content-Length: N``), so the engine
forwards those bytes as they are (``MessageHead.wire``).

Two implementations, one contract. ``quick_request_head`` below is the Python one.
``parsers/http1/_quickscan.c`` (built by ``setup.py``) is its C twin for a strict
subset of these heads (no Content-Length, Transfer-Encoding, Upgrade or Expect; a
Connection of ``close`` or ``keep-alive`` only; a Host without brackets): it gives
the same ``MessageHead`` in one pass, with the engine's decoded fields
(``derived_fields``) already made, or None, and then the Python one reads the head.
``QUICK_IMPLEMENTATION`` says which runs (``l7proxy status``: ``http1_quick``);
``L7PROXY_HTTP1_QUICK=c|python`` forces one; when it is not forced, the engine's
pure-Python parser (``L7PROXY_HTTP1_PARSER=python``) comes with the Python twin.
``tests/parsers/http1/test_http1_quickscan.py`` holds the two equal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal

from parsers.http1.errors import Http1Error
from parsers.http1.head import (
    FrontParser,
    MessageHead,
    RequestFields,
    RequestHeadParser,
    frame_request,
    framing_fields,
    new_message_head,
)
from parsers.switch import forced_implementation

__all__ = [
    "C_SCANNER",
    "C_SCANNER_MISSING",
    "MAX_QUICK_FIELDS",
    "QUICK_IMPLEMENTATION",
    "SIMPLE_REQUEST_HEAD",
    "QuickRequestHead",
    "quick_implementation",
    "quick_request_head",
]

# Methods read here: the common ones whose target is origin-form (not CONNECT, not
# OPTIONS *), all in llhttp's list and the pure-Python parser's.
_METHOD = rb"GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS"
# The characters of ``parsers.http1.memo.SIMPLE_TARGET``: a subset of the origin-form
# both parsers accept. A ``%`` must start an escape and ``://`` may not appear; both
# are looked for apart (one alternative per character makes the expression 3x slower).
_TARGET = rb"/[A-Za-z0-9._~!$&'()*+,;=:/?%\-]*"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# ``Name: value``: one space, then visible ASCII and spaces, starting with a visible
# one (a value ending in a space is looked for apart: `` \r\n`` in the head).
_FIELD = _TOKEN + rb": [\x21-\x7e][\x20-\x7e]*\r\n"
SIMPLE_REQUEST_HEAD = re.compile(
    rb"(" + _METHOD + rb") (" + _TARGET + rb") HTTP/1\.([01])\r\n((?:" + _FIELD + rb")*)\r\n"
)
# Cuts the fields out of a section that SIMPLE_REQUEST_HEAD has already checked.
_FIELD_PAIR = re.compile(rb"([^:]+): ([^\r]*)\r\n")
# More field lines than this go to the full parser (the pure-Python one counts lines).
MAX_QUICK_FIELDS = 100


def quick_request_head(raw: bytes) -> MessageHead | None:
    """The parsed head of ``raw`` (a whole head, up to its empty line), or None when
    it is not a plain head: then only the full parser may say what it is."""
    match = SIMPLE_REQUEST_HEAD.fullmatch(raw)
    if match is None or raw.find(b" \r\n") >= 0:
        return None
    start, end = match.span(2)
    if raw.find(b"://", start, end) >= 0:
        return None
    if raw.find(b"%", start, end) >= 0 and _BAD_ESCAPE.search(raw, start, end) is not None:
        return None
    method, target, minor, section = match.groups()
    fields: list[tuple[bytes, bytes]] = _FIELD_PAIR.findall(section)
    if len(fields) > MAX_QUICK_FIELDS:
        return None
    # (Positional: keywords cost twice as much to pass, per head.)
    version = "1.1" if minor == b"1" else "1.0"
    head = new_message_head(
        method.decode("ascii"), target.decode("ascii"), 0, "", version, fields, len(raw)
    )
    framing = framing_fields(head)
    try:
        frame_request(head, framing, target_checked=True)
    except Http1Error:
        return None  # the full parser raises its own error for it
    if b"transfer-encoding" in framing:
        return None  # llhttp has quirks of its own about Transfer-Encoding
    if b"content-length" not in framing:
        head.wire = raw
    elif head.framing == "length" and raw.endswith(b"\r\nContent-Length: %d\r\n\r\n" % head.length):
        head.wire = raw  # (frame_request refuses a second Content-Length)
    return head


# ---------------------------------------------------------------- the C twin

ScanRequestHead = Callable[[bytes], "MessageHead | None"]


def _load_c_scanner() -> tuple[ScanRequestHead | None, str]:
    """The C scanner, configured with the classes it builds; or None and why not."""
    try:
        from parsers.http1 import _quickscan
    except ImportError as exc:  # not built (no compiler, or a checkout not set up)
        return None, f"not built ({exc})"
    try:
        names = tuple(f.name for f in dataclasses.fields(MessageHead))
        _quickscan.configure(MessageHead, RequestFields, names)
    except TypeError as exc:  # MessageHead changed and the C file did not
        return None, f"out of date: {exc}"
    return _quickscan.scan_request_head, ""


C_SCANNER, C_SCANNER_MISSING = _load_c_scanner()


def derive_forms(
    make_request: Callable[[str, str, str, tuple[tuple[str, str], ...], str], Any],
    make_form: Callable[[Any, bytes], Any],
) -> None:
    """The engine's constructors of a head's ``HttpRequest`` and ``RequestForm``: from
    now on, the C scanner gives each head it reads its form (``derived``) too, as the
    engine's ``_request_form`` would make it at the head's first use, with no Python
    frame. (The Python twin leaves ``derived`` to the engine: it is a cache, made once
    per head either way.)"""
    if C_SCANNER is not None:
        from parsers.http1 import _quickscan

        _quickscan.derive_forms(make_request, make_form)


# Read once, at import, as L7PROXY_HTTP1_PARSER is.
_FORCED = forced_implementation(
    "L7PROXY_HTTP1_QUICK",
    C_SCANNER_MISSING if C_SCANNER is None else None,
    "the C head scanner",
)


def quick_implementation(parser: str = "c") -> str:
    """Which quick read a reader in front of ``parser`` (the engine's head parser,
    ``"c"`` or ``"python"``) uses: ``"c"`` or ``"python"``. Forced by
    ``L7PROXY_HTTP1_QUICK``; otherwise the C scanner when it is built, except in
    front of the pure-Python parser, which comes with the Python twin."""
    if _FORCED != "auto":
        return _FORCED
    return "c" if C_SCANNER is not None and parser != "python" else "python"


# The quick read in front of the C parser, and ``QuickRequestHead``'s default (what
# the engine's readers use is ``parsers.registry.active_parsers()["http1_quick"]``).
QUICK_IMPLEMENTATION = quick_implementation()


class QuickRequestHead(FrontParser[RequestHeadParser]):
    """A request head parser (the contract of ``parsers.http1.head``) that tries
    the quick read first (``impl``: ``"c"``, the C scanner, then the Python read of
    what it leaves; ``"python"``, ``quick_request_head`` alone; ``"auto"``,
    ``QUICK_IMPLEMENTATION``) and hands every other head to ``parser``."""

    side: Literal["client"] = "client"

    def __init__(self, parser: RequestHeadParser, impl: str = "auto") -> None:
        super().__init__(parser)
        self._parser = parser
        if impl == "auto":
            impl = QUICK_IMPLEMENTATION
        if impl == "c":
            if C_SCANNER is None:
                raise ImportError(f"the C head scanner is {C_SCANNER_MISSING}")
            self._scan: ScanRequestHead | None = C_SCANNER
        elif impl == "python":
            self._scan = None
        else:
            raise ValueError(f"unknown quick read {impl!r} (want c or python)")
        self.implementation = impl

    def complete(self, head: bytes) -> MessageHead:
        scan = self._scan
        if scan is not None and (scanned := scan(head)) is not None:
            if self._partial:
                self.reset()  # what the parser's own ``complete`` would have done
            return scanned
        return self.after_scan(head)

    def after_scan(self, head: bytes) -> MessageHead:
        """``complete`` for a head the C scanner (if any) has read and refused: the
        Python quick read, then the parser (``RequestHeadMemo`` scans first itself)."""
        quick = quick_request_head(head)
        if quick is not None:
            if self._partial:
                self.reset()
            return quick
        self._partial = False
        return self._parser.complete(head)
