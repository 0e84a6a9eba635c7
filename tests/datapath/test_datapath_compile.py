"""Policy compilation into LPM keys, checked against a naive reading of the
entries (no kernel needed): whatever port a packet has, the longest-prefix
match over the compiled keys must give the same flags as OR-ing every entry
that covers that port."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7proxy.datapath.loader import (
    POL_ALLOW,
    POL_AUDIT_DENY,
    POL_DENY,
    POL_REDIRECT,
    PolicyEntry,
    compile_policy,
    port_blocks,
)


def lpm_lookup(compiled, group, port):
    """What the kernel's LPM trie answers for one (endpoint, dir, identity, proto)."""
    best = None
    for (*g, start, bits), value in compiled.items():
        if tuple(g) != group:
            continue
        shift = 16 - bits
        if (port >> shift) == (start >> shift) and (best is None or bits > best[0]):
            best = (bits, value)
    return best[1] if best else (0, 0)


def naive(entries, port):
    flags, proxy_ports = 0, []
    for e in entries:
        lo, hi = (0, 65535) if e.port_lo == e.port_hi == 0 else (e.port_lo, e.port_hi or e.port_lo)
        if lo <= port <= hi:
            if e.action == "allow":
                flags |= POL_ALLOW
            elif e.action == "deny":
                flags |= POL_AUDIT_DENY if e.audit else POL_DENY
            else:
                flags |= POL_REDIRECT
                proxy_ports.append(e.proxy_port)
    return flags, min(proxy_ports, default=0)


def test_port_blocks_of_the_whole_space_is_one_block():
    assert port_blocks(0, 65535) == [(0, 0)]


def test_port_blocks_of_one_port_is_a_full_length_prefix():
    assert port_blocks(8080, 8080) == [(8080, 16)]


def test_port_blocks_of_an_unaligned_range():
    # 8000 = 125 * 64, so 8000-8063 is one 64-port block (/10); then 8064-8079 (/12),
    # 8080-8087 (/13), 8088-8089 (/15) and 8090 alone (/16).
    assert port_blocks(8000, 8090) == [(8000, 10), (8064, 12), (8080, 13), (8088, 15), (8090, 16)]


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_blocks_cover_exactly_the_range(a, b):
    lo, hi = min(a, b), max(a, b)
    blocks = port_blocks(lo, hi)
    covered = 0
    expected_start = lo
    for start, bits in blocks:
        size = 1 << (16 - bits)
        assert start == expected_start, "blocks are contiguous and in order"
        assert start % size == 0, "blocks are aligned prefixes"
        covered += size
        expected_start = start + size
    assert covered == hi - lo + 1
    assert len(blocks) <= 32


def test_single_port_shorthand():
    e = PolicyEntry(1, "ingress", 0, 6, 443, 0, "allow")
    assert e.port_range() == (443, 443)


@pytest.mark.parametrize(
    "bad",
    [
        PolicyEntry(1, "sideways", 0, 6, 80, 0, "allow"),
        PolicyEntry(1, "ingress", 0, 6, 80, 0, "maybe"),
        PolicyEntry(1, "ingress", 0, 6, 90, 80, "allow"),
        PolicyEntry(1, "ingress", 0, 6, 80, 70000, "allow"),
        PolicyEntry(1, "ingress", 0, 6, 80, 0, "redirect"),  # no proxy port
        PolicyEntry(0, "ingress", 0, 6, 80, 0, "allow"),  # no endpoint
    ],
)
def test_invalid_entries_are_rejected(bad):
    with pytest.raises(ValueError):
        compile_policy([bad])


def test_deny_inside_an_allowed_range_splits_it():
    entries = [
        PolicyEntry(5, "ingress", 300, 6, 8000, 8999, "allow"),
        PolicyEntry(5, "ingress", 300, 6, 8080, 0, "deny"),
    ]
    compiled = compile_policy(entries)
    group = (5, 0, 300, 6)
    assert lpm_lookup(compiled, group, 8079) == (POL_ALLOW, 0)
    assert lpm_lookup(compiled, group, 8080) == (POL_ALLOW | POL_DENY, 0)
    assert lpm_lookup(compiled, group, 8081) == (POL_ALLOW, 0)
    assert lpm_lookup(compiled, group, 9000) == (0, 0)


def test_any_port_compiles_to_a_single_key():
    compiled = compile_policy([PolicyEntry(5, "egress", 0, 0, 0, 0, "allow")])
    assert compiled == {(5, 1, 0, 0, 0, 0): (POL_ALLOW, 0)}


entry_strategy = st.builds(
    lambda lo, span, action, proxy, audit: PolicyEntry(
        7,
        "ingress",
        400,
        6,
        lo,
        0 if span < 0 else min(lo + span, 65535),
        action,
        proxy_port=proxy if action == "redirect" else 0,
        audit=audit and action == "deny",
    ),
    st.sampled_from([0, 1, 79, 80, 81, 443, 1023, 1024, 8000, 8080, 65534, 65535]),
    st.sampled_from([-1, 0, 1, 2, 15, 16, 100, 1000, 65535]),
    st.sampled_from(["allow", "deny", "redirect"]),
    st.sampled_from([15001, 15002]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(entry_strategy, min_size=1, max_size=6),
    st.lists(st.integers(0, 65535), min_size=5, max_size=20),
)
def test_lpm_answer_equals_the_naive_reading(entries, probes):
    compiled = compile_policy(entries)
    edges = {p for e in entries for p in (e.port_lo - 1, e.port_lo, e.port_hi, e.port_hi + 1)}
    for port in set(probes) | {p for p in edges if 0 <= p <= 65535}:
        assert lpm_lookup(compiled, (7, 0, 400, 6), port) == naive(entries, port), port
