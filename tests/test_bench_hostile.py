"""The hostile-client bench's own pieces (bench/hostile*.py), without a proxy or a clock.

The bench itself is long (minutes) and runs real processes; what can be checked at once is
that its attackers speak HTTP/2 as a real peer reads it (so a proxy's answer is to the
attack, not to a malformed frame), that its frame reader copes with any cut, and that its
report says what the measurements say.
"""

from __future__ import annotations

import argparse
from typing import Any

import h2.events as ev
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack.hpack import decode_integer

from bench.hostile import report, summary, with_baselines
from bench.hostile_attacks import _hpack_int
from bench.hostile_peers import (
    CANCEL,
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    GET_BLOCK,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    Ending,
    FrameReader,
    frame,
    goaway_of,
    latency_stats,
    reply_kind,
    summarize_endings,
)
from tests.support.feeding import splits

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"bench")]


def server() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


def test_rapid_reset_frames_are_requests_then_cancels_to_a_real_http2_server() -> None:
    conn = server()
    wire = PREFACE + frame(SETTINGS, 0, 0)
    for stream in (1, 3, 5):  # the same header block on every stream: no HPACK state
        wire += frame(HEADERS, END_STREAM | END_HEADERS, stream, GET_BLOCK)
        wire += frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big"))

    events = conn.receive_data(wire)

    requests = [e for e in events if isinstance(e, ev.RequestReceived)]
    assert [(e.stream_id, e.headers) for e in requests] == [(s, GET) for s in (1, 3, 5)]
    resets = [e for e in events if isinstance(e, ev.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(1, CANCEL), (3, CANCEL), (5, CANCEL)]


def test_ping_and_settings_floods_are_frames_a_server_must_answer() -> None:
    conn = server()
    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    conn.data_to_send()

    events = conn.receive_data(
        frame(PING, 0, 0, b"hostile!") + frame(SETTINGS, 0, 0, b"\x00\x01\x00\x00\x10\x00")
    )

    assert [type(e) for e in events] == [ev.PingReceived, ev.RemoteSettingsChanged]
    answers = FrameReader().feed(conn.data_to_send())
    assert [(kind, flags) for kind, flags, _, _ in answers] == [(PING, 1), (SETTINGS, 1)]


def test_a_continuation_flood_is_one_header_block_that_never_ends() -> None:
    start = b"\x00\x07x-flood" + _hpack_int(1 << 30, 7)
    assert decode_integer(start[9:], 7) == (1 << 30, len(start) - 9)
    conn = server()
    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))

    events = conn.receive_data(
        frame(HEADERS, END_STREAM, 1, GET_BLOCK + start) + frame(CONTINUATION, 0, 1, b"a" * 1024)
    )

    assert events == []  # still waiting for END_HEADERS


@pytest.mark.parametrize("tail", [b"", b"\x00\x00\x08\x06"])  # a frame not all there yet
def test_the_frame_reader_gives_the_same_frames_however_the_bytes_are_cut(tail: bytes) -> None:
    frames = [
        (SETTINGS, 1, 0, b""),
        (PING, 1, 0, b"hostile!"),
        (GOAWAY, 0, 0, b"\x00\x00\x00\x07\x00\x00\x00\x0bcalm down"),
    ]
    wire = b"".join(frame(*f) for f in frames) + tail
    for way, chunks in splits(wire):
        reader = FrameReader()
        got = [f for chunk in chunks for f in reader.feed(chunk)]
        assert got == frames, way
    assert goaway_of(frames[2][3]) == "GOAWAY(ENHANCE_YOUR_CALM, calm down)"


def test_how_a_connection_ended_is_read_off_what_came_back() -> None:
    assert reply_kind(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n") == "408"
    assert reply_kind(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", reset=True) == "431"
    assert reply_kind(b"") == "close"
    assert reply_kind(b"", reset=True) == "reset"
    summary = summarize_endings(
        [Ending("408", 10.1), Ending("408", 10.4), Ending("408", 10.2), Ending("open")]
    )
    assert summary == {
        "connections": 4,
        "cut": 3,
        "how": {"408": 3, "open": 1},
        "cut_after_median_s": 10.2,
        "cut_after_max_s": 10.4,
    }


def test_latency_counts_only_the_requests_sent_during_the_attack() -> None:
    samples = [(0.5, 0.001, ""), (1.0, 0.002, ""), (1.5, None, "TimeoutError"), (2.0, 0.004, "")]
    stats = latency_stats(samples, 1.0, 1.9)
    assert stats["requests"] == 2
    assert stats["failed"] == 1 and stats["failures"] == {"TimeoutError": 1}
    assert stats["p50_ms"] == stats["p99_ms"] == 2.0


def row(attack: str, proxy: str, p99: float | None, **extra: Any) -> dict[str, Any]:
    failed, requests = extra.pop("legit_failed", (0, 100))
    return {
        "attack": attack,
        "title": extra.pop("title", attack),
        "proxy": proxy,
        "group": "http1",
        "cut": summarize_endings(extra.pop("endings", [])),
        "proxy_cpu_s": 0.5,
        "busy_after_s": 2.0,
        "rss_mib": {"before": 40.0, "peak": 48.0, "after": 41.0},
        "upstream_connections": {"before": 1, "after": 1},
        "legit": {"requests": requests, "failed": failed, "p50_ms": 0.5, "p99_ms": p99},
        "notes": "",
        **extra,
    }


def test_the_report_puts_each_attack_beside_its_own_baseline() -> None:
    slow = [Ending("408", 10.0)] * 500
    rows = [
        row("baseline", "l7proxy", 2.0, title="none (baseline)"),
        row("baseline", "haproxy", 1.0, title="none (baseline)"),
        row("slowloris_silent", "l7proxy", 6.0, title="slowloris", endings=slow),
        row("slowloris_silent", "haproxy", 1.5, title="slowloris", endings=slow),
        row("slowloris_trickle", "l7proxy", None, title="trickle", legit_failed=(2, 2)),
        row(
            "idle",
            "l7proxy",
            4.0,
            title="10,000 idle",
            endings=[Ending("open")] * 3,
            rss_per_connection_kib=3.1,
            upstream_opened=0,
            accept_s=1.2,
        ),
    ]
    with_baselines(rows)
    doc = {"rows": rows}

    full = report(doc).splitlines()
    assert full[2].startswith("| none (baseline) | l7proxy | - | - | 0.50 | 2.0 | 40 / 48 / 41 |")
    assert "| slowloris | l7proxy | 408 ×500 | 10.0 / 10.0 |" in full[4]
    assert "| 0.5 / 6.0 | 3.0× | 0/100 |" in full[4]
    short = summary(doc).splitlines()
    assert short[2] == (
        "| slowloris | 408 ×500 at 10.0 s | 0.50 / 48 | 6.0 (3.0×) "
        "| 408 ×500 at 10.0 s | 0.50 / 48 | 1.5 (1.5×) |"
    )
    assert short[3].endswith("| 2/2 failed | - | - | - |")  # no latency: none came back
    assert short[4].startswith("| 10,000 idle | 3.1 KiB/conn, 0 upstream, accepted in 1.2 s |")
    assert short[4].endswith("| - | - | - |")  # no haproxy row: said, not invented


def test_the_quick_sizes_are_smaller_and_any_of_them_can_be_set() -> None:
    from bench.hostile import parse_args

    full, quick = parse_args([]), parse_args(["--quick", "--idle", "2000"])
    assert (full.idle, quick.idle, quick.slowloris) == (10_000, 2_000, 50)
    assert isinstance(full, argparse.Namespace) and full.proxies == ["l7proxy", "haproxy"]
    with pytest.raises(SystemExit):
        parse_args(["--attacks", "teardrop"])
