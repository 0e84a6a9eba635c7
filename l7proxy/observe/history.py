"""The flow log read backward, newest first, from any ``Position`` in it: pages of
history for the web UI, without reading the log from its start.

A page starts at a position (a record's place, which a rotation keeps, see
``flowlog``), or at the end of the log, or at the last record written at or
before a given time (found by bisection: one writer appends in time order), and
walks back through the current file and then the rotated ones, newest first.
The caller bounds how far one page reads; where it stopped is the cursor of
the next page.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from l7proxy.observe.flowlog import Position, Record, _identity, head_of, retained_files

BLOCK = 1 << 16


class PositionGone(Exception):
    """The file of a position has been rotated away."""


FileId = tuple[int, int, int | None]  # device, inode, first-line checksum


def _file_id(f: IO[bytes]) -> FileId:
    return (*_identity(os.fstat(f.fileno())), head_of(f))


def _files_newest_first(path: Path) -> list[tuple[FileId, Path]]:
    out = []
    for name in reversed(retained_files(path)):
        try:
            with open(name, "rb") as f:
                out.append((_file_id(f), name))
        except FileNotFoundError:  # expired between the listing and the look
            continue
    return out


def records_before(
    path: str | Path, before: Position | None = None, *, until: float | None = None
) -> Iterator[tuple[Position, Record]]:
    """(position, record) of the flow log's records, newest first: those written
    before ``before`` (all, if None); with ``until``, only from the last record
    timed at or before it on. Raises PositionGone if ``before``'s file is gone."""
    files = _files_newest_first(Path(path))
    if before is not None:
        ids = [file_id for file_id, _ in files]
        wanted = (before.dev, before.ino, before.head)
        if wanted not in ids:
            raise PositionGone(f"the flow-log file of {before.token()} has been rotated away")
        files = files[ids.index(wanted) :]
    for i, (file_id, name) in enumerate(files):
        try:
            f = open(name, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with f:
            if _file_id(f) != file_id:
                continue  # a new current file since the listing: its records are newer
            end = os.fstat(f.fileno()).st_size
            if i == 0 and before is not None:
                end = min(end, before.offset)
            if until is not None:
                end = min(end, _first_after(f, end, until))
            for offset, line in _lines_backward(f, end):
                record = _record(line)
                if record is not None:
                    yield Position(file_id[0], file_id[1], file_id[2] or 0, offset), record


def record_at(path: str | Path, position: Position) -> Record | None:
    """The record that starts at ``position``, or None (no record starts there,
    or its file is gone)."""
    for file_id, name in _files_newest_first(Path(path)):
        if file_id != (position.dev, position.ino, position.head):
            continue
        try:
            with open(name, "rb") as f:
                if position.offset and _byte_at(f, position.offset - 1) != b"\n":
                    return None
                f.seek(position.offset)
                line = f.readline()
        except FileNotFoundError:
            return None
        return _record(line) if line.endswith(b"\n") else None
    return None


def _byte_at(f: IO[bytes], offset: int) -> bytes:
    f.seek(offset)
    return f.read(1)


def _lines_backward(f: IO[bytes], end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the complete lines that end at or before ``end``, last
    first. A line not ended by a newline (a writer mid-way) is left out."""
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) != b"\n":
        end = _past_last_newline(f, end)
        if end == 0:
            return
    pos = end - 1  # the newline that ends the last line
    carry = b""  # the start of a line cut at the previous block's start
    while True:
        start = max(0, pos - BLOCK)
        f.seek(start)
        region = f.read(pos - start) + carry  # a newline follows it in the file
        pieces = region.split(b"\n")
        offset = start + len(region)
        for piece in reversed(pieces if start == 0 else pieces[1:]):
            offset -= len(piece)
            if piece:
                yield offset, piece + b"\n"
            offset -= 1
        if start == 0:
            return
        carry, pos = pieces[0], start


def _past_last_newline(f: IO[bytes], end: int) -> int:
    """The offset just past the last newline before ``end``; 0 if there is none."""
    pos = end
    while pos > 0:
        start = max(0, pos - BLOCK)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _first_after(f: IO[bytes], end: int, when: float) -> int:
    """The offset of the first line before ``end`` whose record is timed after
    ``when`` (``end`` if none): records are appended in time order, so bisect."""
    lo, hi = 0, end
    while lo < hi:
        mid = (lo + hi) // 2
        start, line = _line_from(f, mid, end)
        if start >= end:
            hi = mid
            continue
        record = _record(line)
        if record is not None and float(record.get("time", 0)) > when:
            hi = mid
        else:
            lo = mid + 1
    return _line_from(f, lo, end)[0] if lo < end else end


def _line_from(f: IO[bytes], offset: int, end: int) -> tuple[int, bytes]:
    """The first line starting at or after ``offset`` (its offset, and the line),
    or (end, b"") when none starts before ``end``."""
    if offset:
        f.seek(offset - 1)
        f.readline()  # to the end of the line that holds offset - 1
    else:
        f.seek(0)
    start = f.tell()
    if start >= end:
        return end, b""
    return start, f.readline()


def _record(line: bytes) -> Record | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None
