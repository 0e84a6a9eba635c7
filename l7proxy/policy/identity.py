"""Security identities, allocated as Cilium does.

A numeric identity stands for a set of labels. Reserved identities have
fixed numbers; endpoint identities are allocated from 256 up, one per
distinct label set; CIDR identities are node-local, from 1<<24 up, one per
prefix that a policy names. The allocator is plain data so that the agent can
persist it and find the same numbers after a restart.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HOST = 1
WORLD = 2
RESERVED = {HOST: "host", WORLD: "world"}
FIRST_ENDPOINT_IDENTITY = 256
FIRST_CIDR_IDENTITY = 1 << 24

Labels = Mapping[str, str]


def labels_key(labels: Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> dict. Raises ValueError with the offending item."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True, slots=True)
class Identity:
    number: int
    labels: tuple[tuple[str, str], ...]
    kind: str  # reserved | endpoint | cidr
    cidr: ipaddress.IPv4Network | None = None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def __str__(self) -> str:
        if self.kind == "reserved":
            return f"{self.number} (reserved:{RESERVED[self.number]})"
        if self.kind == "cidr":
            return f"{self.number} (cidr:{self.cidr})"
        return f"{self.number} ({labels_key(self.label_map)})"


RESERVED_IDENTITIES = {
    HOST: Identity(HOST, (("reserved:host", ""),), "reserved"),
    WORLD: Identity(
        WORLD, (("reserved:world", ""),), "reserved", ipaddress.IPv4Network("0.0.0.0/0")
    ),
}


class IdentityAllocator:
    """Label set -> number, stable across restarts via ``snapshot``/``restore``."""

    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}
        self._by_number: dict[int, Identity] = dict(RESERVED_IDENTITIES)
        self._cidr: dict[ipaddress.IPv4Network, int] = {}

    def for_labels(self, labels: Labels) -> Identity:
        key = labels_key(labels)
        number = self._by_key.get(key)
        if number is None:
            number = (
                max(
                    [
                        n
                        for n in self._by_number
                        if FIRST_ENDPOINT_IDENTITY <= n < FIRST_CIDR_IDENTITY
                    ],
                    default=FIRST_ENDPOINT_IDENTITY - 1,
                )
                + 1
            )
            self._by_key[key] = number
            self._by_number[number] = Identity(number, tuple(sorted(labels.items())), "endpoint")
        return self._by_number[number]

    def for_cidr(self, net: ipaddress.IPv4Network) -> Identity:
        if net.prefixlen == 0:
            return RESERVED_IDENTITIES[WORLD]
        number = self._cidr.get(net)
        if number is None:
            number = max(self._cidr.values(), default=FIRST_CIDR_IDENTITY - 1) + 1
            self._cidr[net] = number
            self._by_number[number] = Identity(number, ((f"cidr:{net}", ""),), "cidr", net)
        return self._by_number[number]

    def release_unused(self, keep: Iterable[int]) -> None:
        keep = set(keep)
        for number, ident in list(self._by_number.items()):
            if ident.kind != "reserved" and number not in keep:
                del self._by_number[number]
                if ident.cidr is not None:
                    self._cidr.pop(ident.cidr, None)
                else:
                    self._by_key.pop(labels_key(ident.label_map), None)

    def get(self, number: int) -> Identity | None:
        return self._by_number.get(number)

    def all(self) -> list[Identity]:
        return sorted(self._by_number.values(), key=lambda i: i.number)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "number": i.number,
                "kind": i.kind,
                "labels": dict(i.labels),
                "cidr": str(i.cidr) if i.cidr else None,
            }
            for i in self.all()
            if i.kind != "reserved"
        ]

    def restore(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if item["kind"] == "cidr":
                net = ipaddress.IPv4Network(item["cidr"])
                self._cidr[net] = item["number"]
                self._by_number[item["number"]] = Identity(
                    item["number"], ((f"cidr:{net}", ""),), "cidr", net
                )
            else:
                labels = item["labels"]
                self._by_key[labels_key(labels)] = item["number"]
                self._by_number[item["number"]] = Identity(
                    item["number"], tuple(sorted(labels.items())), "endpoint"
                )


class IpCache:
    """Longest-prefix match of an IPv4 address to an identity number (user-space
    mirror of the kernel's LPM map). Cost: one dict lookup per distinct prefix length."""

    def __init__(self, prefixes: Mapping[ipaddress.IPv4Network, int]):
        self.prefixes = dict(prefixes)
        by_len: dict[int, dict[int, int]] = {}
        for net, ident in self.prefixes.items():
            by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = ident
        self._levels = sorted(
            (
                (plen, (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, table)
                for plen, table in by_len.items()
            ),
            reverse=True,
        )

    def lookup(self, ip: str | ipaddress.IPv4Address) -> int:
        if isinstance(ip, ipaddress.IPv4Address):
            value = int(ip)
        else:
            # inet_pton takes only the strict dotted quad, as IPv4Address does, at a
            # tenth of its cost: this runs for every accepted connection.
            try:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
            except OSError:
                return WORLD
        for _plen, mask, table in self._levels:
            hit = table.get(value & mask)
            if hit is not None:
                return hit
        return WORLD
