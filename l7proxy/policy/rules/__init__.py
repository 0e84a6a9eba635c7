"""Registry of L7 rule kinds.

Each protocol contributes one module here that registers an ``L7Kind``:
how to compile a YAML rule (validated at load time, with a YAML path in every
error) and which parser family handles the traffic. The loader and engine
know nothing protocol-specific beyond this registry.

    rules:
      http:  [{method: GET, path: /v1/.*}]       -> kind "http",  parser "http"
      grpc:  [{service: pkg.Svc, method: Get}]    -> kind "grpc",  parser "http"
      kafka: [{role: produce, topic: orders}]     -> kind "kafka", parser "kafka"
    l7proto: cassandra                            -> kind "cassandra", parser "cassandra"
    l7: [{query_action: select, query_table: ks\\..*}]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from l7proxy.policy.errors import YamlPath


class CompiledRule(Protocol):
    """One compiled L7 rule. Immutable; built once when the policy loads."""

    def matches(self, request: Any) -> bool:
        """True if this rule allows (or, in a deny section, denies) ``request``."""
        ...

    def explain(self, request: Any) -> str:
        """Why it matched or not, in words, e.g. ``method PUT != POST``."""
        ...

    def describe(self) -> str:
        """The rule as written, compactly, e.g. ``POST /v1/request-landing``."""
        ...


@dataclass(frozen=True)
class L7Kind:
    """A kind of L7 rule list under ``toPorts[].rules``.

    ``key`` is the YAML key under ``rules`` (``http``, ``grpc``, ``kafka``), or
    for generic ``l7proto``/``l7`` rules, the ``l7proto`` value (``cassandra``).
    ``parser`` names the engine family that parses traffic on that port; two
    kinds with the same parser (http and grpc) may be combined on one port.
    ``compile`` turns one YAML mapping into a ``CompiledRule`` or raises
    ``PolicyError`` via ``path.error(...)``.
    """

    key: str
    parser: str
    compile: Callable[[Any, YamlPath], CompiledRule]
    generic: bool = False  # True: written as l7proto + l7 (Cilium's generic form)


_KINDS: dict[str, L7Kind] = {}


def register(kind: L7Kind) -> L7Kind:
    _KINDS[kind.key] = kind
    return kind


def kind(key: str) -> L7Kind | None:
    _load_builtin()
    return _KINDS.get(key)


def all_kinds() -> dict[str, L7Kind]:
    _load_builtin()
    return dict(_KINDS)


_loaded = False


def _load_builtin() -> None:
    # Imported lazily so that each protocol module stays optional and
    # independent; a module that fails to import is a bug, not a skip.
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for name in BUILTIN:
        importlib.import_module(f"l7proxy.policy.rules.{name}")


# One module per protocol in this package registers its kinds on import.
BUILTIN = ["http", "kafka", "cassandra", "grpc"]
