"""The flow log is rotated by size, keeps a bounded number of files, and is read
across them: whole, and followed while it rotates underneath the reader."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
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


WRITER = """
import random, sys
from l7proxy.observe.flowlog import FlowLog, Rotation
path, writer, count, max_bytes, backups = sys.argv[1:6]
log = FlowLog(path, rotation=Rotation(int(max_bytes), int(backups)), fields={"worker": int(writer)})
rng = random.Random(int(writer))
for n in range(int(count)):
    # Lines of different lengths, so a torn or interleaved line would not parse.
    log.emit({"type": "l7", "n": n, "pad": "x" * rng.randrange(10, 3000)})
    if rng.random() < 0.01:
        log.flush()
log.close()
"""


def run_writers(path: Path, writers: int, count: int, rotation: Rotation) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), str(count)]
            + [str(rotation.max_bytes), str(rotation.backups)],
            cwd=REPO,
        )
        for w in range(writers)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * writers


def every_line(path: Path) -> list[str]:
    return [line for f in retained_files(path) for line in f.read_text().splitlines(True)]


def test_writer_processes_hammering_one_file_lose_and_tear_no_line(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    rotation = Rotation(max_bytes=256 << 10, backups=10_000)  # rotates often, keeps all
    run_writers(path, writers=4, count=3000, rotation=rotation)

    lines = every_line(path)
    assert all(line.endswith("\n") for line in lines)
    records = [json.loads(line) for line in lines]  # a torn line would not parse
    seen = Counter((r["worker"], r["n"]) for r in records)
    assert seen == Counter({(w, n): 1 for w in range(4) for n in range(3000)})
    assert len(retained_files(path)) > 10
    assert all(f.stat().st_size <= rotation.max_bytes for f in retained_files(path))
    # read_records (what observe reads) gives each writer's records in its order.
    by_writer: dict[int, list[int]] = {}
    for r in read_records(path):
        by_writer.setdefault(r["worker"], []).append(r["n"])
    assert by_writer == {w: list(range(3000)) for w in range(4)}


def test_writer_processes_rotating_with_few_backups_keep_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    rotation = Rotation(max_bytes=64 << 10, backups=3)
    run_writers(path, writers=4, count=2000, rotation=rotation)

    files = retained_files(path)
    assert len(files) == 4  # three backups and the current file
    numbers = [int(f.name.rpartition(".")[2]) for f in files[:-1]]
    assert numbers == list(range(numbers[0], numbers[0] + 3)) and numbers[0] > 10
    assert all(f.stat().st_size <= rotation.max_bytes for f in files)
    records = [json.loads(line) for line in every_line(path)]
    # The newest files hold the end of each writer's stream still retained, without
    # a gap or a repeat: a writer that finished early may have expired entirely.
    by_writer: dict[int, list[int]] = {}
    for r in records:
        by_writer.setdefault(r["worker"], []).append(r["n"])
    assert by_writer
    for numbers in by_writer.values():
        assert sorted(numbers) == list(range(min(numbers), 2000))
