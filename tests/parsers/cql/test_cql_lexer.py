"""The CQL classifier on tricky statements: what a word split gets wrong."""

from __future__ import annotations

import pytest

from parsers.cql.lexer import ACTIONS, LexError, Statement, classify, tokenize

KS = "cur"

# statement -> [(query_action, table), ...] with current keyspace "cur"
TABLE = [
    # plain DML, qualified and not
    ("SELECT * FROM ks.t", [("select", "ks.t")]),
    ("select a, b from t where a = 1", [("select", "cur.t")]),
    ("SeLeCt * FrOm Ks.T", [("select", "ks.t")]),
    ("INSERT INTO t (a, b) VALUES (1, 'x')", [("insert", "cur.t")]),
    ("UPDATE ks.t USING TTL 5 SET b = 'x' WHERE a = 1", [("update", "ks.t")]),
    ("DELETE b FROM ks.t WHERE a = 1", [("delete", "ks.t")]),
    ("DELETE m['from'] FROM t WHERE a = 1", [("delete", "cur.t")]),
    ("TRUNCATE ks.t", [("truncate-table", "ks.t")]),
    ("TRUNCATE TABLE t", [("truncate-table", "cur.t")]),
    # the select list may hold calls and parentheses: FROM is the top-level one
    ("SELECT count(*), writetime(b), CAST(a AS text) FROM t", [("select", "cur.t")]),
    ("SELECT JSON DISTINCT a FROM ks.t", [("select", "ks.t")]),
    # quoted identifiers keep their case and may hold anything
    ('SELECT * FROM "MyKs"."My Table"', [("select", "MyKs.My Table")]),
    ('SELECT "from" FROM t', [("select", "cur.t")]),
    ('SELECT * FROM "weird""name"', [("select", 'cur.weird"name')]),
    # comments hide nothing from the lexer
    ("/* SELECT * FROM ks.public */ DELETE FROM ks.secret WHERE a = 1", [("delete", "ks.secret")]),
    ("SELECT * FROM -- ks.public\n ks.secret", [("select", "ks.secret")]),
    ("SELECT * FROM // ks.public\n ks.secret", [("select", "ks.secret")]),
    ("-- leading comment\nSELECT * FROM t", [("select", "cur.t")]),
    ("SELECT * /* FROM ks.public */ FROM ks.secret", [("select", "ks.secret")]),
    # a line comment ends at \r as well as \n, as in Cassandra's lexer
    ("SELECT * FROM --\r ks.secret WHERE a = --\n system.now()", [("select", "ks.secret")]),
    ("SELECT * FROM //\r ks.secret", [("select", "ks.secret")]),
    # string literals containing keywords, comment markers and quotes
    ("INSERT INTO t (a, b) VALUES (1, 'DROP TABLE x; -- from y')", [("insert", "cur.t")]),
    ("SELECT * FROM t WHERE b = 'it''s FROM other'", [("select", "cur.t")]),
    ("SELECT $$ FROM ks.public $$ FROM ks.secret", [("select", "ks.secret")]),
    ("UPDATE t SET b = $$it's /* not a comment$$ WHERE a = 1", [("update", "cur.t")]),
    # batches: every member, in order
    (
        "BEGIN BATCH INSERT INTO a (x) VALUES (1); UPDATE ks.b SET x = 2 WHERE y = 1; "
        "DELETE FROM c WHERE y = 2; APPLY BATCH;",
        [("insert", "cur.a"), ("update", "ks.b"), ("delete", "cur.c")],
    ),
    (
        "begin unlogged batch using timestamp 5 insert into a (x) values (1) "
        "insert into b (x) values ('apply batch') apply batch",
        [("insert", "cur.a"), ("insert", "cur.b")],
    ),
    # several statements in one string: all are judged
    (
        "SELECT * FROM ks.public; DROP TABLE ks.secret",
        [("select", "ks.public"), ("drop-table", "ks.secret")],
    ),
    ("SELECT * FROM t;", [("select", "cur.t")]),
    # keyspaces and USE
    ("USE ks", [("use", "ks")]),
    ('USE "MixedCase"', [("use", "MixedCase")]),
    (
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'x'}",
        [("create-keyspace", "ks")],
    ),
    ("CREATE SCHEMA ks2 WITH replication = {}", [("create-keyspace", "ks2")]),
    ("ALTER KEYSPACE ks WITH durable_writes = false", [("alter-keyspace", "ks")]),
    ("DROP KEYSPACE IF EXISTS ks", [("drop-keyspace", "ks")]),
    # tables
    ("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)", [("create-table", "cur.t")]),
    ("create columnfamily ks.t (a int primary key)", [("create-table", "ks.t")]),
    ("ALTER TABLE ks.t ADD c text", [("alter-table", "ks.t")]),
    ("DROP TABLE IF EXISTS t", [("drop-table", "cur.t")]),
    # other schema objects
    ("CREATE INDEX IF NOT EXISTS idx ON ks.t (b)", [("create-index", "ks.t")]),
    ("CREATE CUSTOM INDEX ON t (b) USING 'x'", [("create-index", "cur.t")]),
    ("DROP INDEX ks.idx", [("drop-index", "ks.idx")]),
    (
        "CREATE MATERIALIZED VIEW ks.v AS SELECT * FROM ks.t WHERE a IS NOT NULL PRIMARY KEY (a)",
        [("create-materialized-view", "ks.v")],
    ),
    ("ALTER MATERIALIZED VIEW v WITH comment = 'x'", [("alter-materialized-view", "cur.v")]),
    ("DROP MATERIALIZED VIEW IF EXISTS ks.v", [("drop-materialized-view", "ks.v")]),
    ("CREATE TYPE ks.addr (street text)", [("create-type", "ks.addr")]),
    ("ALTER TYPE addr ADD zip int", [("alter-type", "cur.addr")]),
    ("DROP TYPE IF EXISTS ks.addr", [("drop-type", "ks.addr")]),
    (
        "CREATE OR REPLACE FUNCTION ks.f (a int) CALLED ON NULL INPUT RETURNS int LANGUAGE java "
        "AS $$ return a; $$",
        [("create-function", "ks.f")],
    ),
    ("DROP FUNCTION ks.f", [("drop-function", "ks.f")]),
    (
        "CREATE AGGREGATE IF NOT EXISTS ks.agg (int) SFUNC f STYPE int",
        [("create-aggregate", "ks.agg")],
    ),
    ("DROP AGGREGATE agg", [("drop-aggregate", "cur.agg")]),
    ("CREATE TRIGGER trg ON ks.t USING 'org.Trigger'", [("create-trigger", "ks.t")]),
    ("DROP TRIGGER trg ON t", [("drop-trigger", "cur.t")]),
    # roles, users, permissions: no table
    ("CREATE ROLE bob WITH PASSWORD = 'x' AND LOGIN = true", [("create-role", "")]),
    ("ALTER ROLE bob WITH PASSWORD = 'y'", [("alter-role", "")]),
    ("DROP ROLE IF EXISTS bob", [("drop-role", "")]),
    ("GRANT admin TO bob", [("grant-role", "")]),
    ("REVOKE admin FROM bob", [("revoke-role", "")]),
    ("GRANT SELECT ON KEYSPACE ks TO bob", [("grant-permission", "")]),
    ("REVOKE ALL PERMISSIONS ON ALL KEYSPACES FROM bob", [("revoke-permission", "")]),
    ("LIST ROLES", [("list-roles", "")]),
    ("LIST USERS", [("list-users", "")]),
    ("LIST ALL PERMISSIONS OF bob", [("list-permissions", "")]),
    ("LIST SELECT ON ks.t", [("list-permissions", "")]),
    ("CREATE USER alice WITH PASSWORD 'x' SUPERUSER", [("create-user", "")]),
    ("ALTER USER alice WITH PASSWORD 'y'", [("alter-user", "")]),
    ("DROP USER alice", [("drop-user", "")]),
    # what the classifier cannot vouch for is "unknown" with no table
    ("", [("unknown", "")]),
    ("   -- only a comment", [("unknown", "")]),
    ("SELECT * FROM 'unterminated", [("unknown", "")]),
    ("SELECT * /* unterminated", [("unknown", "")]),
    ("DESCRIBE KEYSPACES", [("unknown", "")]),
    ("SELECT 1", [("unknown", "")]),
    ("INSERT t VALUES (1)", [("unknown", "")]),
    ("BEGIN BATCH INSERT INTO a (x) VALUES (1)", [("unknown", "")]),  # never applied
]


@pytest.mark.parametrize("statement,expected", TABLE, ids=[t[0][:40] for t in TABLE])
def test_classify(statement, expected):
    got = classify(statement, KS)
    assert [(s.action, s.table) for s in got] == expected
    for s in got:
        assert s.action in ACTIONS or s.action == "unknown"


def test_unqualified_names_need_a_keyspace():
    assert classify("SELECT * FROM t", "") == (Statement("select", ".t"),)
    assert classify("SELECT * FROM t", "other") == (Statement("select", "other.t"),)


def test_tokens_keep_quoted_text_and_lower_case_words():
    toks = tokenize("SELECT \"A b\", 'It''s' FROM $$x$$ -- c\n/* d */ Ks")
    assert [(t.kind, t.text) for t in toks] == [
        ("word", "select"),
        ("quoted", "A b"),
        ("punct", ","),
        ("string", "It's"),
        ("word", "from"),
        ("string", "x"),
        ("word", "ks"),
    ]


def test_lexer_errors_are_typed():
    with pytest.raises(LexError):
        tokenize('SELECT "open')
