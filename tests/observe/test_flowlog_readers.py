"""A flow log knows whether anyone reads its records: the proxy builds none for nobody."""

from __future__ import annotations

from l7proxy.observe.flowlog import FlowLog, read_records


def test_a_log_without_file_subscriber_or_memory_is_unwanted_until_someone_subscribes():
    log = FlowLog(None)
    assert not log.wanted

    seen: list[dict] = []
    log.subscribe(seen.append)
    assert log.wanted
    log.emit({"type": "l7", "verdict": "FORWARDED"})
    assert seen == [{"type": "l7", "verdict": "FORWARDED"}]

    log.unsubscribe(seen.append)
    log.unsubscribe(seen.append)  # twice: nothing to remove the second time
    assert not log.wanted and log.subscribers == ()


def test_a_log_with_a_file_is_wanted_until_it_is_closed(tmp_path):
    log = FlowLog(tmp_path / "flows.jsonl")
    assert log.wanted
    log.emit({"type": "l7", "verdict": "DENIED"})
    log.close()

    assert not log.wanted
    assert [r["verdict"] for r in read_records(tmp_path / "flows.jsonl")] == ["DENIED"]


def test_a_log_that_keeps_records_in_memory_is_wanted():
    log = FlowLog(None, keep=2)
    for n in range(3):
        log.emit({"n": n})

    assert log.wanted and [r["n"] for r in log.recent] == [1, 2]
