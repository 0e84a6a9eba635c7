"""The local copy of one prefix: list, watch events, and reconciling a fresh list."""

from __future__ import annotations

from l7proxy.cluster.kv import Event, KeyValue
from l7proxy.cluster.mirror import KeyChange, Mirror


def kv(key: str, value: str, rev: int) -> KeyValue:
    return KeyValue(key.encode(), value.encode(), rev, rev)


def test_a_first_list_is_all_puts() -> None:
    m = Mirror()
    assert m.reset([kv("a", "1", 2), kv("b", "2", 3)], 3) == [
        KeyChange(b"a", b"1", None),
        KeyChange(b"b", b"2", None),
    ]
    assert m.revision == 3


def test_watch_events_change_the_copy() -> None:
    m = Mirror()
    m.reset([kv("a", "1", 2)], 2)
    changes = m.apply(
        [Event(False, kv("b", "2", 3)), Event(False, kv("a", "9", 4)), Event(True, kv("b", "", 5))]
    )
    assert changes == [
        KeyChange(b"b", b"2", None),
        KeyChange(b"a", b"9", b"1"),
        KeyChange(b"b", None, b"2"),
    ]
    assert set(m.kvs) == {b"a"} and m.revision == 5


def test_a_fresh_list_shows_what_happened_while_disconnected() -> None:
    m = Mirror()
    m.reset([kv("a", "1", 2), kv("b", "2", 3), kv("c", "3", 4)], 4)
    # while the watch was down: b deleted, c changed, d created
    changes = m.reset([kv("a", "1", 2), kv("c", "33", 7), kv("d", "4", 8)], 9)
    assert sorted(changes, key=lambda c: c.key) == [
        KeyChange(b"b", None, b"2"),
        KeyChange(b"c", b"33", b"3"),
        KeyChange(b"d", b"4", None),
    ]


def test_events_already_in_the_list_and_rewrites_of_the_same_value_change_nothing() -> None:
    m = Mirror()
    m.reset([kv("a", "1", 5)], 6)
    assert m.apply([Event(False, kv("a", "0", 4))]) == []
    assert m.apply([Event(False, kv("a", "1", 7))]) == []
    assert m.apply([Event(True, kv("zz", "", 8))]) == []  # deleting what we never saw


def test_every_key_of_one_revision_changes_the_copy() -> None:
    """A transaction, or a lease that expires, changes several keys at one revision."""
    m = Mirror()
    m.reset([kv("a", "1", 2), kv("b", "2", 2), kv("c", "3", 3)], 3)
    assert m.apply([Event(True, kv("a", "", 4)), Event(True, kv("b", "", 4))]) == [
        KeyChange(b"a", None, b"1"),
        KeyChange(b"b", None, b"2"),
    ]
    assert m.apply([Event(False, kv("d", "4", 5)), Event(False, kv("e", "5", 5))]) == [
        KeyChange(b"d", b"4", None),
        KeyChange(b"e", b"5", None),
    ]
    assert set(m.kvs) == {b"c", b"d", b"e"} and m.revision == 5
