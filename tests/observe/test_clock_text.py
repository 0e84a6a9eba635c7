"""A record's ``time_iso``: the local wall clock to the millisecond."""

from __future__ import annotations

import time

from l7proxy.observe.flowlog import clock_text


def test_time_iso_is_the_local_clock_to_the_millisecond():
    second = 1_765_000_000  # any second: the local zone's own formatting is the reference
    hms = time.strftime("%H:%M:%S", time.localtime(second))
    assert clock_text(second) == f"{hms}.000"
    assert clock_text(second + 0.0071) == f"{hms}.007"
    assert clock_text(second + 0.5) == f"{hms}.500"
    assert clock_text(second + 0.9999) == f"{hms}.999"
    next_hms = time.strftime("%H:%M:%S", time.localtime(second + 1))
    assert clock_text(second + 1.042) == f"{next_hms}.042"
    assert clock_text(second + 0.25) == f"{hms}.250"  # back to an earlier second
