"""The TLS denial tests catch a wrong denial: with the alert changed into something a
client could take for less than a refusal, the engine's denial test fails, and fails in the
wire check (``expect_alert`` in tests/support/tls_wire.py), not somewhere incidental."""

from __future__ import annotations

from pathlib import Path

import pytest

from parsers.tls.engine import TlsEngine
from parsers.tls.hello import ClientHello
from parsers.tls.wire import alert_record
from tests.parsers.tls import test_tls_engine as engine_suite
from tests.support import REPO

WIRE_CHECK = REPO / "tests" / "support" / "tls_wire.py"

MUTANTS = {
    # A graceful close: a client reads it as the end of the stream, not a refusal.
    "close_notify": lambda self, description=49: bytes((21, 3, 1, 0, 2, 1, 0)),
    "a warning, not fatal": lambda self, description=49: bytes((21, 3, 1, 0, 2, 1, 49)),
    "unrecognized_name": lambda self, description=49: alert_record(112, self.record_version),
    "another record version": lambda self, description=49: alert_record(49, 0x0303),
    "no alert, only the close": lambda self, description=49: b"",
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_wrong_alert_fails_the_denial_test_in_the_wire_check(mutant, monkeypatch):
    monkeypatch.setattr(ClientHello, "alert", MUTANTS[mutant])
    with pytest.raises(AssertionError) as failure:
        engine_suite.test_a_denied_name_gets_access_denied_at_the_clients_record_version_and_a_close(
            "whole"
        )
    assert Path(failure.traceback[-1].path) == WIRE_CHECK, failure.exconly()


def test_a_denial_relayed_as_if_allowed_fails_the_denial_test_in_the_wire_check(monkeypatch):
    monkeypatch.setattr(
        TlsEngine, "_denied", lambda self, hello: TlsEngine._allowed(self, hello, self._reader)
    )
    with pytest.raises(AssertionError) as failure:
        engine_suite.test_a_denied_name_gets_access_denied_at_the_clients_record_version_and_a_close(
            "whole"
        )
    assert Path(failure.traceback[-1].path) == WIRE_CHECK, failure.exconly()
