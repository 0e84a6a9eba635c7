"""CqlEngine fed with what the real cassandra-driver sent to the CQL server test
double (recorded by ``tests/fixtures/cql/record.py``): v3, v4, v5, with LZ4,
Snappy and password authentication. Every recording is fed whole, byte by
byte, and split at random points, and must give the same transcript.
"""

from __future__ import annotations

import base64
import json

import pytest

from parsers.base import Access, Decision, ParseError, Reply, ToClient, ToServer
from parsers.cql import wire as w
from parsers.cql.engine import CqlEngine
from tests.fixtures.cql.record import SCENARIOS
from tests.support import FIXTURES as ALL_FIXTURES
from tests.support.cql_wire import assert_unauthorized
from tests.support.feeding import WAYS, feed, splitter

FIXTURES = ALL_FIXTURES / "cql"
ALLOW = Decision(True, policy="test", reason="allowed")

# What the driver's session connection asks, in order (see SESSION_SCRIPT):
# (opcode, query_action, keyspace.table)
SESSION_REQUESTS = [
    ("query", "create-keyspace", "ks"),
    ("query", "use", "ks"),
    ("query", "create-table", "ks.t"),
    ("query", "create-table", "ks.secret"),
    ("query", "insert", "ks.t"),
    ("query", "insert", "ks.t"),
    ("query", "select", "ks.secret"),
    ("query", "select", "ks.t"),  # first page
    ("query", "select", "ks.t"),  # second page (paging state)
    ("prepare", "select", "ks.t"),
    ("prepare", "insert", "ks.t"),
    ("execute", "select", "ks.t"),
    ("batch", "insert", "ks.t"),
    ("batch", "update", "ks.t"),
]


def load(scenario: str) -> list[list[tuple[str, bytes]]]:
    record = json.loads((FIXTURES / f"{scenario}.json").read_text())
    return [[(tag, base64.b64decode(data)) for tag, data in conn] for conn in record["connections"]]


def replay(conn, decide, way="whole", seed=0):
    """Each recorded read fed to the engine ``way``; random cuts from one seed."""
    engine = CqlEngine(decide)
    cut = splitter(way, seed)
    commands = []
    for tag, data in conn:
        commands += feed(engine.client_data if tag == "c" else engine.server_data, cut(data))
    return engine, commands


def joined(commands, kind) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, kind))


def requests(commands, system=True):
    """(opcode, action, table) judged; ``system=False`` leaves out the driver's
    own reads of system tables (schema agreement runs on the session's connection)."""
    return [
        (a.request.opcode, a.request.action, a.request.table)
        for a in commands
        if isinstance(a, Access) and (system or not a.request.table.startswith("system"))
    ]


def session_of(connections):
    for conn in connections:
        _, commands = replay(conn, lambda r: ALLOW)
        if any(a == ("query", "use", "ks") for a in requests(commands)):
            return conn
    raise AssertionError("no session connection in the recording")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_allowed_traffic_is_forwarded_byte_for_byte(scenario, way):
    for conn in load(scenario):
        engine, commands = replay(conn, lambda r: ALLOW, way, seed=len(conn))
        assert not [c for c in commands if isinstance(c, ParseError)]
        assert joined(commands, ToServer) == b"".join(d for t, d in conn if t == "c")
        assert joined(commands, ToClient) == b"".join(d for t, d in conn if t == "s")
        # every judged request got exactly one reply
        keys = [c.key for c in commands if isinstance(c, Access)]
        replies = [c.key for c in commands if isinstance(c, Reply)]
        assert sorted(map(str, keys)) == sorted(map(str, replies))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_session_statements_are_classified(scenario, way):
    engine, commands = replay(session_of(load(scenario)), lambda r: ALLOW, way, seed=7)
    judged = requests(commands, system=False)
    # The driver re-sends USE on its own once the session's keyspace changed,
    # at a moment of its choosing: compare USE separately.
    assert [r for r in judged if r[1] != "use"] == [r for r in SESSION_REQUESTS if r[1] != "use"]
    assert {r for r in judged if r[1] == "use"} == {("query", "use", "ks")}
    assert engine.keyspace == "ks"  # learned from the SetKeyspace result of USE
    versions = {a.request.version for a in commands if isinstance(a, Access)}
    assert versions == {SCENARIOS[scenario]["protocol_version"]}
    results = {c.key: c.fields.get("result") for c in commands if isinstance(c, Reply)}
    accesses = [a for a in commands if isinstance(a, Access)]
    by_action = {(a.request.opcode, a.request.action): results[a.key] for a in accesses}
    assert by_action[("query", "use")] == "SetKeyspace"
    assert by_action[("query", "create-table")] == "SchemaChange"
    assert by_action[("prepare", "select")] == "Prepared"
    assert by_action[("execute", "select")] == "Rows"
    assert by_action[("batch", "insert")] == "Void"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_control_connection_only_reads_system_tables(scenario):
    connections = load(scenario)
    session = session_of(connections)
    for conn in connections:
        if conn is session:
            continue
        _, commands = replay(conn, lambda r: ALLOW)
        for opcode, action, table in requests(commands):
            assert (opcode, action) == ("query", "select")
            assert table.split(".")[0] in ("system", "system_schema", "system_virtual_schema"), (
                table
            )


def deny_secret(request):
    if request.table == "ks.secret" and request.action == "select":
        return Decision(False, policy="cql-test", rule="ingress[0]", reason="no rule allows it")
    return ALLOW


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_denied_select_never_reaches_the_server_and_is_answered_unauthorized(scenario, way):
    conn = session_of(load(scenario))
    engine, commands = replay(conn, deny_secret, way, seed=3)
    assert not [c for c in commands if isinstance(c, ParseError)]
    denied = [a for a in commands if isinstance(a, Access) and not a.decision.allowed]
    assert [(a.request.action, a.request.table) for a in denied] == [("select", "ks.secret")]
    stream = denied[0].key
    assert Reply(stream, {"opcode": "ERROR", "error_code": 0x2100}) in commands

    # What the server receives: every envelope the driver sent, but the denied one.
    version = SCENARIOS[scenario]["protocol_version"]
    lz4 = SCENARIOS[scenario].get("compression") == "lz4"
    sent = client_envelopes(b"".join(d for t, d in conn if t == "c"), version >= 5, lz4)
    forwarded = client_envelopes(joined(commands, ToServer), version >= 5, lz4)
    [dropped] = [e for e in sent if e not in forwarded]
    assert w.parse_header(dropped)[2] == stream
    assert [e for e in sent if e != dropped] == forwarded
    server_bytes = [d for t, d in conn if t == "s"]

    # What the client receives: the server's bytes plus one ERROR Unauthorized on that stream.
    answers = [c.data for c in commands if isinstance(c, ToClient) and c.data not in server_bytes]
    answers = [a for a in answers if a not in b"".join(server_bytes)]
    [answer] = answers
    compression = SCENARIOS[scenario].get("compression")
    message = assert_unauthorized(answer, version, stream, compression).message
    assert "select on ks.secret" in message and "cql-test" in message and "ingress[0]" in message


def client_envelopes(data: bytes, segmented: bool, lz4: bool) -> list[bytes]:
    """Raw envelopes in a client->server byte stream: unframed up to STARTUP,
    then (v5) inside segments."""
    out, pos = [], 0
    while pos < len(data):
        *_, opcode, length = w.parse_header(data, pos)
        out.append(data[pos : pos + 9 + length])
        pos += 9 + length
        if opcode == w.STARTUP and segmented:
            break
    payload = bytearray()
    while pos < len(data):
        seg = w.read_segment(data, pos, lz4)
        payload += seg.payload
        pos += seg.raw_len
    pos = 0
    while pos < len(payload):
        length = w.parse_header(payload, pos)[4]
        out.append(bytes(payload[pos : pos + 9 + length]))
        pos += 9 + length
    return out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_recordings_cover_every_request_type(scenario):
    version = SCENARIOS[scenario]["protocol_version"]
    lz4 = SCENARIOS[scenario].get("compression") == "lz4"
    opcodes = set()
    for conn in load(scenario):
        for envelope in client_envelopes(
            b"".join(d for t, d in conn if t == "c"), version >= 5, lz4
        ):
            vbyte, *_, opcode, _length = w.parse_header(envelope)
            assert vbyte == version
            opcodes.add(w.OPCODE_NAMES[opcode])
    expected = {"OPTIONS", "STARTUP", "REGISTER", "QUERY", "PREPARE", "EXECUTE", "BATCH"}
    if SCENARIOS[scenario].get("auth"):
        expected.add("AUTH_RESPONSE")
    assert opcodes == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_trailing_garbage_after_a_recorded_session_closes_cleanly(scenario):
    conn = session_of(load(scenario))
    engine, commands = replay(conn, lambda r: ALLOW)
    garbage = engine.client_data(b"\xff" * 16)
    assert [type(c).__name__ for c in garbage][-1] == "ParseError" and garbage[-1].close
    assert not [c for c in garbage if isinstance(c, ToServer)]
    assert joined(commands, ToServer) == b"".join(d for t, d in conn if t == "c")
