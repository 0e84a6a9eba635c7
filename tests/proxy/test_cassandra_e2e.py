"""The real cassandra-driver through ``l7proxy firewall`` to the CQL server test double.

Every test runs the shipped firewall command line (``tests/support/firewall.py``)
in front of ``tests/support/cql_server_double.py`` and checks what the driver
sees, what reached the double, and what the flow log says.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from contextlib import contextmanager

import pytest
from cassandra import InvalidRequest, Unauthorized
from cassandra.cluster import Cluster
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement, SimpleStatement

from tests.support.cql_server_double import running_cql_double
from tests.support.firewall import running_firewall

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cql-e2e}}
spec:
  endpointSelector: {{matchLabels: {{app: cassandra}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        l7proto: cassandra
        l7:
        - query_action: select
          query_table: "system(_schema|_virtual_schema)?\\\\..*"
        - query_action: create-keyspace
          query_table: ks
        - query_action: create-table
          query_table: "ks\\\\..*"
        - query_action: insert
          query_table: "ks\\\\.t"
        - query_action: update
          query_table: "ks\\\\.t"
        - query_action: select
          query_table: "ks\\\\.t"
"""

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)

CONNECTIONS = [
    pytest.param(3, False, id="v3"),
    pytest.param(4, False, id="v4"),
    pytest.param(4, "lz4", id="v4-lz4"),
    pytest.param(4, "snappy", id="v4-snappy"),
    pytest.param(5, False, id="v5"),
    pytest.param(5, "lz4", id="v5-lz4"),
]


@pytest.fixture(autouse=True)
def quiet_driver():
    logging.getLogger("cassandra").setLevel(logging.ERROR)


@contextmanager
def proxied(max_version: int = 5):
    with running_cql_double(max_version=max_version) as double:
        with running_firewall(
            POLICY.format(port=double.port), (double.host, double.port), {"app": "cassandra"}
        ) as fw:
            yield double, fw


@contextmanager
def session_to(fw, **options):
    options.setdefault("load_balancing_policy", RoundRobinPolicy())
    cluster = Cluster([fw.host], port=fw.port, **options)
    try:
        yield cluster, cluster.connect()
    finally:
        cluster.shutdown()


def flows_for(fw, table: str, wait_for: int):
    """Flow records about ``table``, waiting (bounded) for the log to be flushed."""
    records = []
    for _ in range(40):
        records = [f for f in fw.flows() if f.get("l7", {}).get("table") == table]
        if len(records) >= wait_for:
            break
        time.sleep(0.1)
    return records


@pytest.mark.parametrize("version, compression", CONNECTIONS)
def test_driver_session_through_the_proxy(version, compression):
    with (
        proxied() as (double, fw),
        session_to(fw, protocol_version=version, compression=compression) as (cluster, s),
    ):
        assert cluster.protocol_version == version
        s.execute(
            KEYSPACE
        )  # schema change: the driver waits for schema agreement through the proxy
        s.execute("USE ks")
        s.execute("CREATE TABLE t (a int PRIMARY KEY, b text)")
        s.execute("CREATE TABLE secret (a int PRIMARY KEY, b text)")
        for i in range(5):
            s.execute("INSERT INTO t (a, b) VALUES (%s, %s)", (i, f"v{i}"))

        # paging: five rows in pages of two, each page a judged QUERY
        rows = list(s.execute(SimpleStatement("SELECT * FROM t", fetch_size=2)))
        assert sorted((r.a, r.b) for r in rows) == [(i, f"v{i}") for i in range(5)]

        # prepared statements and a batch mixing prepared and simple members
        select = s.prepare("SELECT b FROM t WHERE a = ?")
        insert = s.prepare("INSERT INTO t (a, b) VALUES (?, ?)")
        assert s.execute(select, (3,)).one().b == "v3"
        batch = BatchStatement()
        batch.add(insert, (10, "ten"))
        batch.add(SimpleStatement("UPDATE ks.t SET b = 'uno' WHERE a = 1"))
        s.execute(batch)
        assert s.execute(select, (10,)).one().b == "ten"
        assert s.execute(select, (1,)).one().b == "uno"

        # denials: Unauthorized, and the session keeps working
        before = len(double.seen)
        with pytest.raises(Unauthorized, match="select on ks.secret denied by policy cql-e2e"):
            s.execute("SELECT * FROM secret")
        with pytest.raises(Unauthorized):
            s.prepare("DELETE FROM t WHERE a = 1")
        denied_batch = BatchStatement()
        denied_batch.add(insert, (11, "eleven"))
        denied_batch.add(SimpleStatement("INSERT INTO secret (a, b) VALUES (1, 'x')"))
        with pytest.raises(Unauthorized, match="insert on ks.secret"):
            s.execute(denied_batch)
        assert [x.statement for x in double.seen[before:]] == []  # none of them reached the server
        assert (
            s.execute(select, (11,)).one() is None
        )  # the batch's allowed member was not applied either
        assert s.execute("SELECT count(*) FROM t").one()[0] == 6

        # errors from the server pass through untouched
        with pytest.raises(InvalidRequest):
            s.execute("SELECT * FROM t WHERE nope = 1")

        denied = [f for f in flows_for(fw, "ks.secret", wait_for=2) if f["verdict"] == "DENIED"]
        assert {f["l7"]["action"] for f in denied} == {"select", "insert"}
        assert all(f["reply"]["error_code"] == 0x2100 for f in denied)
        assert all(f["l7"]["version"] == version for f in denied)


def test_driver_with_default_options_negotiates_down_through_the_proxy():
    # No protocol_version, default compression and policies: the driver starts at
    # DSE_V2/v66, is told by the proxy that it is unsupported, tries v5, which the
    # double (a v4 server) refuses, and settles on v4.
    with proxied(max_version=4) as (double, fw):
        cluster = Cluster([fw.host], port=fw.port)
        try:
            s = cluster.connect()
            assert cluster.protocol_version == 4
            s.execute(KEYSPACE)
            s.execute("CREATE TABLE ks.t (a int PRIMARY KEY, b text)")
            s.execute("INSERT INTO ks.t (a, b) VALUES (1, 'x')")
            assert s.execute("SELECT b FROM ks.t WHERE a = 1").one().b == "x"
            with pytest.raises(Unauthorized):
                s.execute("DROP TABLE ks.t")
        finally:
            cluster.shutdown()
        assert ("ks", "t") in double.store.tables


def test_execute_of_a_statement_the_proxy_never_saw_prepared_is_reprepared_through_it():
    with proxied() as (double, fw):
        # Prepare directly at the server (bypassing the proxy), so the server knows
        # the ids but the proxy does not.
        direct = Cluster(
            ["127.0.0.1"],
            port=double.port,
            protocol_version=4,
            load_balancing_policy=RoundRobinPolicy(),
        )
        try:
            d = direct.connect()
            d.execute(KEYSPACE)
            d.execute("CREATE TABLE ks.t (a int PRIMARY KEY, b text)")
            d.execute("CREATE TABLE ks.secret (a int PRIMARY KEY, b text)")
            d.execute("INSERT INTO ks.t (a, b) VALUES (1, 'one')")
            allowed = d.prepare("SELECT b FROM ks.t WHERE a = ?")
            forbidden = d.prepare("SELECT b FROM ks.secret WHERE a = ?")
        finally:
            direct.shutdown()

        with session_to(fw, protocol_version=4) as (cluster, s):
            cluster.add_prepared(allowed.query_id, allowed)
            cluster.add_prepared(forbidden.query_id, forbidden)
            # EXECUTE with an id the proxy does not know: it answers Unprepared, the
            # driver re-prepares through the proxy, which judges the statement.
            assert s.execute(allowed, (1,)).one().b == "one"
            with pytest.raises(Unauthorized, match="ks.secret"):
                s.execute(forbidden, (1,))
        executed = [x for x in double.seen if x.opcode == 0x0A]
        assert [x.statement for x in executed] == ["SELECT b FROM ks.t WHERE a = ?"]
        unknown = [
            f
            for f in fw.flows(wait_for=1)
            if f["l7"].get("opcode") == "execute" and f["l7"]["action"] == "unknown"
        ]
        assert unknown and all(f["reply"]["error_code"] == 0x2500 for f in unknown)


def test_short_connections_are_closed_on_both_sides_once_the_client_leaves():
    """CQL has no half-close: after the client's EOF and its last response, the proxy
    ends the connection instead of holding two descriptors until the idle timeout."""

    def descriptors(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    options = struct.pack(">BBhBi", 4, 0, 1, 0x05, 0)  # v4 OPTIONS on stream 1
    with proxied() as (_double, fw):
        before = descriptors(fw.proc.pid)
        for _ in range(60):
            with socket.create_connection((fw.host, fw.port), timeout=15) as sock:
                sock.sendall(options)
                version, _flags, stream, opcode = struct.unpack(">BBhB", sock.recv(5))
                assert (version, stream, opcode) == (0x84, 1, 0x06)  # SUPPORTED
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):  # the rest of SUPPORTED, then the proxy's FIN
                    pass
        deadline = time.monotonic() + 10
        while descriptors(fw.proc.pid) > before + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert descriptors(fw.proc.pid) <= before + 4
