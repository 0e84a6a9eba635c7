"""How the CQL engine ends a healthy connection when asked to ``finish()`` (a
takeover's drain). CQL has no word to tell a client that a connection ends, so the
engine says ``Finished(told=False)`` only right behind an answer, when no request
is waiting for its response and none is partly read. What the client sends after
that is never read. Fed whole, byte by byte and at random.
"""

from __future__ import annotations

import pytest
from cassandra.protocol import QueryMessage

from parsers.base import Access, Close, Finished, Reply, ToClient, ToServer
from tests.parsers.cql.test_cassandra_engine import ONE, deny_table, request, rows_void, started
from tests.support.feeding import WAYS, feed, split


def query(stream: int, table: str = "ks.t") -> bytes:
    return request(QueryMessage(f"SELECT * FROM {table}", ONE), stream)


@pytest.mark.parametrize("how", WAYS)
def test_finished_right_behind_the_last_answer_owed(how):
    engine = started()
    feed(engine.client_data, split(query(1) + query(2), how))
    assert engine.finish() == []

    out = feed(engine.server_data, split(rows_void(2), how))  # answers come in any order
    assert Finished(told=False) not in out
    out = feed(engine.server_data, split(rows_void(1), how))

    assert out[-1] == Finished(told=False)
    assert b"".join(c.data for c in out if type(c) is ToClient) == rows_void(1)
    assert [c for c in out if type(c) is Reply] == [
        Reply(1, {"opcode": "RESULT", "result": "Void"})
    ]


def test_a_request_after_the_last_answer_is_never_read():
    engine = started()
    engine.client_data(query(1))
    engine.finish()
    assert engine.server_data(rows_void(1))[-1] == Finished(told=False)

    assert engine.client_data(query(2)) == []  # never forwarded
    assert not engine.reading_headers
    assert engine.server_data(rows_void(9)) == []  # nothing owed: the driver ends it
    assert engine.client_data(b"") == [Close("client closed")]


def test_nothing_is_finished_while_a_request_is_partly_read():
    engine = started()
    engine.client_data(query(1) + query(2)[:5])
    engine.finish()

    assert Finished(told=False) not in engine.server_data(rows_void(1))
    out = engine.client_data(query(2)[5:])
    assert [type(c) for c in out] == [Access, ToServer]
    assert engine.server_data(rows_void(2))[-1] == Finished(told=False)


def test_an_idle_connection_is_not_finished_until_an_answer_goes_out():
    engine = started()
    assert engine.finish() == []
    assert engine.finish() == []  # asking again changes nothing
    engine.client_data(query(3))
    assert engine.server_data(rows_void(3))[-1] == Finished(told=False)


def test_a_denial_answered_at_once_is_an_answer_to_end_behind():
    engine = started(deny_table("ks.secret"))
    engine.finish()
    out = engine.client_data(query(4, "ks.secret"))
    assert [type(c) for c in out] == [Access, Reply, ToClient, Finished]
    assert out[-1] == Finished(told=False)
