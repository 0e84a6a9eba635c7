"""Cilium's kvstore layout, and the encodings of what its keys hold.

Pure data: no I/O. Under a prefix (``cilium/state`` by default):

    identities/v1/id/<N>                  -> labels, Cilium's ``source:key=value;`` form
    identities/v1/value/<labels>/<node>   -> N (decimal), on the node's lease
    ip/v1/<cluster>/<ip>                  -> IPIdentityPair JSON, on the node's lease
    nodes/v1/<cluster>/<node>             -> node.Node JSON, on the node's lease

The label encoding is Cilium's ``labels.SortedList()``: each label as
``key=value;``, sorted by key. Our label keys carry their source when they
have one (``k8s:app``, ``reserved:host``), so the string is the same one a
Cilium agent would write for the same labels.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from l7proxy.policy.identity import FIRST_CIDR_IDENTITY, FIRST_ENDPOINT_IDENTITY, RESERVED

# Cluster-wide identities: Cilium's range for cluster 0. Reserved identities
# (1, 2) lie below it and CIDR identities (node-local) above it.
FIRST_CLUSTER_IDENTITY = FIRST_ENDPOINT_IDENTITY  # 256
LAST_CLUSTER_IDENTITY = 65535
assert max(RESERVED) < FIRST_CLUSTER_IDENTITY
assert LAST_CLUSTER_IDENTITY < FIRST_CIDR_IDENTITY

DEFAULT_PREFIX = "cilium/state"
DEFAULT_CLUSTER = "default"


class EncodingError(ValueError):
    """A label set, name or stored value that the layout cannot hold."""


# --------------------------------------------------------------------- labels


def encode_labels(labels: Mapping[str, str]) -> str:
    """``{"k8s:app": "web"}`` -> ``"k8s:app=web;"`` (sorted, Cilium's SortedList)."""
    parts = []
    for key, value in sorted(labels.items()):
        if not key or key.startswith("/") or any(c in key for c in "=;\x00"):
            raise EncodingError(f"label key {key!r} cannot be stored (empty, '/', '=' or ';')")
        if any(c in value for c in ";\x00"):
            raise EncodingError(f"label value {value!r} of {key!r} cannot hold ';'")
        parts.append(f"{key}={value};")
    return "".join(parts)


def decode_labels(text: str) -> dict[str, str]:
    """The inverse of :func:`encode_labels`."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EncodingError(f"stored label {item!r} is not key=value")
        out[key] = value
    return out


# Sources that mean "a label of the endpoint" (policy/load.py strips the same from
# selectors); Kubernetes label keys hold no ':', so a key with one has a source.
K8S_SOURCE = "k8s:"
ENDPOINT_SOURCES = ("k8s:", "any:", "container:")


def with_source(labels: Mapping[str, str]) -> dict[str, str]:
    """An endpoint's labels as a Cilium agent stores them: ``app`` -> ``k8s:app``
    (labels that already name a source, ``reserved:host``, are kept)."""
    return {(k if ":" in k else K8S_SOURCE + k): v for k, v in labels.items()}


def without_source(labels: Mapping[str, str]) -> dict[str, str]:
    """The inverse of :func:`with_source`: what selectors match (``k8s:app`` -> ``app``)."""
    out = {}
    for key, value in labels.items():
        for source in ENDPOINT_SOURCES:
            if key.startswith(source):
                key = key[len(source) :]
                break
        out[key] = value
    return out


# --------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class IpEntry:
    """One ipcache entry: Cilium's ``identity.IPIdentityPair``.

    ``node`` is l7proxy's own field (``NodeName``), which a Cilium decoder
    ignores; the rest are Cilium's fields, spelled as Cilium spells them.
    """

    ip: str
    identity: int
    host_ip: str = ""
    node: str = ""
    namespace: str = ""
    pod: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "IP": self.ip,
            "Mask": None,
            "HostIP": self.host_ip or None,
            "ID": self.identity,
            "Key": 0,
            "Metadata": "",
            "NodeName": self.node,
        }
        if self.namespace:
            doc["K8sNamespace"] = self.namespace
        if self.pod:
            doc["K8sPodName"] = self.pod
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> IpEntry:
        try:
            doc = json.loads(raw)
            return cls(
                ip=str(ipaddress.ip_address(doc["IP"])),
                identity=int(doc["ID"]),
                host_ip=str(doc.get("HostIP") or ""),
                node=str(doc.get("NodeName") or ""),
                namespace=str(doc.get("K8sNamespace") or ""),
                pod=str(doc.get("K8sPodName") or ""),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise EncodingError(f"ipcache value {raw[:200]!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node: the fields of Cilium's ``node.Node`` that l7proxy uses."""

    name: str
    cluster: str
    ips: tuple[str, ...] = ()
    alloc_cidr: str = ""  # the node's pod CIDR, e.g. "10.11.0.0/16"
    labels: tuple[tuple[str, str], ...] = field(default=())

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "Name": self.name,
            "Cluster": self.cluster,
            "IPAddresses": [{"Type": "InternalIP", "IP": ip} for ip in self.ips],
            "IPv4AllocCIDR": _cidr_json(self.alloc_cidr),
            "ClusterID": 0,
            "Labels": dict(self.labels),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeInfo:
        try:
            doc = json.loads(raw)
            cidr = doc.get("IPv4AllocCIDR")
            alloc = ""
            if cidr:
                mask = base64.b64decode(cidr["Mask"])
                bits = sum(bin(b).count("1") for b in mask)
                alloc = str(ipaddress.ip_network(f"{cidr['IP']}/{bits}", strict=False))
            return cls(
                name=str(doc["Name"]),
                cluster=str(doc.get("Cluster") or ""),
                ips=tuple(str(a["IP"]) for a in doc.get("IPAddresses") or ()),
                alloc_cidr=alloc,
                labels=tuple(sorted((doc.get("Labels") or {}).items())),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise EncodingError(f"node value {raw[:200]!r}: {e}") from None


def _cidr_json(cidr: str) -> dict[str, str] | None:
    """Go's ``net.IPNet`` as JSON: the address and the mask's bytes in base64."""
    if not cidr:
        return None
    net = ipaddress.ip_network(cidr, strict=False)
    return {
        "IP": str(net.network_address),
        "Mask": base64.b64encode(net.netmask.packed).decode(),
    }


# --------------------------------------------------------------------- keys


def _name(kind: str, value: str) -> str:
    if not value or "/" in value or "\x00" in value:
        raise EncodingError(f"{kind} name {value!r} must be non-empty and hold no '/'")
    return value


@dataclass(frozen=True, slots=True)
class Layout:
    """Where every kind of key lives, under ``prefix`` for ``cluster``."""

    prefix: str = DEFAULT_PREFIX
    cluster: str = DEFAULT_CLUSTER

    def __post_init__(self) -> None:
        _name("cluster", self.cluster)
        if not self.prefix or self.prefix.endswith("/") or self.prefix.startswith("/"):
            raise EncodingError(f"prefix {self.prefix!r} must not start or end with '/'")

    # identities
    @property
    def ids(self) -> bytes:
        return f"{self.prefix}/identities/v1/id/".encode()

    @property
    def values(self) -> bytes:
        return f"{self.prefix}/identities/v1/value/".encode()

    def id_key(self, number: int) -> bytes:
        return self.ids + str(number).encode()

    def refs_prefix(self, label_key: str) -> bytes:
        """Every node's reference to one label set: ``value/<labels>/``."""
        return self.values + label_key.encode() + b"/"

    def ref_key(self, label_key: str, node: str) -> bytes:
        return self.refs_prefix(label_key) + _name("node", node).encode()

    def number_of(self, id_key: bytes) -> int | None:
        """``…/id/300`` -> 300; None for anything else under the prefix."""
        tail = id_key[len(self.ids) :]
        if not id_key.startswith(self.ids) or not tail.isdigit():
            return None
        return int(tail)

    def split_ref(self, ref_key: bytes) -> tuple[str, str] | None:
        """``…/value/<labels>/<node>`` -> (labels, node)."""
        if not ref_key.startswith(self.values):
            return None
        label_key, sep, node = ref_key[len(self.values) :].decode().rpartition("/")
        return (label_key, node) if sep and node else None

    # ipcache
    @property
    def ips(self) -> bytes:
        return f"{self.prefix}/ip/v1/{self.cluster}/".encode()

    def ip_key(self, ip: str) -> bytes:
        return self.ips + str(ipaddress.ip_address(ip)).encode()

    def ip_of(self, key: bytes) -> str | None:
        return key[len(self.ips) :].decode() if key.startswith(self.ips) else None

    # nodes
    @property
    def nodes(self) -> bytes:
        return f"{self.prefix}/nodes/v1/{self.cluster}/".encode()

    def node_key(self, node: str) -> bytes:
        return self.nodes + _name("node", node).encode()

    def node_of(self, key: bytes) -> str | None:
        return key[len(self.nodes) :].decode() if key.startswith(self.nodes) else None


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes ``[prefix, end)`` every key with ``prefix``."""
    b = bytearray(prefix)
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\x00"  # all keys
