"""The flow log: one structured record per L7 decision, per kernel drop and per
client cut by a limit (``type`` ``l7``, ``drop``, ``limit``).

Records are plain dicts (JSON lines on disk). Whole lines are gathered in
memory and written in batches, each with one ``write`` on an ``O_APPEND``
descriptor, when 64 KiB are waiting or on a short timer (``flush``), so logging
stays off the per-request hot path. Several processes may write the one file
(the workers of ``firewall --workers N``, an agent draining beside its
successor): a line never straddles two writes, so lines of different writers
never interleave. Subscribers (metrics, ``observe --follow`` tests) receive
every record as it is made; a ``FlowTap`` queues them, bounded, for a consumer
that reads them in batches (the web UI), with the place in the file where each
is written (``Position``), so the consumer can find it there again. A position
is exact while one process writes the file; beside another writer it is where
the record would start if the other wrote nothing meanwhile.

The file is rotated by size: ``flows.jsonl`` is renamed ``flows.jsonl.N``, N one
more than the newest rotated file, and only the newest ``backups`` rotated files
are kept. Rotated files are never renamed again (unlike logrotate's ``.1``,
``.2``, … shifting), so a reader that follows the log can always tell which
files came after the one it was reading, however many rotations it slept
through. ``read_records`` reads the retained files oldest first and, when
following, carries on across rotations. Writers take a lock file
(``.flows.jsonl.lock``, ``flock``) around each batch: under it a writer sees
whether another one rotated (then it reopens), reads the size the file has
with everyone's lines, and rotates if the batch would not fit. So no line
lands in a file after it was rotated, and the size costs a ``fstat`` per
batch, nothing per record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from parsers.base import Decision
from parsers.requests import HttpRequest, L7Request

Record = dict[str, Any]


def request_fields(request: L7Request) -> tuple[str, dict[str, Any]]:
    """(protocol, fields) for the flow log: the request type says both."""
    return request.protocol, request.flow_fields()


def request_record(
    now: float,
    request: L7Request,
    reply: Record,
    decision: Decision,
    latency_ms: float,
    source: Record | None,
    destination: Record | None,
    tls: Record | None,
) -> Record:
    """The record of a request answered (``type`` l7): what it was, the reply's
    fields, the decision, and how long the answer took (``latency_ms``, to the
    microsecond)."""
    # (One literal: the fields of ``now_fields`` first, as in every record.)
    record: Record = {
        "time": now,
        "time_iso": clock_text(now),
        "type": "l7",
        "protocol": request.protocol,
        "source": source,
        "destination": destination,
        "l7": request.flow_fields(),
        "reply": reply,
        "verdict": decision.verdict,
        "policy": decision.policy,
        "rule": decision.rule,
        "reason": decision.reason,
        "latency_ms": latency_ms,
    }
    if tls is not None:
        record["tls"] = tls
    return record


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


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record starts in the flow log: its file and the byte offset there.

    A file is known by its device and inode (a rotation keeps both: rotated
    files are never renamed again) and by a checksum of its first line, since a
    file created after an old one expired may get the old one's inode."""

    dev: int
    ino: int
    head: int
    offset: int

    def token(self) -> str:
        return f"{self.dev:x}.{self.ino:x}.{self.head:x}.{self.offset:x}"

    @classmethod
    def parse(cls, token: str) -> Position:
        """The inverse of ``token``; ValueError when it is not one."""
        parts = token.split(".")
        if len(parts) != 4:
            raise ValueError(f"not a flow-log position: {token!r}")
        dev, ino, head, offset = (int(p, 16) for p in parts)
        if min(dev, ino, head, offset) < 0:
            raise ValueError(f"not a flow-log position: {token!r}")
        return cls(dev, ino, head, offset)


def first_line_checksum(line: bytes) -> int:
    return zlib.crc32(line)


def head_of(f: IO[bytes]) -> int | None:
    """The checksum of an open file's first line (None while it has no whole line)."""
    f.seek(0)
    line = f.readline()
    return first_line_checksum(line) if line.endswith(b"\n") else None


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


# Lines gathered before they are written (also written by ``flush``, on a timer).
BATCH_BYTES = 64 << 10


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"))`` without what each call of it
    costs before encoding starts (building an encoder): a third of the time for a
    flow record. CPython's C encoder, made once; the same output."""
    plain = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # not CPython's C accelerator
        return plain.encode
    encode_chunks = make(
        None,
        plain.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )
    join = "".join
    return lambda value: join(encode_chunks(value, 0))


_dumps = _compact_encoder()
# A str as JSON (ASCII, as ``_dumps`` writes it).
_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


class LineEncoder:
    """A record as one JSON line, with a connection's two endpoints encoded once.

    The driver describes a connection's ``source`` and ``destination`` once, and
    every record of that connection carries the same two dicts: with their labels
    they are half of a line, and of the time it takes to encode one. They are
    known here by identity (a record's values are never changed once emitted),
    and written last in the line.
    """

    __slots__ = ("_known", "_fragments")
    KNOWN_MAX = 4096

    def __init__(self) -> None:
        # id(source) -> (source, destination, the line's end with both encoded)
        self._known: dict[int, tuple[object, object, str]] = {}
        # id(value) -> (value, its text): decisions, TLS sessions, extra fields
        self._fragments: dict[int, tuple[object, str]] = {}

    def line(self, record: Record) -> str:
        source = record.pop("source", None)
        destination = record.pop("destination", None)
        text = _dumps(record)
        if source is None or destination is None:
            if source is not None:
                record["source"] = source
            if destination is not None:
                record["destination"] = destination
            return (
                _dumps(record) if source is not None or destination is not None else text
            ) + "\n"
        record["source"] = source
        record["destination"] = destination
        ends = self._ends(source, destination)
        return f"{text[:-1]},{ends}" if len(text) > 2 else "{" + ends

    def _ends(self, source: object, destination: object) -> str:
        """``"source":...,"destination":...}`` and the newline, for one connection."""
        known = self._known
        entry = known.get(id(source))
        if entry is None or entry[0] is not source or entry[1] is not destination:
            if len(known) >= self.KNOWN_MAX:
                known.clear()
            ends = f'"source":{_dumps(source)},"destination":{_dumps(destination)}}}\n'
            entry = known[id(source)] = (source, destination, ends)
        return entry[2]

    def request_line(
        self,
        now: float,
        request: L7Request,
        reply: Record,
        decision: Decision,
        latency_ms: float,
        source: Record | None,
        destination: Record | None,
        tls: Record | None,
        extra: Record,
    ) -> str:
        """The line of ``request_record(...)`` with ``extra`` added, as ``line`` writes
        it, without the record: a request's values in a template, and what requests
        share (the decision, the connection's ends and TLS session) encoded once."""
        if source is None or destination is None:  # (not the driver's: it knows both)
            record = request_record(
                now, request, reply, decision, latency_ms, source, destination, tls
            )
            record.update(extra)
            return self.line(record)
        fragments = self._fragments
        decided = fragments.get(id(decision))
        if decided is None or decided[0] is not decision:
            if len(fragments) >= self.KNOWN_MAX:
                fragments.clear()
            text = _dumps(
                {
                    "verdict": decision.verdict,
                    "policy": decision.policy,
                    "rule": decision.rule,
                    "reason": decision.reason,
                }
            )
            decided = fragments[id(decision)] = (decision, text[1:-1])
        tail = ""
        if tls is not None:
            tail = "," + self._fragment('"tls":', tls)
        if extra:
            tail += "," + self._fragment("", extra)[1:-1]
        if type(request) is HttpRequest:  # (``_dumps(request.flow_fields())``, a third)
            l7 = (
                f'{{"method":{_string(request.method)},"path":{_string(request.path)},'
                f'"host":{_string(request.host)},"version":{_string(request.version)}}}'
            )
        else:
            l7 = _dumps(request.flow_fields())
        status = reply.get("status")
        if type(status) is int and len(reply) == 1:  # (``_dumps(reply)``, a third)
            answer = f'{{"status":{status}}}'
        else:
            answer = _dumps(reply)
        return (
            f'{{"time":{now!r},"time_iso":"{clock_text(now)}","type":"l7",'
            f'"protocol":{_string(request.protocol)},"l7":{l7},"reply":{answer},'
            f'{decided[1]},"latency_ms":{latency_ms!r}{tail},{self._ends(source, destination)}'
        )

    def _fragment(self, prefix: str, value: Record) -> str:
        """``prefix`` and ``value`` encoded, once for each such dict (by identity)."""
        fragments = self._fragments
        known = fragments.get(id(value))
        if known is None or known[0] is not value:
            if len(fragments) >= self.KNOWN_MAX:
                fragments.clear()
            known = fragments[id(value)] = (value, prefix + _dumps(value))
        return known[1]


class FlowLog:
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        keep: int = 0,
        rotation: Rotation = DEFAULT_ROTATION,
        fields: Record | None = None,
    ):
        self.path = Path(path) if path else None
        self.rotation = rotation
        # Added to every record (``worker``: which worker process made it).
        self.fields: Record = dict(fields or {})
        self._fd = -1
        self._lock_fd = -1
        self._file_id = (0, 0)
        self._head: int | None = None  # the current file's first-line checksum
        self._size = 0  # the file's size when we last wrote or looked, under the lock
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._encoder = LineEncoder()
        # Where the record being emitted starts in the file (None without one):
        # subscribers read it while they are called.
        self.last_position: Position | None = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self.path.with_name(f".{self.path.name}.lock"),
                os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
            self._open()
        # The last ``keep`` records, for whoever embeds the proxy in its process (tests).
        self.recent: deque[Record] = deque(maxlen=keep)
        # Called with each record; changed only by ``subscribe`` and ``unsubscribe``.
        self.subscribers: tuple[Callable[[Record], None], ...] = ()
        self._update_wanted()

    def subscribe(self, callback: Callable[[Record], None]) -> None:
        self.subscribers = (*self.subscribers, callback)
        self._update_wanted()

    def unsubscribe(self, callback: Callable[[Record], None]) -> None:
        """Stop calling ``callback`` (nothing if it was not subscribed)."""
        self.subscribers = tuple(s for s in self.subscribers if s != callback)
        self._update_wanted()

    def _update_wanted(self) -> None:
        # Whether a record emitted now reaches anyone: the file, a subscriber or
        # ``recent``. Without one, a request's record is not built: that would cost
        # a small request more than all the rest of its accounting. (An attribute,
        # read once per request.)
        self.wanted = self._fd >= 0 or bool(self.subscribers) or bool(self.recent.maxlen)

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(self._fd)
        self._file_id = _identity(st)
        self._size = st.st_size
        self._head = None
        if self._size:
            # Read through the descriptor we hold, not the path: another writer may
            # have rotated the file away from the path a moment ago.
            with os.fdopen(os.dup(self._fd), "rb") as existing:
                self._head = head_of(existing)

    def emit(self, record: Record) -> None:
        if self.fields:
            record.update(self.fields)
        self.recent.append(record)
        if self._fd >= 0:
            self._append(self._encoder.line(record))
        for sub in self.subscribers:
            sub(record)

    def emit_request(
        self,
        request: L7Request,
        reply: Record,
        decision: Decision,
        latency_ms: float,
        source: Record | None,
        destination: Record | None,
        tls: Record | None,
    ) -> None:
        """A request's record (``request_record``), now. When only the file reads it,
        its line is written without the record being built (a third of the cost)."""
        now = time.time()
        if self.subscribers or self.recent.maxlen:
            record = request_record(
                now, request, reply, decision, latency_ms, source, destination, tls
            )
            self.emit(record)
        elif self._fd >= 0:
            self._append(
                self._encoder.request_line(
                    now, request, reply, decision, latency_ms, source, destination, tls, self.fields
                )
            )

    def _append(self, line: str) -> None:
        """One line to the file, in the batch (written when it is full)."""
        # Rotation is decided here, line by line, so that the position handed
        # to subscribers names the file the line goes to.
        if self._size + self._pending_bytes + len(line) > self.rotation.max_bytes and (
            self._size + self._pending_bytes
        ):
            self._write_pending(room_for=len(line))
        if self._head is None:  # the first line of a new file
            self._head = first_line_checksum(line.encode())
        if self.subscribers:  # (only they read it, while they are called)
            self.last_position = Position(
                *self._file_id, self._head, self._size + self._pending_bytes
            )
        self._pending.append(line)
        self._pending_bytes += len(line)  # characters: bytes for json.dumps' ASCII
        if self._pending_bytes >= BATCH_BYTES:
            self._write_pending()

    def _write_pending(self, *, room_for: int = 0) -> None:
        """Write the gathered lines under the writers' lock: reopen if another
        writer rotated, rotate whenever the next line would not fit (another
        writer's lines count too), and rotate after them if ``room_for`` more
        bytes would not fit."""
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        if self._fd < 0 or not (lines or room_for):
            return
        assert self.path is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if self._replaced():
                os.close(self._fd)
                self._open()
            size = os.fstat(self._fd).st_size
            limit = self.rotation.max_bytes
            batch: list[str] = []
            batch_bytes = 0
            for line in lines:
                if size + batch_bytes + len(line) > limit and size + batch_bytes:
                    _write_all(self._fd, "".join(batch).encode())
                    self._rotate()
                    size, batch, batch_bytes = 0, [], 0
                batch.append(line)
                batch_bytes += len(line)
            _write_all(self._fd, "".join(batch).encode())
            self._size = size + batch_bytes
            if self._size and self._size + room_for > limit:
                self._rotate()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _replaced(self) -> bool:
        """True if the path no longer names the file we hold (another writer rotated)."""
        assert self.path is not None
        try:
            return _identity(os.stat(self.path)) != _identity(os.fstat(self._fd))
        except FileNotFoundError:
            return True

    def _rotate(self) -> None:
        """Give the current file the next number and start a new one (under the lock)."""
        assert self.path is not None
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
        os.close(self._fd)
        self._open()

    def flush(self) -> None:
        self._write_pending()

    def close(self) -> None:
        if self._fd >= 0:
            self._write_pending()
            os.close(self._fd)
            os.close(self._lock_fd)
            self._fd = self._lock_fd = -1
            self._update_wanted()


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` for the whole batch; loop only on a partial write (a full disk,
    a signal), so the rest follows at once."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FlowTap:
    """The records a ``FlowLog`` emits, queued for a consumer that takes them in
    batches (the web UI, once a tick), with the ``Position`` of each. The queue
    is bounded: when the consumer falls ``capacity`` records behind, the oldest
    go, and ``take`` says how many it missed. Emitting costs one append."""

    def __init__(self, flowlog: FlowLog, capacity: int = 50_000):
        self.flowlog = flowlog
        self._queue: deque[tuple[int, Position | None, Record]] = deque(maxlen=capacity)
        self.emitted = 0  # records seen; also the sequence number of the last one
        self._taken = 0
        flowlog.subscribe(self)

    def __call__(self, record: Record) -> None:
        self.emitted += 1
        self._queue.append((self.emitted, self.flowlog.last_position, record))

    def take(self) -> tuple[list[tuple[int, Position | None, Record]], int]:
        """(sequence number, position, record) of everything queued, oldest first,
        and how many records were lost to the bound since the last take."""
        batch = list(self._queue)
        self._queue.clear()
        missed = self.emitted - self._taken - len(batch)
        self._taken = self.emitted
        return batch, missed

    def close(self) -> None:
        self.flowlog.unsubscribe(self)


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
# ".000" to ".999": a record's milliseconds looked up, not formatted (once per record).
_MILLIS = tuple(f".{ms:03d}" for ms in range(1000))


def now_fields() -> dict[str, Any]:
    """Wall-clock fields of a record."""
    t = time.time()
    return {"time": t, "time_iso": clock_text(t)}


def clock_text(t: float) -> str:
    """A record's ``time_iso``: local HH:MM:SS.mmm, the seconds formatted once per second."""
    global _second, _second_text
    sec = int(t)
    if sec != _second:
        _second, _second_text = sec, time.strftime("%H:%M:%S", time.localtime(sec))
    return _second_text + _MILLIS[int(t * 1000) % 1000]
