"""``rules.grpc``: which gRPC services and methods may be called.

    rules:
      grpc:
        - service: grpc.testing.TestService     # exact fully-qualified service name
          method: UnaryCall                     # exact method name
        - service: "grpc\\.health\\.v1\\..*"      # a regex (it has metacharacters)
        - method: "Get.*"                       # any service, methods starting with Get

Each of ``service`` and ``method`` is an exact name, or a full-match regex
when the value contains a regex metacharacter other than ``.`` (``\\ ^ $ * +
? { } [ ] | ( )``). A dot alone does not make a regex, because every package-
qualified service name has dots; write ``\\.`` in regexes that need a literal
dot. An omitted field matches everything. A grpc rule matches only
``GrpcCall`` requests (plain HTTP/2 requests on the same port need
``rules.http``, which also sees gRPC calls through their HTTP request).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules import Edits, L7Kind, register
from parsers.requests import GrpcCall

_FIELDS = ("service", "method")
_METACHARACTERS = re.compile(r"[\\^$*+?{}\[\]|()]")
# Protobuf identifiers: what an exact name may look like.
_SERVICE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_METHOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class NameMatch:
    """An exact name or a compiled full-match regex."""

    text: str
    regex: re.Pattern[str] | None

    def __call__(self, value: str) -> bool:
        if self.regex is None:
            return value == self.text
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class GrpcRule:
    service: NameMatch | None
    method: NameMatch | None

    def _mismatch(self, request: GrpcCall) -> str | None:
        if self.service is not None and not self.service(request.service):
            return f"service {request.service!r} does not match {self.service.text!r}"
        if self.method is not None and not self.method(request.method):
            return f"method {request.method!r} does not match {self.method.text!r}"
        return None

    def matches(self, request: GrpcCall) -> bool:
        return self._mismatch(request) is None

    # Its ``edits`` are always none: a request it allows is never asked for them.
    may_edit: ClassVar[bool] = False

    def edits(self, request: GrpcCall) -> Edits:
        return ()

    def explain(self, request: GrpcCall) -> str:
        return self._mismatch(request) or f"call {request.service}/{request.method} matches"

    def describe(self) -> str:
        service = self.service.text if self.service else "*"
        method = self.method.text if self.method else "*"
        return f"grpc {service}/{method}"


def _name(node: Any, path: YamlPath, exact: re.Pattern[str]) -> NameMatch | None:
    if node is None:
        return None
    if not isinstance(node, str) or not node:
        raise path.error(f"expected a non-empty name or regex string, got {node!r}")
    if _METACHARACTERS.search(node) is None:
        if exact.fullmatch(node) is None:
            raise path.error(
                f"{node!r} is not a valid protobuf name (and has no regex metacharacters)"
            )
        return NameMatch(node, None)
    try:
        return NameMatch(node, re.compile(node))
    except re.error as exc:
        raise path.error(f"invalid regex {node!r}: {exc}") from None


def compile_rule(node: Any, path: YamlPath) -> GrpcRule:
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise path.error(
            f"expected a mapping with service and/or method, got {type(node).__name__}"
        )
    for key in node:
        if key not in _FIELDS:
            raise path.key(str(key)).error(f"unknown field {key!r} (known: {', '.join(_FIELDS)})")
    return GrpcRule(
        service=_name(node.get("service"), path.key("service"), _SERVICE_NAME),
        method=_name(node.get("method"), path.key("method"), _METHOD_NAME),
    )


KIND = register(
    L7Kind[GrpcCall, GrpcRule](
        key="grpc", parser="http", request_types=(GrpcCall,), compile=compile_rule
    )
)
