"""The denial tests catch a wrong denial: mutation checks.

Each mutant (tests/support/denial_mutants.py) makes a denial answer
"success". Under it, the suite's own denial tests, called here as they are,
must fail, and fail in the wire check (the decoder in tests/support), not
somewhere incidental. One check runs pytest itself on the Kafka tests with
the mutation issue 10 reported as unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parsers.kafka import apis as kafka_apis
from tests.fixtures.cql.record import SCENARIOS
from tests.parsers.cql import test_cassandra_engine as cql_suite
from tests.parsers.cql import test_cassandra_recorded as cql_recorded_suite
from tests.parsers.http2 import test_http2 as h2_suite
from tests.parsers.kafka import test_kafka_engine as kafka_suite
from tests.support import REPO
from tests.support import denial_mutants as mutants
from tests.support.h2_transcript import SPLITS

SUPPORT = REPO / "tests" / "support"


def fails_in(wire_check: str, test, *args) -> None:
    """``test(*args)`` fails with an assertion raised in ``tests/support/<wire_check>``."""
    with pytest.raises(AssertionError) as failure:
        test(*args)
    assert Path(failure.traceback[-1].path) == SUPPORT / wire_check, failure.exconly()


def versions(api_key: int) -> range:
    return range(kafka_apis.REQUESTS[api_key].max_version + 1)


# --------------------------------------------------------------------------- Kafka


@pytest.mark.parametrize("api_key", mutants.KAFKA_BUILT, ids=kafka_apis.api_name)
def test_each_kafka_builder_answering_success_fails_every_version_of_its_api(api_key, monkeypatch):
    mutants.apply(mutants.kafka_builder_success(api_key), monkeypatch)
    for version in versions(api_key):
        fails_in(
            "kafka_wire.py",
            kafka_suite.test_every_known_api_version_decodes_forwards_and_denies,
            api_key,
            version,
        )


def test_every_kafka_denial_answering_success_fails_every_api_version(monkeypatch):
    mutants.apply(mutants.kafka_every_denial(), monkeypatch)
    for api_key, version in kafka_suite.EVERY_VERSION:
        fails_in(
            "kafka_wire.py",
            kafka_suite.test_every_known_api_version_decodes_forwards_and_denies,
            api_key,
            version,
        )
    # The APIs encoded by hand, without kafka-python's schemas, too.
    fails_in(
        "kafka_wire.py",
        kafka_suite.test_consumer_group_heartbeat_kip848_group_is_extracted_and_denied_with_30,
    )
    for case in kafka_suite.EXTRA_DENIALS:
        fails_in(
            "kafka_wire.py",
            kafka_suite.test_apis_without_a_kafka_python_schema_are_denied_on_the_wire,
            *case,
        )


def test_issue_10_mutation_fails_the_kafka_test_run():
    """TxnOffsetCommit and DescribeConfigs denials answering success: issue 10
    found all Kafka tests green under this. A pytest run now reports them."""
    env = {**os.environ, mutants.ENV: "kafka-issue-10", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.support.denial_mutants",
            "-k",
            "TxnOffsetCommit or DescribeConfigs",
            "tests/parsers/kafka/test_kafka_engine.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    failed = re.findall(r"^FAILED (\S+)", run.stdout, re.MULTILINE)
    for api in ("TxnOffsetCommit", "DescribeConfigs"):
        denial_tests = [
            f
            for f in failed
            if api in f
            and (
                "test_every_topic_api_has_an_encodable_denial" in f
                or "test_every_known_api_version_decodes_forwards_and_denies" in f
            )
        ]
        expected = 2 + len(versions(28 if api == "TxnOffsetCommit" else 32))
        assert len(denial_tests) == expected, run.stdout
    # Only denials were mutated: extracting resources from those requests still passes.
    assert re.search(r"\b4 passed\b", run.stdout), run.stdout


# --------------------------------------------------------------------------- CQL


@pytest.mark.parametrize("mutant", ["cql-error-code-0", "cql-result-void"])
def test_cql_denial_answering_success_fails_the_denial_tests(mutant, monkeypatch):
    mutants.apply(mutants.MUTANTS[mutant](), monkeypatch)
    for version in (3, 4, 5):
        fails_in(
            "cql_wire.py",
            cql_suite.test_denied_query_answered_unauthorized_on_its_stream_and_others_unaffected,
            version,
        )
    fails_in(
        "cql_wire.py", cql_suite.test_v5_lz4_denial_is_a_compressed_segment_the_driver_codec_reads
    )
    fails_in("cql_wire.py", cql_suite.test_v4_lz4_bodies_are_judged_and_denials_compressed)
    fails_in("cql_wire.py", cql_suite.test_batch_is_allowed_only_if_every_member_is)
    for scenario in sorted(SCENARIOS):
        fails_in(
            "cql_wire.py",
            cql_recorded_suite.test_denied_select_never_reaches_the_server_and_is_answered_unauthorized,
            scenario,
            "whole",
        )


# --------------------------------------------------------------------------- gRPC


def test_grpc_denial_answering_ok_fails_the_denial_test(monkeypatch):
    mutants.apply(mutants.grpc_status_0(), monkeypatch)
    fails_in(
        "h2_transcript.py",
        h2_suite.test_denied_grpc_call_is_trailers_only_and_other_streams_go_on,
        SPLITS["whole"],
    )
