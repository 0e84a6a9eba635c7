"""The flow log: one structured record per L7 decision, per kernel drop and per
client cut by a limit (``type`` ``l7``, ``drop``, ``limit``).

Records are plain dicts (JSON lines on disk), written through a buffered file
that is flushed on a short timer rather than per record, so logging stays off
the per-request hot path. Subscribers (metrics, ``observe --follow`` tests)
receive every record as it is made.

The file is rotated by size: ``flows.jsonl`` is renamed ``flows.jsonl.N``, N one
more than the newest rotated file, and only the newest ``backups`` rotated files
are kept. Rotated files are never renamed again (unlike logrotate's ``.1``,
``.2``, … shifting), so a reader that follows the log can always tell which
files came after the one it was reading, however many rotations it slept
through. ``read_records`` reads the retained files oldest first and, when
following, carries on across rotations. A writer counts its own bytes, so
rotating costs nothing per record.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from parsers.requests import L7Request

Record = dict[str, Any]


def request_fields(request: L7Request) -> tuple[str, dict[str, Any]]:
    """(protocol, fields) for the flow log: the request type says both."""
    return request.protocol, request.flow_fields()


@dataclass(frozen=True)
class Rotation:
    """When the flow-log file is rotated, and how many rotated files are kept.

    The defaults bound the flow log to about 600 MB on disk (0.8 KB a record:
    some 750,000 records).
    """

    max_bytes: int = 100 << 20
    backups: int = 5

    def __post_init__(self) -> None:
        if self.max_bytes < 4096 or self.backups < 1:
            raise ValueError("flow-log rotation needs max_bytes >= 4096 and backups >= 1")


DEFAULT_ROTATION = Rotation()


def rotated(path: Path, n: int) -> Path:
    """The n-th rotated file of ``path`` (higher is newer)."""
    return path.with_name(f"{path.name}.{n}")


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of ``path`` that exist, oldest first, with their numbers."""
    prefix = path.name + "."
    found = [
        (int(p.name[len(prefix) :]), p)
        for p in path.parent.glob(prefix + "*")
        if p.name[len(prefix) :].isdigit()
    ]
    return sorted(found)


def retained_files(path: str | Path) -> list[Path]:
    """The flow log's files that exist, oldest first, the current one last."""
    path = Path(path)
    return [p for _, p in rotated_files(path)] + ([path] if path.exists() else [])


class FlowLog:
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        keep: int = 10_000,
        rotation: Rotation = DEFAULT_ROTATION,
    ):
        self.path = Path(path) if path else None
        self.rotation = rotation
        self._file: IO[str] | None = None
        self._written = 0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        self.recent: deque[Record] = deque(maxlen=keep)
        self.subscribers: list[Callable[[Record], None]] = []

    def _open(self) -> None:
        assert self.path is not None
        self._file = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115 - long-lived
        self._written = self._file.tell()

    def emit(self, record: Record) -> None:
        self.recent.append(record)
        if self._file is not None:
            line = json.dumps(record, separators=(",", ":")) + "\n"
            if self._written + len(line) > self.rotation.max_bytes and self._written:
                self._rotate()
            self._file.write(line)
            self._written += len(line)  # characters: bytes for the ASCII that json.dumps writes
        for sub in self.subscribers:
            sub(record)

    def _rotate(self) -> None:
        """Give the current file the next number and start a new one. Another writer
        (an agent draining after a handover) may have rotated it already: then only
        reopen."""
        assert self._file is not None and self.path is not None
        self._file.flush()
        mine = _identity(os.fstat(self._file.fileno()))
        self._file.close()
        try:
            current = _identity(os.stat(self.path))
        except FileNotFoundError:
            current = None
        if current == mine:
            older = rotated_files(self.path)
            number = older[-1][0] + 1 if older else 1
            while True:  # link, not rename: never replace a file another writer made
                try:
                    os.link(self.path, rotated(self.path, number))
                    break
                except FileExistsError:
                    number += 1
            os.unlink(self.path)
            for _, expired in older[: max(0, len(older) + 1 - self.rotation.backups)]:
                expired.unlink(missing_ok=True)
        self._open()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None


def read_records(
    path: str | Path,
    *,
    follow: bool = False,
    poll: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Record]:
    """Yield the records of a flow log, oldest first, from its rotated files and
    then the current one; with ``follow``, keep waiting for more, across rotations."""
    path = Path(path)
    while True:
        try:
            f: IO[str] = open(path)  # noqa: SIM115 - swapped for the new file on rotation
            break
        except FileNotFoundError:
            if not follow or stop():
                for _, older in rotated_files(path):
                    yield from _records_of(older)
                return
            time.sleep(poll)
    try:
        for older_file in _rotated_between(path, None, _identity(os.fstat(f.fileno()))):
            with older_file:
                yield from _complete_records(older_file)
        partial = ""
        while True:
            chunk = f.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    line, partial = partial.strip(), ""
                    record = _record(line)
                    if record is not None:
                        yield record
                continue
            if not follow or stop():
                return
            if _replaced(f, path):
                # Rotated, once or more since the last look: the writer flushed the
                # old file before renaming it, so read it to its end, then every
                # file rotated after it, then go on in the new one.
                rest = partial + f.read()
                mine = _identity(os.fstat(f.fileno()))
                f.close()
                for line in rest.splitlines(keepends=True):
                    record = _record(line.strip()) if line.endswith("\n") else None
                    if record is not None:
                        yield record
                f = _open_current(path, poll)
                for newer in _rotated_between(path, mine, _identity(os.fstat(f.fileno()))):
                    with newer:
                        yield from _complete_records(newer)
                partial = ""
                continue
            time.sleep(poll)
    finally:
        f.close()


def _records_of(path: Path) -> Iterator[Record]:
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        yield from _complete_records(f)


def _open_current(path: Path, poll: float) -> IO[str]:
    while True:
        try:
            return open(path)  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:  # between the writer's rename and its new file
            time.sleep(poll)


def _rotated_between(
    path: Path, after: tuple[int, int] | None, until: tuple[int, int]
) -> list[IO[str]]:
    """The rotated files newer than the one identified by ``after`` (all, if it is
    None or expired) and older than ``until`` (the file the reader holds as the
    current one, which may itself have been rotated since), opened, oldest first."""
    opened: list[tuple[tuple[int, int], IO[str]]] = []
    for _, name in rotated_files(path):
        try:
            f = open(name)  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:  # expired meanwhile
            continue
        opened.append((_identity(os.fstat(f.fileno())), f))
    identities = [identity for identity, _ in opened]
    first = identities.index(after) + 1 if after in identities else 0
    last = identities.index(until) if until in identities else len(opened)
    for _, unwanted in opened[:first] + opened[last:]:
        unwanted.close()
    return [wanted for _, wanted in opened[first:last]]


def _complete_records(f: IO[str]) -> Iterator[Record]:
    for line in f:
        record = _record(line.strip()) if line.endswith("\n") else None
        if record is not None:
            yield record


def _record(line: str) -> Record | None:
    if not line:
        return None
    try:
        record: Record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record


def _replaced(f: IO[str], path: Path) -> bool:
    """True if ``path`` now names another file than the one open as ``f``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return _identity(now) != _identity(os.fstat(f.fileno()))


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def format_record(r: Record) -> str:
    """One human line per record, e.g. for ``observe`` and the demo."""
    src, dst = r.get("source", {}), r.get("destination", {})
    source = f"{src.get('endpoint') or src.get('ip')}:{src.get('port', '')}"
    destination = f"{dst.get('endpoint') or dst.get('ip')}:{dst.get('port', '')}"
    who = f"{source} -> {destination}"
    when = r.get("time_iso", "")
    if r.get("type") == "drop":
        times = f" x{r['count']}" if r.get("count", 1) > 1 else ""
        verdict = f"{r.get('verdict', 'DROPPED'):<9}"
        return f"{when} {verdict} {who} {r.get('protocol', 'tcp')} reason={r.get('reason')}{times}"
    if r.get("type") == "tls":  # a TLS handshake the proxy terminates that failed
        verdict = f"{r.get('verdict', 'DROPPED'):<9}"
        return f"{when} {verdict} {who} tls reason={r.get('reason')}"
    if r.get("type") == "limit":
        verdict = f"{r.get('verdict', 'DROPPED'):<9}"
        proto = r.get("protocol", "")
        return f"{when} {verdict} {who} {proto} limit={r.get('limit')} ({r.get('reason')})"
    l7 = r.get("l7", {})
    proto = r.get("protocol", "")
    if proto == "http":
        what = f"{l7.get('method')} http://{l7.get('host')}{l7.get('path')}"
    elif proto == "grpc":
        what = f"{l7.get('service')}/{l7.get('method')}"
    elif proto == "kafka":
        topics = ",".join(l7.get("topics", []))
        what = f"api={l7.get('api_key')} v{l7.get('api_version')} topics={topics}"
    elif proto == "cassandra":
        what = f"{l7.get('action')} {l7.get('table')}"
    elif proto == "tls":
        what = f"sni={l7.get('sni') or '-'} alpn={','.join(l7.get('alpn', [])) or '-'}"
        what += " ech" if l7.get("ech") else ""
    else:
        what = json.dumps(l7)
    session = r.get("tls")
    if session:  # inside a TLS session the proxy terminated
        client = session.get("client") or {}
        peer = " ".join(client.get("uris") or ([client["subject"]] if client else []))
        what += f" [tls sni={session.get('sni') or '-'} alpn={session.get('alpn') or '-'}"
        what += f" client={peer}]" if peer else "]"
    reply = r.get("reply") or {}
    status = " ".join(f"{k}={v}" for k, v in reply.items())
    lat = r.get("latency_ms")
    lat_s = f" {lat:.2f}ms" if isinstance(lat, (int, float)) else ""
    rule = f" policy={r['policy']}" if r.get("policy") else ""
    verdict = f"{r.get('verdict', ''):<9}"
    return f"{when} {verdict} {who} {proto} {what} {status}{lat_s}{rule} ({r.get('reason', '')})"


_second = -1
_second_text = ""


def now_fields() -> dict[str, Any]:
    """Wall-clock fields of a record. The HH:MM:SS text is formatted once per second."""
    global _second, _second_text
    t = time.time()
    sec = int(t)
    if sec != _second:
        _second, _second_text = sec, time.strftime("%H:%M:%S", time.localtime(sec))
    return {"time": t, "time_iso": f"{_second_text}.{int(t * 1000) % 1000:03d}"}
