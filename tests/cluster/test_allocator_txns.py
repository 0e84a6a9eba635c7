"""The allocator's transactions as data, and what a failed attempt leads to."""

from __future__ import annotations

from l7proxy.cluster.allocator import (
    Attempt,
    IdentityTable,
    after_failure,
    create_txn,
    join_txn,
    release_txn,
    reuse_txn,
)
from l7proxy.cluster.gc import IdentityGc, collect_txn
from l7proxy.cluster.keys import Layout
from l7proxy.cluster.kv import Cmp, Delete, Get, KeyValue, Put, TxnResult

L = Layout("t/state")
K = "k8s:app=web;"
ID = b"t/state/identities/v1/id/300"
REFS = b"t/state/identities/v1/value/k8s:app=web;/"
REF = REFS + b"n1"


def test_create_compares_the_id_key_and_every_reference_and_writes_both() -> None:
    txn = create_txn(L, K, "n1", 300, lease=7)
    assert txn.compare == (Cmp(ID, "create", 0), Cmp(REFS, "create", 0, prefix=True))
    assert txn.success == (Put(ID, K.encode()), Put(REF, b"300", 7))
    assert txn.failure == (Get(REFS, prefix=True, limit=1), Get(ID))


def test_reuse_needs_the_id_key_to_hold_the_labels_and_no_reference() -> None:
    txn = reuse_txn(L, K, "n1", 300, lease=7)
    assert txn.compare == (Cmp(ID, "value", K.encode()), Cmp(REFS, "create", 0, prefix=True))
    assert txn.success == (Put(REF, b"300", 7),)


def test_join_needs_every_reference_to_carry_the_same_number() -> None:
    txn = join_txn(L, K, "n1", 300, lease=7)
    assert txn.compare == (Cmp(ID, "value", K.encode()), Cmp(REFS, "value", b"300", prefix=True))
    assert txn.success == (Put(REF, b"300", 7),)


def test_release_deletes_only_our_reference_to_that_number() -> None:
    txn = release_txn(L, K, "n1", 300)
    assert txn.compare == (Cmp(REF, "value", b"300"),)
    assert txn.success == (Delete(REF),)


def failed(refs: list[KeyValue], id_kv: list[KeyValue]) -> TxnResult:
    return TxnResult(False, 10, (tuple(refs), tuple(id_kv)))


def test_losing_the_race_for_the_first_reference_joins_the_winner() -> None:
    winner = KeyValue(REFS + b"n2", b"301")
    assert after_failure(K, 300, failed([winner], [])) == Attempt("join", 301)


def test_a_number_held_by_other_labels_means_a_new_candidate() -> None:
    other = KeyValue(ID, b"k8s:app=db;")
    assert after_failure(K, 300, failed([], [other])) == Attempt("create")


def test_an_unreferenced_id_key_with_our_labels_is_reused() -> None:
    ours = KeyValue(ID, K.encode())
    assert after_failure(K, 300, failed([], [ours])) == Attempt("reuse", 300)


def test_the_table_follows_the_identities_watch() -> None:
    t = IdentityTable()
    t.update(300, K)
    t.update(301, "k8s:app=db;")
    assert t.number_for(K) == 300
    t.update(300, None)
    assert t.number_for(K) is None and t.by_number == {301: "k8s:app=db;"}


def test_gc_waits_a_grace_period_and_never_takes_a_referenced_identity() -> None:
    gc = IdentityGc(kv=None, layout=L, grace=10.0)  # type: ignore[arg-type]
    web = KeyValue(ID, K.encode(), 5, 5)
    db = KeyValue(L.id_key(301), b"k8s:app=db;", 6, 6)
    db_ref = KeyValue(L.ref_key("k8s:app=db;", "n1"), b"301")
    assert gc.due([web, db], [db_ref], now=100.0) == []  # web's clock starts
    assert gc.due([web, db], [db_ref], now=109.0) == []
    assert gc.due([web, db], [db_ref], now=110.0) == [web]
    # a reference in between stops the clock; it starts again from zero after
    web_ref = KeyValue(REF, b"300")
    assert gc.due([web, db], [db_ref, web_ref], now=111.0) == []
    assert gc.due([web, db], [db_ref], now=112.0) == []
    assert gc.due([web, db], [db_ref], now=121.0) == []
    assert gc.due([web, db], [db_ref], now=122.0) == [web]
    assert 301 not in gc.unreferenced_since


def test_collection_is_one_transaction_that_needs_no_reference_at_that_moment() -> None:
    web = KeyValue(ID, K.encode(), 5, 42)
    txn = collect_txn(L, web)
    assert txn.compare == (Cmp(ID, "mod", 42), Cmp(REFS, "create", 0, prefix=True))
    assert txn.success == (Delete(ID),)
