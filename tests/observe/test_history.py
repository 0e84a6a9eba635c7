"""The flow log read backward from a position, across rotations, and the bounded
tap that hands records with their positions to the UI."""

from __future__ import annotations

import json
import os

import pytest

import l7proxy.observe.history as history
from l7proxy.observe.flowlog import (
    FlowLog,
    FlowTap,
    Position,
    Rotation,
    read_records,
    retained_files,
)
from l7proxy.observe.history import PositionGone, record_at, records_before


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks smaller than a record, so every line is cut by some block boundary.
    monkeypatch.setattr(history, "BLOCK", 37)


SMALL_FILES = Rotation(4096, 3)


def write(path, count: int) -> tuple[FlowLog, list]:
    log = FlowLog(path, rotation=SMALL_FILES)
    tap = FlowTap(log)
    for n in range(count):
        log.emit({"time": 1000.0 + n, "n": n, "pad": "x" * (n * 7 % 61)})
    log.flush()
    batch, missed = tap.take()
    assert missed == 0
    return log, batch


def test_newest_first_across_rotated_files_as_the_forward_reader_sees_them(tmp_path, small_blocks):
    path = tmp_path / "flows.jsonl"
    log, _ = write(path, 300)
    assert len(retained_files(path)) == 4  # rotated: the current file and 3 kept
    forward = list(read_records(path))
    backward = [record for _, record in records_before(path)]
    assert backward == list(reversed(forward))
    assert backward[0]["n"] == 299
    log.close()


def test_every_position_the_tap_gave_finds_its_record(tmp_path, small_blocks):
    path = tmp_path / "flows.jsonl"
    log, batch = write(path, 300)
    kept = {r["n"] for r in read_records(path)}
    for _, position, record in batch:
        found = record_at(path, position)
        assert found == (record if record["n"] in kept else None)
        # Paging on from a record gives the one written just before it.
        if record["n"] - 1 in kept:
            assert next(records_before(path, position))[1]["n"] == record["n"] - 1
    log.close()


def test_a_position_is_a_token_and_back(tmp_path):
    position = Position(64768, 2163901, 0xDEADBEEF, 7372)
    assert Position.parse(position.token()) == position
    with pytest.raises(ValueError):
        Position.parse("12.x.3.4")
    with pytest.raises(ValueError):
        Position.parse("1.2.3")


def test_until_starts_from_the_last_record_at_or_before_it(tmp_path, small_blocks):
    path = tmp_path / "flows.jsonl"
    log, _ = write(path, 300)
    assert next(records_before(path, until=1250.5))[1]["n"] == 250
    assert next(records_before(path, until=1250.0))[1]["n"] == 250
    assert next(records_before(path, until=5000))[1]["n"] == 299
    assert list(records_before(path, until=999)) == []
    log.close()


def test_a_line_the_writer_has_not_finished_is_left_out(tmp_path, small_blocks):
    path = tmp_path / "flows.jsonl"
    path.write_text(json.dumps({"n": 1}) + "\n" + json.dumps({"n": 2}) + "\n" + '{"n": 3, "pa')
    assert [r["n"] for _, r in records_before(path)] == [2, 1]
    with open(path, "rb") as f:
        st, head = os.stat(path), history.head_of(f)
    assert record_at(path, Position(st.st_dev, st.st_ino, head, 0)) == {"n": 1}
    assert record_at(path, Position(st.st_dev, st.st_ino, head, 3)) is None  # not a line start


def test_a_position_in_a_file_rotated_away_says_so(tmp_path):
    """Also when a newer file got the expired one's inode (tmpfs reuses them)."""
    path = tmp_path / "flows.jsonl"
    log, batch = write(path, 300)
    oldest_position = batch[0][1]
    with pytest.raises(PositionGone):
        next(records_before(path, oldest_position))
    assert record_at(path, oldest_position) is None
    log.close()


def test_the_tap_is_bounded_and_counts_what_it_dropped(tmp_path):
    log = FlowLog(None)
    tap = FlowTap(log, capacity=10)
    for n in range(25):
        log.emit({"n": n})
    batch, missed = tap.take()
    assert [(seq, record["n"]) for seq, _, record in batch] == [(s, s - 1) for s in range(16, 26)]
    assert batch[0][1] is None  # no file, no position
    assert missed == 15
    log.emit({"n": 25})
    assert tap.take() == ([(26, None, {"n": 25})], 0)
    tap.close()
    log.emit({"n": 26})
    assert tap.take() == ([], 0)
