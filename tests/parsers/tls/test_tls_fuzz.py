"""Mutated and random ClientHellos: a ClientHello or a typed refusal, never an exception,
and the same outcome whole as cut anywhere. (``python -m tests.fuzz`` runs the same check,
``tls_hello`` in tests/fuzz/targets.py, under atheris.)"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import ALLOW_ALL, Close, ParseError
from parsers.tls.engine import TlsEngine
from tests.fuzz.targets import tls_hello_outcome
from tests.support.tls_wire import (
    client_hello_message,
    ext,
    real_client_hello,
    records,
)

SEEDS = [
    real_client_hello("api.example.com", alpn=["h2", "http/1.1"]),
    real_client_hello(None),
    records(client_hello_message("a.svc.example.com", extensions=[ext(0xFE0D, b"\x00" * 40)])),
    records(client_hello_message("api.example.com"), sizes=[3, 9, 60]),
]

mutations = st.lists(
    st.tuples(st.integers(0, 600), st.integers(0, 255), st.sampled_from(["set", "insert", "cut"])),
    max_size=6,
)


def mutate(data: bytes, changes) -> bytes:
    out = bytearray(data)
    for pos, value, how in changes:
        pos = pos % (len(out) + 1)
        if how == "set" and pos < len(out):
            out[pos] = value
        elif how == "insert":
            out[pos:pos] = bytes([value])
        elif how == "cut":
            del out[pos:]
    return bytes(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), mutations, st.integers(1, 64))
def test_a_mutated_hello_reads_the_same_whole_and_cut(seed, changes, step):
    data = mutate(seed, changes)
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    assert tls_hello_outcome([data]) == tls_hello_outcome(pieces)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 17))
def test_random_bytes_to_the_engine_end_in_a_typed_refusal_or_wait(data, step):
    engine = TlsEngine(lambda request: ALLOW_ALL)
    closed = False
    for i in range(0, len(data), step):
        commands = engine.client_data(data[i : i + step])
        if closed:
            assert commands == []
        for cmd in commands:
            if isinstance(cmd, ParseError):
                assert cmd.error.code and cmd.close
                closed = True
            elif isinstance(cmd, Close):
                closed = True
