"""HTTP/1.x corpora: llhttp's strict-mode vectors and h11's reader cases.

Every case is fed whole to a fresh reader of the chosen implementation. The
summary of a run lists each message (method, target, status, reason,
version, headers, body, trailers, complete), whether the reader paused for
an Upgrade/CONNECT, and the error code if it rejected the input.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from parsers.conformance.registry import CORPORA_DIR, Case, Corpus, Outcome, register
from parsers.http1.engine import C_AVAILABLE, request_reader, response_reader
from parsers.http1.errors import Http1Error
from parsers.http1.reader import PAUSED, Data, End, Head

IMPLEMENTATIONS = ("c", "python") if C_AVAILABLE else ("python",)
LLHTTP = CORPORA_DIR / "http1" / "llhttp_vectors.json"
H11 = CORPORA_DIR / "http1" / "h11_vectors.json"
OWS = " \t"
UPGRADE_PAUSES = {"PAUSED_UPGRADE"}


def parse_stream(
    kind: str, raw: bytes, impl: str, *, eof: bool = False, expect: str | None = None
) -> Outcome:
    """Read ``raw`` as a stream of requests or responses; summarise."""
    reader = request_reader(impl) if kind == "request" else response_reader(impl)
    if expect is not None:
        for _ in range(raw.count(b"HTTP/")):  # every response in the case answers ``expect``
            reader.expect(expect, False)
        reader.standalone = True
    messages: list[dict[str, Any]] = []
    error = None
    try:
        events = reader.feed(raw)
        if eof:
            events += reader.feed(b"")
    except Http1Error as exc:
        events = exc.events
        error = exc
    for event in events:
        if type(event) is Head:
            h = event.head
            messages.append(
                {
                    "method": h.method,
                    "url": h.target,
                    "status": h.status,
                    "reason": h.reason,
                    "version": h.version,
                    "headers": [(n.decode("latin-1"), v.decode("latin-1")) for n, v in h.headers],
                    "body": b"",
                    "trailers": [],
                    "complete": False,
                }
            )
        elif type(event) is Data:
            messages[-1]["body"] += event.data
        elif type(event) is End:
            messages[-1]["complete"] = True
            messages[-1]["trailers"] = [
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in event.trailers
            ]
    summary = {
        "messages": messages,
        "upgrade": reader._state == PAUSED,
        # Agreement on a reject is "both raised a typed error": which check
        # fires first may differ (llhttp checks fields as they stream by).
        "rejected": error is not None,
    }
    return Outcome(accepted=error is None, summary=summary, error=error)


# --------------------------------------------------------------------------
# llhttp


def _load_llhttp() -> list[Case]:
    records = json.loads(LLHTTP.read_text())
    cases = []
    for r in records:
        if r["type"] not in ("request", "response"):
            continue  # url-only and lenient-mode cases are for other parser modes
        cases.append(Case(r["id"], (r["type"], base64.b64decode(r["raw_b64"])), r))
    return cases


def _run_llhttp(case: Case, impl: str) -> Outcome:
    kind, raw = case.data
    # ``skipBody``: llhttp's callback said "no body" (a reply to HEAD). For a
    # response that is exactly a HEAD context; a request never has one, so
    # the reader is left to read the announced body.
    expect = "HEAD" if case.expected["meta"].get("skipBody") and kind == "response" else None
    return parse_stream(kind, raw, impl, expect=expect)


_SPAN = re.compile(r"off=(\d+) len=(\d+) span\[body\]")


def _expected_bodies(record: dict[str, Any], raw: bytes) -> list[bytes]:
    """Bodies per message, cut from the raw bytes at the offsets llhttp logged
    (the corpus's ``body`` strings lose escapes)."""
    bodies: list[bytearray] = []
    for line in record["expected_log"]:
        if line.endswith("message begin"):
            bodies.append(bytearray())
        match = _SPAN.match(line)
        if match and bodies:
            off, n = int(match.group(1)), int(match.group(2))
            bodies[-1] += raw[off : off + n]
    return [bytes(b) for b in bodies]


def _utf8(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def _check_llhttp(case: Case, outcome: Outcome) -> bool:
    record = case.expected
    error = record["expected_error"]
    if error and error["name"] not in UPGRADE_PAUSES:
        return not outcome.accepted and isinstance(outcome.error, Http1Error)
    if not outcome.accepted:
        return False
    if bool(error) != outcome.summary["upgrade"]:
        return False
    got = outcome.summary["messages"]
    bodies = _expected_bodies(record, case.data[1])
    # A message whose head never completed is not reported by our readers.
    want = [
        (w, b)
        for w, b in zip(record["expected_messages"], bodies, strict=False)
        if "headers_complete" in w
    ]
    if len(got) != len(want):
        return False
    for g, (w, body) in zip(got, want, strict=True):
        if record["type"] == "request" and (
            g["method"] != w["method"] or g["url"] != _utf8(w["url"])
        ):
            return False
        if record["type"] == "response" and g["reason"] != _utf8(w["status"]):
            return False
        if g["version"] != w["version"] or g["complete"] != w["complete"]:
            return False
        # llhttp lists trailer fields with the header fields.
        want_headers = [(_utf8(n), _utf8(v).strip(OWS)) for n, v in w["headers"]]
        if g["headers"] + g["trailers"] != want_headers:
            return False
        if g["body"] != body:
            return False
    return True


register(
    Corpus(
        name="http1/llhttp",
        protocol="http1",
        load=_load_llhttp,
        run=_run_llhttp,
        check=_check_llhttp,
        implementations=IMPLEMENTATIONS,
        description="nodejs/llhttp test vectors, request and response types (strict mode)",
        source=LLHTTP,
    )
)


# --------------------------------------------------------------------------
# h11

# h11's body readers, run here as the body of a message with that framing.
_H11_WRAPPERS = {
    "ChunkedReader": ("request", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "Http10Reader": ("response", b"HTTP/1.0 200 OK\r\n\r\n"),
}


def _load_h11() -> list[Case]:
    records = json.loads(H11.read_text())
    cases = []
    for i, r in enumerate(records):
        raw = base64.b64decode(r["raw_b64"])
        cases.append(Case(f"{r['test']}#{i}", (r["reader"], raw), r))
    return cases


def _h11_wrap(reader: str, raw: bytes, expected: Any) -> tuple[str, bytes, bool]:
    if reader == "CLIENT/IDLE":
        return "request", raw, False
    if reader == "SERVER/SEND_RESPONSE":
        return "response", raw, False
    if reader == "<lambda>":  # ContentLengthReader(len(raw))
        return "request", b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw, False
    kind, prefix = _H11_WRAPPERS[reader]
    eof = reader == "Http10Reader" and expected[-1].get("event") == "EndOfMessage"
    return kind, prefix + raw, eof


def _run_h11(case: Case, impl: str) -> Outcome:
    reader, raw = case.data
    kind, data, eof = _h11_wrap(reader, raw, case.expected.get("expected"))
    return parse_stream(kind, data, impl, eof=eof)


def _check_h11(case: Case, outcome: Outcome) -> bool:
    record = case.expected
    expected = record.get("expected")
    if record["outcome"].startswith("error") or (
        isinstance(expected, list) and "error" in expected[-1]
    ):
        return not outcome.accepted and isinstance(outcome.error, Http1Error)
    if not outcome.accepted:
        return False
    messages = outcome.summary["messages"]
    if not messages:
        return False
    msg = messages[0]
    if isinstance(expected, dict):
        if expected["event"] == "Request":
            if (msg["method"], msg["url"]) != (expected["method"], expected["target"]):
                return False
        else:
            if (msg["status"], msg["reason"]) != (expected["status_code"], expected["reason"]):
                return False
        headers = [(n.lower(), v) for n, v in msg["headers"]]
        return msg["version"] == expected["http_version"] and headers == [
            tuple(h) for h in expected["headers"]
        ]
    body = b"".join(e["data"].encode("latin-1") for e in expected if e.get("event") == "Data")
    ends = [e for e in expected if e.get("event") == "EndOfMessage"]
    if msg["body"] != body or msg["complete"] != bool(ends):
        return False
    if ends:
        trailers = [(n.lower(), v) for n, v in msg["trailers"]]
        return trailers == [tuple(h) for h in ends[0]["headers"]]
    return True


register(
    Corpus(
        name="http1/h11",
        protocol="http1",
        load=_load_h11,
        run=_run_h11,
        check=_check_h11,
        implementations=IMPLEMENTATIONS,
        description="python-hyper/h11 reader cases",
        source=H11,
    )
)
