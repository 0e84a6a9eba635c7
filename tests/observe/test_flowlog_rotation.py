"""The flow log is rotated by size, keeps a bounded number of files, and is read
across them: whole, and followed while it rotates underneath the reader."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from l7proxy.observe.flowlog import FlowLog, Rotation, read_records, retained_files
from tests.support import REPO

SMALL = Rotation(max_bytes=4096, backups=3)


def record(n: int) -> dict[str, object]:
    return {"type": "l7", "n": n, "protocol": "http", "verdict": "FORWARDED", "pad": "x" * 60}


def write(log: FlowLog, first: int, count: int) -> None:
    for n in range(first, first + count):
        log.emit(record(n))
    log.flush()


def test_files_stay_within_the_size_and_the_count(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    log = FlowLog(path, rotation=SMALL)
    write(log, 0, 2000)  # about 200 KB of records through a 4 KB file
    log.close()

    files = retained_files(path)
    numbers = [int(f.name.rpartition(".")[2]) for f in files[:-1]]
    assert len(numbers) == SMALL.backups
    assert numbers == list(range(numbers[0], numbers[0] + SMALL.backups))  # the newest three
    assert files[-1].name == "flows.jsonl"
    assert all(f.stat().st_size <= SMALL.max_bytes for f in files)
    assert not (tmp_path / f"flows.jsonl.{numbers[0] - 1}").exists()
    assert numbers[-1] > 40  # rotated many times


def test_reading_gives_the_retained_records_oldest_first_without_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    log = FlowLog(path, rotation=SMALL)
    write(log, 0, 2000)
    log.close()

    numbers = [r["n"] for r in read_records(path)]
    assert numbers[-1] == 1999
    assert numbers == list(range(numbers[0], 2000))
    assert len(numbers) > 100  # four files' worth, not just the newest one


def test_a_restarted_writer_appends_and_counts_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    first = FlowLog(path, rotation=SMALL)
    write(first, 0, 20)
    first.close()
    second = FlowLog(path, rotation=SMALL)
    write(second, 20, 100)
    second.close()

    assert all(f.stat().st_size <= SMALL.max_bytes for f in retained_files(path))
    assert [r["n"] for r in read_records(path)][-1] == 119


def test_two_writers_rotating_the_same_file_lose_no_record_of_the_newest_files(
    tmp_path: Path,
) -> None:
    """An agent draining after a handover writes beside its successor: when one has
    rotated, the other reopens instead of shifting the files again."""
    path = tmp_path / "flows.jsonl"
    old, new = FlowLog(path, rotation=SMALL), FlowLog(path, rotation=SMALL)
    for n in range(0, 200, 2):
        old.emit(record(n))
        old.flush()
        new.emit(record(n + 1))
        new.flush()
    old.close()
    new.close()

    numbers = sorted(r["n"] for r in read_records(path))
    assert numbers[-2:] == [198, 199]
    assert numbers == list(range(numbers[0], 200))


def test_following_carries_on_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    log = FlowLog(path, rotation=Rotation(max_bytes=4096, backups=50))
    write(log, 0, 10)
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        for rec in read_records(path, follow=True, poll=0.01, stop=done.is_set):
            seen.append(int(rec["n"]))
            if rec["n"] == 999:
                return

    reader = threading.Thread(target=follow)
    reader.start()
    for first in range(10, 1000, 10):  # many rotations while the reader follows
        write(log, first, 10)
    reader.join(timeout=20)
    done.set()
    log.close()

    assert not reader.is_alive()
    assert seen == list(range(1000))


def test_observe_reads_across_the_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    log = FlowLog(path, rotation=SMALL)
    write(log, 0, 300)
    log.close()
    expected = [r["n"] for r in read_records(path)]

    shown = subprocess.run(
        [sys.executable, "-m", "l7proxy", "observe", "--file", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.splitlines()
    assert len(shown) == len(expected) > 40
    assert '"n":299' in shown[-1].replace(" ", "")


def test_a_rotation_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="backups >= 1"):
        Rotation(max_bytes=1 << 20, backups=0)
