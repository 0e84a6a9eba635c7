"""Cilium's generic Cassandra rules: ``l7proto: cassandra`` with ``l7`` entries.

    rules:
      l7proto: cassandra
      l7:
        - query_action: select          # optional, exact, Cilium's vocabulary
          query_table: "ks\\..*"         # optional, full-match regex on keyspace.table

A rule matches a ``CqlRequest`` when its action equals ``query_action`` (if
given) and its ``keyspace.table`` full-matches ``query_table`` (if given).
A statement that names no table never matches a rule with ``query_table``
(Cilium lets it through; naming no table is no reason to be allowed).
``query_table`` next to an action that can never name one (roles, users,
permissions) is rejected at load time, as Cilium does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules import Edits, L7Kind, register
from parsers.cql.lexer import ACTIONS, ACTIONS_WITHOUT_TABLE
from parsers.requests import CqlRequest

_FIELDS = ("query_action", "query_table")


@dataclass(frozen=True, slots=True)
class CassandraRule:
    action: str | None
    table: re.Pattern[str] | None

    def _mismatch(self, request: CqlRequest) -> str | None:
        if self.action is not None and request.action != self.action:
            return f"query_action {request.action} != {self.action}"
        if self.table is not None:
            if not request.table:
                return f"{request.action} names no table"
            if self.table.fullmatch(request.table) is None:
                return f"query_table {request.table!r} does not match {self.table.pattern!r}"
        return None

    def matches(self, request: CqlRequest) -> bool:
        return self._mismatch(request) is None

    # Its ``edits`` are always none: a request it allows is never asked for them.
    may_edit: ClassVar[bool] = False

    def edits(self, request: CqlRequest) -> Edits:
        return ()

    def explain(self, request: CqlRequest) -> str:
        return self._mismatch(request) or "matches"

    def describe(self) -> str:
        parts = [f"query_action={self.action}"] if self.action else []
        if self.table is not None:
            parts.append(f"query_table={self.table.pattern}")
        return " ".join(parts) or "any CQL statement"


def compile_rule(node: Any, path: YamlPath) -> CassandraRule:
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise path.error(f"expected a mapping, got {type(node).__name__}")
    for key in node:
        if key not in _FIELDS:
            raise path.key(str(key)).error(f"unknown field {key!r} (known: {', '.join(_FIELDS)})")
    action = node.get("query_action")
    if action is not None:
        if not isinstance(action, str) or action not in ACTIONS:
            raise path.key("query_action").error(
                f"unknown query_action {action!r} (known: {', '.join(sorted(ACTIONS))})"
            )
    table = node.get("query_table")
    pattern = None
    if table is not None:
        if not isinstance(table, str) or not table:
            raise path.key("query_table").error(f"expected a non-empty regex string, got {table!r}")
        if action in ACTIONS_WITHOUT_TABLE:
            raise path.key("query_table").error(
                f"query_action {action!r} names no table; drop query_table"
            )
        try:
            pattern = re.compile(table)
        except re.error as e:
            raise path.key("query_table").error(f"invalid regex {table!r}: {e}") from None
    return CassandraRule(action, pattern)


KIND = register(
    L7Kind[CqlRequest, CassandraRule](
        key="cassandra",
        parser="cassandra",
        request_types=(CqlRequest,),
        compile=compile_rule,
        generic=True,
    )
)
