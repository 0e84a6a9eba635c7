"""``toPorts[].serverNames``: the TLS server names (SNI) a port allows, judged on the
ClientHello without decrypting anything.

    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: ["api.example.com", "*.svc.example.com", "**.cdn.example.com"]

Cilium's semantics ("If not empty, then TLS must be present and one of the provided
SNIs must be indicated in the TLS handshake"), with its proxy's patterns
(cilium/proxy, ``SniPattern`` in cilium/network_policy.h):

- ``api.example.com`` matches that name, ignoring case;
- ``*.example.com`` matches exactly one label before ``.example.com``
  (``a.example.com``, not ``a.b.example.com``, not ``example.com``);
- ``**.example.com`` matches one or more labels before it;
- a ClientHello without a name matches nothing, so a port with ``serverNames`` needs one;
- with ECH the name judged is the outer, public one (docs/tls.md).

One list is one rule, as in Cilium (a port rule's ``allowed_snis``); several rules on a
port allow what any of them allows, and an L4 rule on the same port allows every name.
In a deny section (``ingressDeny``/``egressDeny``) the list names what is refused.

Everything is checked when the policy loads: a pattern is a DNS name, optionally
behind ``*.`` or ``**.``, in ASCII (A-labels for international names), without a
trailing dot (SNI never carries one, RFC 6066 3), and never an IP address (SNI never
carries one either); an empty list is the same as none, as in Cilium.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules import Edits, L7Kind, register
from parsers.requests import TlsClientHello

_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


@dataclass(frozen=True, slots=True)
class ServerNamesRule:
    """One ``serverNames`` list, compiled: a set for exact names and suffixes for
    wildcards, so a match is a set lookup and a few ``endswith``."""

    exact: frozenset[str]
    one_label: tuple[str, ...]  # "*.example.com" -> ".example.com"
    any_labels: tuple[str, ...]  # "**.example.com" -> ".example.com"
    text: tuple[str, ...]  # as written (lowercased), for describe()

    def _pattern_for(self, sni: str) -> str | None:
        """The pattern that matches ``sni`` (lowercased), or None."""
        if sni in self.exact:
            return sni
        for suffix in self.one_label:
            if sni.endswith(suffix) and len(sni) > len(suffix):
                if "." not in sni[: -len(suffix)]:
                    return "*" + suffix
        for suffix in self.any_labels:
            if sni.endswith(suffix) and len(sni) > len(suffix):
                return "**" + suffix
        return None

    def matches(self, request: TlsClientHello) -> bool:
        return bool(request.sni) and self._pattern_for(request.sni.lower()) is not None

    # Its ``edits`` are always none: a request it allows is never asked for them.
    may_edit: ClassVar[bool] = False

    def edits(self, request: TlsClientHello) -> Edits:
        return ()

    def explain(self, request: TlsClientHello) -> str:
        outer = " (the outer name: the client uses ECH)" if request.ech else ""
        if not request.sni:
            return "the ClientHello names no server"
        pattern = self._pattern_for(request.sni.lower())
        if pattern is None:
            return f"server name {request.sni!r}{outer} matches none of them"
        return f"server name {request.sni!r}{outer} matches {pattern!r}"

    def describe(self) -> str:
        return "serverNames " + ", ".join(self.text)


def _pattern(node: Any, path: YamlPath) -> str:
    if not isinstance(node, str) or not node:
        raise path.error(f"expected a server name, got {node!r}")
    name = node.lower()
    if not name.isascii():
        raise path.error(
            f"{node!r} is not ASCII: write an international name in its A-label form "
            f"({_a_label(node)})"
        )
    if name.endswith("."):
        raise path.error(
            f"{node!r} ends with a dot, which a server name never does (RFC 6066 3): "
            f"write {node.rstrip('.')!r}"
        )
    base = name.removeprefix("**.") if name.startswith("**.") else name.removeprefix("*.")
    if "*" in base:
        raise path.error(
            f"{node!r}: a wildcard is only the whole leftmost label, '*.example.com' "
            "(one label) or '**.example.com' (any number of labels)"
            + ("; to allow every name, leave serverNames out" if name in ("*", "**") else "")
        )
    try:
        ipaddress.ip_address(base)
    except ValueError:
        pass
    else:
        raise path.error(
            f"{node!r} is an IP address: a ClientHello never names one (RFC 6066 3); "
            "restrict addresses with toCIDR or toEndpoints"
        )
    labels = base.split(".")
    if len(base) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise path.error(
            f"{node!r} is not a DNS name (labels of 1 to 63 letters, digits, '-' or '_', "
            "253 characters at most)"
        )
    return name


def _a_label(name: str) -> str:
    try:
        return "e.g. " + name.encode("idna").decode("ascii")
    except UnicodeError:
        return "xn--..."


def compile_rule(node: Any, path: YamlPath) -> ServerNamesRule:
    if not isinstance(node, list):
        raise path.error(f"expected a list of server names, got {type(node).__name__}")
    names = [_pattern(item, path.index(i)) for i, item in enumerate(node)]
    return ServerNamesRule(
        exact=frozenset(n for n in names if not n.startswith("*")),
        one_label=tuple(n[1:] for n in names if n.startswith("*.")),
        any_labels=tuple(n[2:] for n in names if n.startswith("**.")),
        text=tuple(dict.fromkeys(names)),
    )


KIND = register(
    L7Kind[TlsClientHello, ServerNamesRule](
        key="serverNames",
        parser="tls",
        request_types=(TlsClientHello,),
        compile=compile_rule,
        port_field=True,
    )
)
