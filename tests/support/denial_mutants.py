"""Wrong denials on purpose: each mutant makes a denial answer "success".

``tests/parsers/test_denial_mutations.py`` applies them and checks that the
wire tests fail. In-process they go through ``monkeypatch``; as a pytest
plugin, a whole test run can be made to use one:

    L7PROXY_DENIAL_MUTANT=kafka-issue-10 pytest -p tests.support.denial_mutants tests/parsers/kafka

A mutant is a list of patches ``(container, key, value)``: a dict item when
the container is a dict, an attribute otherwise.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import parsers.http2.engine as h2_engine
from parsers.cql import wire as cql_wire
from parsers.cql.engine import CqlEngine
from parsers.kafka import deny as kafka_deny

ENV = "L7PROXY_DENIAL_MUTANT"
Patch = tuple[Any, Any, Any]

# Kafka API keys whose denial has its own builder (Metadata is built apart).
KAFKA_BUILT = sorted({**kafka_deny._BUILDERS, **kafka_deny._VERSIONED_BUILDERS, 3: None})


def _success(builder: Callable) -> Callable:
    """The same response, every error code 0."""

    def build(R, req, code, *rest):
        return builder(R, req, 0, *rest)

    return build


def kafka_builder_success(api_key: int) -> list[Patch]:
    """One Kafka denial builder answers with error code 0."""
    if api_key == 3:
        return [(kafka_deny, "_metadata", _success(kafka_deny._metadata))]
    for table in (kafka_deny._BUILDERS, kafka_deny._VERSIONED_BUILDERS):
        if api_key in table:
            return [(table, api_key, _success(table[api_key]))]
    raise KeyError(api_key)


def kafka_issue_10() -> list[Patch]:
    """The mutation issue 10 reports went unnoticed: TxnOffsetCommit and
    DescribeConfigs denials answering success."""
    return kafka_builder_success(28) + kafka_builder_success(32)


def kafka_every_denial() -> list[Patch]:
    """Every Kafka denial, builders and the generic top-level path, with code 0."""
    denial = kafka_deny.denial

    def success(api_key, api_version, correlation_id, message, code, cluster):
        return denial(api_key, api_version, correlation_id, message, 0, cluster)

    return [(kafka_deny, "denial", success)]


def cql_error_code_0() -> list[Patch]:
    """CQL denials keep the ERROR opcode but say code 0 instead of 0x2100."""
    envelope = CqlEngine._error_envelope

    def error_envelope(self, version, stream, code, message, extra=b""):
        if code == cql_wire.ERR_UNAUTHORIZED:
            code = 0
        return envelope(self, version, stream, code, message, extra)

    return [(CqlEngine, "_error_envelope", error_envelope)]


def cql_result_void() -> list[Patch]:
    """CQL denials answered RESULT Void: the statement "succeeded"."""
    envelope = CqlEngine._error_envelope

    def error_envelope(self, version, stream, code, message, extra=b""):
        if code != cql_wire.ERR_UNAUTHORIZED:
            return envelope(self, version, stream, code, message, extra)
        void, flags = struct.pack(">i", 1), 0  # RESULT kind Void
        if self._frame_codec is not None and version < 5:  # as a server would: compressed
            void, flags = self._frame_codec[0](void), cql_wire.FLAG_COMPRESSED
        return struct.pack(">BBhBI", 0x80 | version, flags, stream, 0x08, len(void)) + void

    return [(CqlEngine, "_error_envelope", error_envelope)]


def grpc_status_0() -> list[Patch]:
    """gRPC denials answered trailers-only with grpc-status 0 (OK)."""
    denial = h2_engine.grpc_denial

    def ok(reason, status=7):
        return denial(reason, 0)

    return [(h2_engine, "grpc_denial", ok)]


MUTANTS: dict[str, Callable[[], list[Patch]]] = {
    "kafka-issue-10": kafka_issue_10,
    "kafka-every-denial": kafka_every_denial,
    "cql-error-code-0": cql_error_code_0,
    "cql-result-void": cql_result_void,
    "grpc-status-0": grpc_status_0,
}


def apply(patches: list[Patch], monkeypatch=None) -> None:
    for container, key, value in patches:
        if isinstance(container, dict):
            if monkeypatch is None:
                container[key] = value
            else:
                monkeypatch.setitem(container, key, value)
        elif monkeypatch is None:
            setattr(container, key, value)
        else:
            monkeypatch.setattr(container, key, value)


def pytest_configure(config) -> None:
    name = os.environ.get(ENV)
    if name:
        apply(MUTANTS[name]())
