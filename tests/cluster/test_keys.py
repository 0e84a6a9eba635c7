"""Cilium's kvstore layout and encodings, without etcd."""

from __future__ import annotations

import json

import pytest

from l7proxy.cluster.keys import (
    FIRST_CLUSTER_IDENTITY,
    LAST_CLUSTER_IDENTITY,
    EncodingError,
    IpEntry,
    Layout,
    NodeInfo,
    decode_labels,
    encode_labels,
    prefix_end,
)
from l7proxy.policy.identity import FIRST_CIDR_IDENTITY, RESERVED


def test_the_layout_is_ciliums_under_the_prefix() -> None:
    layout = Layout("cilium/state", "c1")
    labels = encode_labels({"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default"})
    assert labels == "k8s:app=web;k8s:io.kubernetes.pod.namespace=default;"
    assert layout.id_key(300) == b"cilium/state/identities/v1/id/300"
    assert layout.ref_key(labels, "node-1") == (
        b"cilium/state/identities/v1/value/"
        b"k8s:app=web;k8s:io.kubernetes.pod.namespace=default;/node-1"
    )
    assert layout.ip_key("10.0.1.5") == b"cilium/state/ip/v1/c1/10.0.1.5"
    assert layout.node_key("node-1") == b"cilium/state/nodes/v1/c1/node-1"


def test_keys_parse_back() -> None:
    layout = Layout("p/state")
    assert layout.number_of(layout.id_key(4711)) == 4711
    assert layout.number_of(layout.ids + b"x") is None
    assert layout.split_ref(layout.ref_key("a/b=c;", "n1")) == ("a/b=c;", "n1")
    assert layout.ip_of(layout.ip_key("10.1.2.3")) == "10.1.2.3"
    assert layout.node_of(layout.node_key("n1")) == "n1"


def test_one_label_sets_references_are_not_a_prefix_of_anothers() -> None:
    layout = Layout()
    a = layout.refs_prefix(encode_labels({"app": "web"}))
    b = layout.refs_prefix(encode_labels({"app": "web", "tier": "x"}))
    assert not b.startswith(a) and not a.startswith(b)


@pytest.mark.parametrize(
    "labels", [{"": "x"}, {"/a": "x"}, {"a=b": "x"}, {"a;": "x"}, {"a": "x;y"}]
)
def test_labels_that_cannot_be_stored_are_refused(labels: dict[str, str]) -> None:
    with pytest.raises(EncodingError):
        encode_labels(labels)


def test_labels_round_trip() -> None:
    labels = {"k8s:app.kubernetes.io/name": "web", "reserved:host": "", "org": "empire"}
    assert decode_labels(encode_labels(labels)) == labels


def test_names_with_a_slash_are_refused() -> None:
    with pytest.raises(EncodingError):
        Layout(cluster="a/b")
    with pytest.raises(EncodingError):
        Layout().node_key("a/b")


def test_ipcache_value_is_ciliums_ip_identity_pair() -> None:
    entry = IpEntry("10.0.1.5", 300, "192.168.0.1", "node-1", "default", "web-0")
    doc = json.loads(entry.to_json())
    assert doc == {
        "IP": "10.0.1.5",
        "Mask": None,
        "HostIP": "192.168.0.1",
        "ID": 300,
        "Key": 0,
        "Metadata": "",
        "NodeName": "node-1",
        "K8sNamespace": "default",
        "K8sPodName": "web-0",
    }
    assert IpEntry.from_json(entry.to_json()) == entry
    # what a Cilium agent writes (no NodeName) decodes too
    cilium = b'{"IP":"10.11.0.7","Mask":null,"HostIP":"10.0.2.15","ID":4711,"Key":0,"Metadata":""}'
    assert IpEntry.from_json(cilium) == IpEntry("10.11.0.7", 4711, "10.0.2.15")


def test_node_value_is_ciliums_node() -> None:
    node = NodeInfo("runtime1", "default", ("10.0.2.15",), "10.11.0.0/16")
    doc = json.loads(node.to_json())
    assert doc["IPAddresses"] == [{"Type": "InternalIP", "IP": "10.0.2.15"}]
    assert doc["IPv4AllocCIDR"] == {"IP": "10.11.0.0", "Mask": "//8AAA=="}  # as in Cilium's docs
    assert NodeInfo.from_json(node.to_json()) == node


@pytest.mark.parametrize("raw", [b"", b"{}", b'{"IP":"nope","ID":1}', b'{"IP":"10.0.0.1"}'])
def test_bad_ipcache_values_are_typed_errors(raw: bytes) -> None:
    with pytest.raises(EncodingError):
        IpEntry.from_json(raw)


def test_identity_ranges_are_disjoint() -> None:
    assert max(RESERVED) < FIRST_CLUSTER_IDENTITY == 256
    assert LAST_CLUSTER_IDENTITY == 65535 < FIRST_CIDR_IDENTITY


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"
