"""The flow log: one structured record per L7 decision and per kernel drop.

Records are plain dicts (JSON lines on disk), written through a buffered file
that is flushed on a short timer rather than per record, so logging stays off
the per-request hot path. Subscribers (metrics, ``observe --follow`` tests)
receive every record as it is made.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from parsers.requests import L7Request

Record = dict[str, Any]


def request_fields(request: L7Request) -> tuple[str, dict[str, Any]]:
    """(protocol, fields) for the flow log: the request type says both."""
    return request.protocol, request.flow_fields()


class FlowLog:
    def __init__(self, path: str | Path | None = None, *, keep: int = 10_000):
        self.path = Path(path) if path else None
        self._file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115 - long-lived
        self.recent: deque[Record] = deque(maxlen=keep)
        self.subscribers: list[Callable[[Record], None]] = []

    def emit(self, record: Record) -> None:
        self.recent.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        for sub in self.subscribers:
            sub(record)

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
    """Yield records from a flow-log file; with ``follow``, keep waiting for more."""
    path = Path(path)
    while not path.exists():
        if not follow or stop():
            return
        time.sleep(poll)
    with open(path) as f:
        buf = ""
        while True:
            chunk = f.readline()
            if chunk:
                buf += chunk
                if buf.endswith("\n"):
                    line, buf = buf.strip(), ""
                    if line:
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            continue
                continue
            if not follow or stop():
                return
            time.sleep(poll)


def format_record(r: Record) -> str:
    """One human line per record, e.g. for ``observe`` and the demo."""
    src, dst = r.get("source", {}), r.get("destination", {})
    source = f"{src.get('endpoint') or src.get('ip')}:{src.get('port', '')}"
    destination = f"{dst.get('endpoint') or dst.get('ip')}:{dst.get('port', '')}"
    who = f"{source} -> {destination}"
    when = r.get("time_iso", "")
    if r.get("type") == "drop":
        return f"{when} DROPPED   {who} {r.get('protocol', 'tcp')} reason={r.get('reason')}"
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
    else:
        what = json.dumps(l7)
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
