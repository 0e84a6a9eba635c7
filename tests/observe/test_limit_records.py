"""A client cut by a limit is one flow record of type ``limit``, readable in ``observe``."""

from __future__ import annotations

from l7proxy.observe.flowlog import format_record


def test_a_limit_record_reads_as_one_line_naming_the_limit() -> None:
    record = {
        "time_iso": "12:00:00.000",
        "type": "limit",
        "protocol": "http",
        "source": {"ip": "10.0.0.1", "port": 40000},
        "destination": {"endpoint": "api", "ip": "10.0.0.2", "port": 80},
        "verdict": "DROPPED",
        "limit": "header_timeout",
        "reason": "request head not complete 10 s after its first byte",
    }

    assert format_record(record) == (
        "12:00:00.000 DROPPED   10.0.0.1:40000 -> api:80 http limit=header_timeout "
        "(request head not complete 10 s after its first byte)"
    )
