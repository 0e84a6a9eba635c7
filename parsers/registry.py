"""Which engine parses which L7 protocol family.

The policy names a parser family per port (``http``, ``kafka``,
``cassandra``, ``tls``); this table turns it into an engine factory. Engines are
imported lazily so that a port without L7 rules costs nothing.
"""

from __future__ import annotations

import importlib

from parsers.base import EngineFactory

# family -> "module:factory". The factory is called as factory(decide) -> Engine.
ENGINES: dict[str, str] = {
    "http": "parsers.http:HttpEngine",
    "kafka": "parsers.kafka.engine:KafkaEngine",
    "cassandra": "parsers.cql.engine:CqlEngine",
    "tls": "parsers.tls.engine:TlsEngine",
}

_cache: dict[str, EngineFactory] = {}


def engine_factory(family: str) -> EngineFactory:
    factory = _cache.get(family)
    if factory is None:
        target = ENGINES.get(family)
        if target is None:
            raise KeyError(f"no engine for L7 protocol {family!r}")
        module, _, name = target.partition(":")
        factory = getattr(importlib.import_module(module), name)
        _cache[family] = factory
    return factory


def proxy_engine_factory(family: str) -> EngineFactory:
    """``engine_factory(family)`` for one proxy: its engines share what that family's
    engines may share across connections (the HTTP engine's ``sharing``: the heads
    seen lately). A proxy calls it once per family and keeps the factory."""
    factory = engine_factory(family)
    sharing = getattr(factory, "sharing", None)
    return sharing() if sharing is not None else factory


def preload_engines(families: set[str]) -> None:
    """Import the engines of ``families`` now (unknown names are left to
    ``engine_factory`` to refuse when a connection asks)."""
    for family in sorted(families):
        if family in ENGINES:
            engine_factory(family)


def active_parsers() -> dict[str, str]:
    """Which implementation each parser with a choice is using (for status and logs)."""
    from parsers import fastnew
    from parsers.http1 import engine as http1
    from parsers.http1 import quick

    # http1: the head parser (llhttp or Python); http1_quick: the read of plain
    # request heads in front of it (the C scanner or its Python twin); fast_new: how
    # the engines build their commands and requests (C constructors, or the classes).
    active = http1.active_implementation()
    return {
        "http1": active,
        "http1_quick": quick.quick_implementation(active),
        "fast_new": fastnew.FAST_NEW_IMPLEMENTATION,
    }
