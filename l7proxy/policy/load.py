"""YAML -> model. All validation lives here.

A bad document raises ``PolicyError`` naming the file, the YAML path and the
reason; nothing half-loaded ever reaches the engine.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from l7proxy.policy import rules as l7rules
from l7proxy.policy.errors import PolicyError, YamlPath
from l7proxy.policy.model import (
    EGRESS,
    ENTITIES,
    INGRESS,
    CidrRule,
    L7RuleRef,
    LabelSelector,
    Peers,
    Policy,
    PortProtocol,
    PortRule,
    PortTls,
    Requirement,
    Rule,
    TlsContextRef,
)

AUDIT_ANNOTATION = "l7proxy.io/audit"
_SECTIONS = {
    "ingress": (INGRESS, False),
    "egress": (EGRESS, False),
    "ingressDeny": (INGRESS, True),
    "egressDeny": (EGRESS, True),
}
_PEER_KEYS = {
    INGRESS: ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"),
    EGRESS: ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities"),
}
# Cilium label sources that mean "a label of the endpoint"; reserved: is kept.
_LABEL_PREFIX = re.compile(r"^(k8s|any|container):")
_LABEL_KEY = re.compile(r"^(reserved:)?[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?$")


def load_paths(paths: Iterable[str | Path]) -> list[Policy]:
    """Load files and directories (``*.yaml``/``*.yml``, sorted). All or nothing."""
    policies: list[Policy] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
            )
        elif path.exists():
            files = [path]
        else:
            raise PolicyError("no such file or directory", file=str(path))
        for file in files:
            policies.extend(load_text(file.read_text(), source=str(file)))
    _check_unique(policies)
    return policies


def load_text(text: str, *, source: str = "<string>") -> list[Policy]:
    """Parse one YAML stream (one or more documents)."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", path=where, file=source
        ) from None
    policies: list[Policy] = []
    try:
        for i, doc in enumerate(documents):
            root = YamlPath() if len(documents) == 1 else YamlPath((f"document[{i}]",))
            policies.extend(_document(doc, root, source))
    except PolicyError as err:
        raise err.in_file(source) from None
    return policies


def load_document(doc: Any, *, source: str) -> list[Policy]:
    """One document already parsed (an object read from the Kubernetes API)."""
    try:
        return _document(doc, YamlPath(), source)
    except PolicyError as err:
        raise err.in_file(source) from None


def _check_unique(policies: list[Policy]) -> None:
    seen: dict[str, str] = {}
    for p in policies:
        if p.key in seen:
            raise PolicyError(
                f"duplicate policy name {p.key!r} (also in {seen[p.key]})",
                path="metadata.name",
                file=p.source,
            )
        seen[p.key] = p.source


# --------------------------------------------------------------------------
# Walking helpers


def _mapping(node: Any, path: YamlPath, allowed: Iterable[str]) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise path.error(f"expected a mapping, got {_kind(node)}")
    allowed = tuple(allowed)
    for key in node:
        if key not in allowed:
            raise path.key(str(key)).error(f"unknown field (expected one of: {', '.join(allowed)})")
    return node


def _list(node: Any, path: YamlPath) -> list[Any]:
    if node is None:
        return []
    if not isinstance(node, list):
        raise path.error(f"expected a list, got {_kind(node)}")
    return node


def _string(node: Any, path: YamlPath, *, allow_empty: bool = False) -> str:
    if isinstance(node, bool) or not isinstance(node, (str, int, float)):
        raise path.error(f"expected a string, got {_kind(node)}")
    text = str(node)
    if not text and not allow_empty:
        raise path.error("must not be empty")
    return text


def _kind(node: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(
        type(node), type(node).__name__
    )


# --------------------------------------------------------------------------
# Documents


def _document(doc: Any, path: YamlPath, source: str) -> list[Policy]:
    doc = _mapping(doc, path, ("apiVersion", "kind", "metadata", "spec", "specs", "status"))
    api = doc.get("apiVersion")
    if api != "cilium.io/v2":
        raise path.key("apiVersion").error(f"expected cilium.io/v2, got {api!r}")
    kind = doc.get("kind")
    if kind not in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
        raise path.key("kind").error(
            f"expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy, got {kind!r}"
        )
    meta = _mapping(
        doc.get("metadata"), path.key("metadata"), ("name", "namespace", "labels", "annotations")
    )
    name = _string(meta.get("name"), path.key("metadata").key("name"))
    namespace = "" if kind == "CiliumClusterwideNetworkPolicy" else str(meta.get("namespace") or "")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise path.key("metadata").key("annotations").error("expected a mapping")
    audit_value = str(annotations.get(AUDIT_ANNOTATION, "false")).lower()
    if audit_value not in ("true", "false"):
        raise (
            path.key("metadata")
            .key("annotations")
            .key(AUDIT_ANNOTATION)
            .error('expected "true" or "false"')
        )
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise path.key("metadata").key("labels").error("expected a mapping")

    if ("spec" in doc) == ("specs" in doc):
        raise path.error("exactly one of spec or specs is required")
    if "spec" in doc:
        specs = [(doc["spec"], path.key("spec"))]
    else:
        specs = [
            (s, path.key("specs").index(i))
            for i, s in enumerate(_list(doc["specs"], path.key("specs")))
        ]
    out = []
    for i, (spec, spec_path) in enumerate(specs):
        selector, rules = _spec(spec, spec_path, namespace or DEFAULT_SECRET_NAMESPACE)
        out.append(
            Policy(
                name=name if len(specs) == 1 else f"{name}#{i}",
                namespace=namespace,
                selector=selector,
                rules=rules,
                source=source,
                audit=audit_value == "true",
                labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
            )
        )
    return out


def _spec(spec: Any, path: YamlPath, namespace: str) -> tuple[LabelSelector, tuple[Rule, ...]]:
    spec = _mapping(
        spec, path, ("endpointSelector", "nodeSelector", "description", "labels", *_SECTIONS)
    )
    if "nodeSelector" in spec:
        raise path.key("nodeSelector").error(
            "host policies (nodeSelector) are not supported; use endpointSelector"
        )
    if "endpointSelector" not in spec:
        raise path.error("endpointSelector is required")
    selector = _selector(spec["endpointSelector"], path.key("endpointSelector"))
    rules: list[Rule] = []
    for section, (direction, deny) in _SECTIONS.items():
        if section not in spec:
            continue
        section_path = path.key(section)
        for i, node in enumerate(_list(spec[section], section_path)):
            rules.append(_rule(node, section_path.index(i), direction, deny, namespace))
        if not spec[section]:
            # `ingress: []` still turns on default-deny in that direction.
            rules.append(Rule(direction, deny, Peers(), (), str(section_path)))
    return selector, tuple(rules)


def _selector(node: Any, path: YamlPath) -> LabelSelector:
    if node is None:
        return LabelSelector()
    node = _mapping(node, path, ("matchLabels", "matchExpressions"))
    labels = node.get("matchLabels")
    labels = {} if labels is None else labels
    if not isinstance(labels, dict):
        raise path.key("matchLabels").error("expected a mapping")
    match_labels = tuple(
        sorted(
            (
                _label_key(k, path.key("matchLabels").key(str(k))),
                _string(v, path.key("matchLabels").key(str(k)), allow_empty=True),
            )
            for k, v in labels.items()
        )
    )
    requirements = []
    for i, expr in enumerate(_list(node.get("matchExpressions"), path.key("matchExpressions"))):
        epath = path.key("matchExpressions").index(i)
        expr = _mapping(expr, epath, ("key", "operator", "values"))
        key = _label_key(expr.get("key"), epath.key("key"))
        op = expr.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise epath.key("operator").error(
                f"expected In, NotIn, Exists or DoesNotExist, got {op!r}"
            )
        values = [
            _string(v, epath.key("values").index(j), allow_empty=True)
            for j, v in enumerate(_list(expr.get("values"), epath.key("values")))
        ]
        if op in ("In", "NotIn") and not values:
            raise epath.key("values").error(f"{op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise epath.key("values").error(f"{op} takes no values")
        requirements.append(Requirement(key, op, frozenset(values)))
    return LabelSelector(match_labels, tuple(requirements))


def _label_key(key: Any, path: YamlPath) -> str:
    key = _string(key, path)
    bare = _LABEL_PREFIX.sub("", key)
    if not _LABEL_KEY.match(bare):
        raise path.error(f"invalid label key {key!r}")
    return bare


def _rule(node: Any, path: YamlPath, direction: str, deny: bool, namespace: str) -> Rule:
    peer_keys = _PEER_KEYS[direction]
    node = _mapping(node, path, (*peer_keys, "toPorts"))
    peers = _peers(node, path, peer_keys)
    to_ports = tuple(
        _port_rule(p, path.key("toPorts").index(i), deny, namespace)
        for i, p in enumerate(_list(node.get("toPorts"), path.key("toPorts")))
    )
    return Rule(direction, deny, peers, to_ports, str(path))


def _peers(node: dict[str, Any], path: YamlPath, keys: tuple[str, ...]) -> Peers:
    k_endpoints, k_cidr, k_cidrset, k_entities = keys
    endpoints = tuple(
        _selector(s, path.key(k_endpoints).index(i))
        for i, s in enumerate(_list(node.get(k_endpoints), path.key(k_endpoints)))
    )
    cidrs = [
        CidrRule(_network(c, path.key(k_cidr).index(i)))
        for i, c in enumerate(_list(node.get(k_cidr), path.key(k_cidr)))
    ]
    for i, item in enumerate(_list(node.get(k_cidrset), path.key(k_cidrset))):
        ipath = path.key(k_cidrset).index(i)
        item = _mapping(item, ipath, ("cidr", "except"))
        net = _network(item.get("cidr"), ipath.key("cidr"))
        excepts = tuple(
            _network(e, ipath.key("except").index(j))
            for j, e in enumerate(_list(item.get("except"), ipath.key("except")))
        )
        for j, ex in enumerate(excepts):
            if not ex.subnet_of(net):
                raise ipath.key("except").index(j).error(f"{ex} is not inside {net}")
        cidrs.append(CidrRule(net, excepts))
    entities = []
    for i, e in enumerate(_list(node.get(k_entities), path.key(k_entities))):
        e = _string(e, path.key(k_entities).index(i))
        if e not in ENTITIES:
            raise (
                path.key(k_entities)
                .index(i)
                .error(f"unsupported entity {e!r} (expected one of: {', '.join(ENTITIES)})")
            )
        entities.append(e)
    return Peers(endpoints, tuple(cidrs), tuple(entities))


def _network(node: Any, path: YamlPath) -> ipaddress.IPv4Network:
    text = _string(node, path)
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise path.error(f"invalid CIDR {text!r}") from None
    if net.version != 4:
        raise path.error("only IPv4 CIDRs are supported")
    return net


# Cilium's TLS contexts: what the proxy speaks to the client and to the server.
_TLS_KEYS = ("terminatingTLS", "originatingTLS")
# A secret named without a namespace, in a policy without one (a clusterwide one).
DEFAULT_SECRET_NAMESPACE = "default"
_SECRET_PART = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a DNS-1123 subdomain
_SECRET_ITEM = re.compile(r"^[-._a-zA-Z0-9]+$")  # a Secret data key


def _port_rule(node: Any, path: YamlPath, deny: bool, namespace: str) -> PortRule:
    port_kinds = {k: v for k, v in l7rules.all_kinds().items() if v.port_field}
    node = _mapping(node, path, ("ports", "rules", *port_kinds, *_TLS_KEYS))
    ports = tuple(
        _port(p, path.key("ports").index(i))
        for i, p in enumerate(_list(node.get("ports"), path.key("ports")))
    )
    parser, l7 = _l7_rules(node.get("rules"), path.key("rules"))
    tls = _port_tls(node, path, deny, namespace)
    where, what = path.key("rules"), "L7 rules"
    for key, kind in port_kinds.items():
        # An empty list is no restriction, as in Cilium ("if not empty").
        if node.get(key) in (None, []):
            continue
        if tls is not None:
            # Judged on the ClientHello before the handshake; the rules judge the
            # cleartext after it. Each rule judges only its own request type.
            if not l7:
                raise path.key("rules").error(
                    f"with {key} on a terminated port, the rules for the cleartext must be "
                    "written out (`http: [{}]` allows all of HTTP): an empty list would "
                    "leave the cleartext to serverNames, which does not judge it"
                )
            ref = L7RuleRef(kind, kind.compile(node[key], path.key(key)), str(path.key(key)))
            l7 = (*l7, ref)
            tls = PortTls(tls.terminating, tls.originating, server_names=True)
            continue
        if parser is not None:
            raise path.key(key).error(
                f"{key} and rules.{l7[0].kind.key if l7 else parser} on one port: those "
                "rules would judge what TLS encrypts; terminate it with terminatingTLS "
                "(and no serverNames) to judge them"
            )
        where, what = path.key(key), key
        parser = kind.parser
        l7 = (L7RuleRef(kind, kind.compile(node[key], where), str(where)),)
    if tls is not None and parser is None:
        raise path.key("rules").error(
            "terminatingTLS/originatingTLS need L7 rules that name the protocol inside "
            "the TLS (rules.http, rules.kafka, rules.grpc or l7proto; `http: [{}]` "
            "allows all of HTTP)"
        )
    if parser and not ports:
        raise where.error(f"{what} need toPorts[].ports")
    if parser and any(p.port == 0 or p.end_port != p.port or p.protocol == "UDP" for p in ports):
        raise path.key("ports").error(
            f"{what} apply to single TCP ports only (no port 0, endPort or UDP)"
        )
    return PortRule(ports, parser, l7, str(path), tls)


def _port_tls(node: dict[str, Any], path: YamlPath, deny: bool, namespace: str) -> PortTls | None:
    """``terminatingTLS`` / ``originatingTLS``: the secret each names, checked for
    shape here; its files are read when the proxy loads the policy."""
    terminating, originating = (
        _tls_context(node[key], path.key(key), namespace) if key in node else None
        for key in _TLS_KEYS
    )
    if terminating is None and originating is None:
        return None
    if deny:
        key = "terminatingTLS" if terminating is not None else "originatingTLS"
        raise path.key(key).error("a deny rule refuses traffic; it has no TLS to speak")
    if terminating is None:
        raise path.key("originatingTLS").error(
            "originatingTLS needs terminatingTLS: the proxy can only judge and re-encrypt "
            "what it has decrypted"
        )
    return PortTls(terminating, originating)


def _tls_context(node: Any, path: YamlPath, namespace: str) -> TlsContextRef:
    node = _mapping(node, path, ("secret", "certificate", "privateKey", "trustedCA"))
    if "secret" not in node:
        raise path.key("secret").error("required: {name: ..., namespace: ...}")
    secret = _mapping(node["secret"], path.key("secret"), ("name", "namespace"))
    parts = []
    for key, default in (("namespace", namespace), ("name", None)):
        value = secret.get(key, default)
        where = path.key("secret").key(key)
        value = _string(value, where)
        if not _SECRET_PART.match(value) or len(value) > 253:
            raise where.error(
                f"{value!r} is not a Kubernetes object name (lower-case letters, digits, "
                "'-' and '.')"
            )
        parts.append(value)
    items: list[str | None] = []
    for key in ("certificate", "privateKey", "trustedCA"):
        if key not in node:
            items.append(None)
            continue
        value = _string(node[key], path.key(key))
        if not _SECRET_ITEM.match(value) or value in (".", ".."):
            raise path.key(key).error(
                f"{value!r} is not an item of a secret (letters, digits, '-', '_' and '.')"
            )
        items.append(value)
    return TlsContextRef(parts[0], parts[1], items[0], items[1], items[2], str(path))


def _port(node: Any, path: YamlPath) -> PortProtocol:
    node = _mapping(node, path, ("port", "endPort", "protocol"))
    raw = node.get("port", 0)
    try:
        port = int(str(raw))
    except ValueError:
        raise path.key("port").error(
            f"expected a port number, got {raw!r} (named ports are not supported)"
        ) from None
    if not 0 <= port <= 65535:
        raise path.key("port").error(f"port {port} out of range 0-65535")
    end = node.get("endPort", port)
    if (
        isinstance(end, bool)
        or not isinstance(end, int)
        or not port <= end <= 65535
        or (end != port and port == 0)
    ):
        raise path.key("endPort").error(
            f"endPort must be an integer between port ({port}) and 65535"
        )
    proto = str(node.get("protocol", "ANY")).upper()
    if proto not in ("TCP", "UDP", "ANY"):
        raise path.key("protocol").error(f"expected TCP, UDP or ANY, got {node.get('protocol')!r}")
    return PortProtocol(port, end, proto)


def _l7_rules(node: Any, path: YamlPath) -> tuple[str | None, tuple[L7RuleRef, ...]]:
    """Returns (parser family, compiled rules) for a ``rules:`` block."""
    if node is None:
        return None, ()
    kinds = l7rules.all_kinds()
    specific = [k for k, v in kinds.items() if not v.generic and not v.port_field]
    node = _mapping(node, path, (*specific, "l7proto", "l7"))
    refs: list[L7RuleRef] = []
    parsers: set[str] = set()
    for key in specific:
        if key in node:
            kind = kinds[key]
            parsers.add(kind.parser)
            for i, item in enumerate(_list(node[key], path.key(key))):
                refs.append(
                    L7RuleRef(
                        kind,
                        kind.compile(item, path.key(key).index(i)),
                        str(path.key(key).index(i)),
                    )
                )
    if "l7proto" in node or "l7" in node:
        proto = _string(node.get("l7proto"), path.key("l7proto")) if "l7proto" in node else ""
        generic_kind = kinds.get(proto)
        if generic_kind is None or not generic_kind.generic:
            generic = sorted(k for k, v in kinds.items() if v.generic)
            raise path.key("l7proto").error(
                f"unknown L7 protocol {proto!r} (known: {', '.join(generic) or 'none'})"
            )
        parsers.add(generic_kind.parser)
        for i, item in enumerate(_list(node.get("l7"), path.key("l7"))):
            where = path.key("l7").index(i)
            refs.append(L7RuleRef(generic_kind, generic_kind.compile(item, where), str(where)))
    if len(parsers) > 1:
        raise path.error(
            f"rules for different L7 protocols on one port: {', '.join(sorted(parsers))}"
        )
    if not parsers:
        return None, ()
    return parsers.pop(), tuple(refs)
