"""Registry of L7 rule kinds.

Each protocol contributes one module here that registers an ``L7Kind``:
how to compile a YAML rule (validated at load time, with a YAML path in every
error), which request types its rules judge, how several of its rules combine,
and which parser family handles the traffic. The loader and engine know
nothing protocol-specific beyond this registry.

    rules:
      http:  [{method: GET, path: /v1/.*}]       -> kind "http",  parser "http"
      grpc:  [{service: pkg.Svc, method: Get}]    -> kind "grpc",  parser "http"
      kafka: [{role: produce, topic: orders}]     -> kind "kafka", parser "kafka"
    l7proto: cassandra                            -> kind "cassandra", parser "cassandra"
    l7: [{query_action: select, query_table: ks\\..*}]
    serverNames: [api.example.com, "*.example.com"]  (beside rules: a port field)
                                                  -> kind "serverNames", parser "tls"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from l7proxy.policy.errors import YamlPath
from parsers.requests import L7Request

# Header edits an allowed request must get before it is forwarded:
# ("add" | "delete" | "replace", header name, value).
Edits = tuple[tuple[str, str, str], ...]

Req = TypeVar("Req", bound=L7Request)
Req_contra = TypeVar("Req_contra", bound=L7Request, contravariant=True)


class CompiledRule(Protocol[Req_contra]):
    """One compiled L7 rule, for the request type(s) of its kind. Immutable;
    built once when the policy loads. The engine hands a rule only requests of
    its kind's ``request_types``."""

    def matches(self, request: Req_contra) -> bool:
        """True if this rule allows (or, in a deny section, denies) ``request``."""
        ...

    def edits(self, request: Req_contra) -> Edits:
        """Header edits a request this rule allows must get (HTTP headerMatches)."""
        ...

    @property
    def may_edit(self) -> bool:
        """Whether ``edits`` can return any edit: a rule that never edits is not asked."""
        ...

    def explain(self, request: Req_contra) -> str:
        """Why it matched or not, in words, e.g. ``method PUT != POST``."""
        ...

    def describe(self) -> str:
        """The rule as written, compactly, e.g. ``POST /v1/request-landing``."""
        ...


# The compiled rule type of one kind (``KafkaRule``...), so that its combine
# rule may use more than the ``CompiledRule`` protocol offers.
Rule = TypeVar("Rule", bound=CompiledRule[Any])


def any_rule_matches(rules: Sequence[CompiledRule[Req]], request: Req) -> bool:
    """The default way rules combine: a request is allowed by one rule, whole."""
    return any(rule.matches(request) for rule in rules)


@dataclass(frozen=True)
class L7Kind(Generic[Req, Rule]):
    """A kind of L7 rule list under ``toPorts[].rules``.

    ``key`` is the YAML key under ``rules`` (``http``, ``grpc``, ``kafka``), or
    for generic ``l7proto``/``l7`` rules, the ``l7proto`` value (``cassandra``).
    ``parser`` names the engine family that parses traffic on that port; two
    kinds with the same parser (http and grpc) may be combined on one port.
    ``request_types`` are the request classes its rules judge; a request of
    another type never reaches them. ``compile`` turns one YAML mapping into a
    ``CompiledRule`` or raises ``PolicyError`` via ``path.error(...)``.
    ``combine`` says whether several of its rules together allow a request
    (Kafka: every topic allowed, each by some rule). ``port_field`` kinds are written
    on the port rule itself, beside ``rules`` (``toPorts[].serverNames``): the whole
    list is one rule, and ``compile`` gets the list.
    """

    key: str
    parser: str
    request_types: tuple[type[Req], ...]
    compile: Callable[[Any, YamlPath], Rule]
    combine: Callable[[Sequence[Rule], Req], bool] = any_rule_matches
    generic: bool = False  # True: written as l7proto + l7 (Cilium's generic form)
    port_field: bool = False  # True: toPorts[].<key>, beside rules (serverNames)


_KINDS: dict[str, L7Kind[Any, Any]] = {}


def register(kind: L7Kind[Req, Rule]) -> L7Kind[Req, Rule]:
    _KINDS[kind.key] = kind
    return kind


def kind(key: str) -> L7Kind[Any, Any] | None:
    _load_builtin()
    return _KINDS.get(key)


def all_kinds() -> dict[str, L7Kind[Any, Any]]:
    _load_builtin()
    return dict(_KINDS)


# One module per protocol in this package registers its kinds on import.
BUILTIN = ["http", "kafka", "cassandra", "grpc", "tls"]

_loaded = False


def _load_builtin() -> None:
    # Imported lazily so that each protocol module stays optional and
    # independent; a module that fails to import is a bug, not a skip.
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(f"l7proxy.policy.rules.{name}")
