"""Seed inputs: the llhttp/h11 corpora, the differential corpus, and ClientHellos."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from parsers.conformance.registry import CORPORA_DIR


def seeds() -> list[bytes]:
    out: list[bytes] = []
    for name in ("llhttp_vectors.json", "h11_vectors.json"):
        path = CORPORA_DIR / "http1" / name
        if path.exists():
            out += [base64.b64decode(r["raw_b64"]) for r in json.loads(path.read_text())]
    from tests.parsers.http1.test_differential_http1 import CORPUS

    out += [data for _, data in CORPUS]
    out += tls_seeds()
    # The first byte of an input chooses the split (see targets._pieces).
    return [bytes([i % 17]) + data for i, data in enumerate(out)]


def tls_seeds() -> list[bytes]:
    """ClientHellos: OpenSSL's own, one cut over records, one with ECH, one with no name."""
    from tests.support.tls_wire import client_hello_message, ext, real_client_hello, records

    return [
        real_client_hello("api.example.com", alpn=["h2", "http/1.1"]),
        real_client_hello(None),
        records(client_hello_message("a.svc.example.com"), sizes=[1, 5, 40]),
        records(client_hello_message("public.example", extensions=[ext(0xFE0D, b"\x00" * 24)])),
    ]


def write_seeds(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    all_seeds = seeds()
    for data in all_seeds:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(all_seeds)
