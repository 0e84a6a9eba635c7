"""The kernel datapath: loads bpf/sockmap.c with bcc, attaches it at tc on
endpoint veths with pyroute2, and keeps its maps equal to the desired state.

This is the only module that imports bcc. See docs/datapath.md for the maps,
the per-packet path and the verdict precedence.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from l7proxy.datapath import bpfsys
from l7proxy.policy.engine import PolicyEntry
from l7proxy.policy.identity import WORLD

# The C program ships inside the package (a link to the top-level bpf/sockmap.c in a
# checkout, a copy in a wheel), so an installed agent finds it without a checkout.
BPF_SOURCE = Path(__file__).with_name("sockmap.c")

DIRECTIONS = {"ingress": 0, "egress": 1}
_DIRECTION_NAMES = {v: k for k, v in DIRECTIONS.items()}

# bpf/sockmap.c: policy_value.flags
POL_ALLOW, POL_DENY, POL_REDIRECT, POL_AUDIT_DENY = 1, 2, 4, 8
# endpoint_info.flags
EP_INGRESS_ENFORCED, EP_EGRESS_ENFORCED, EP_AUDIT = 1, 2, 4
POLICY_PREFIX_BASE = 96
PROXY_LISTENERS_MAX = 256  # bpf/sockmap.c proxy_listeners (bcc cannot open it to ask)

COUNTER_NAMES = (
    "allowed",
    "denied",
    "redirected",
    "audited",
    "ct_hits",
    "proxy_unavailable",
    "proxy_replies",
    "proxy_upstream",
    "revoked",
    "not_ip",
    "unsupported",
    "events_lost",
)
REASONS = {
    1: "policy-deny",
    2: "default-deny",
    3: "proxy-unavailable",
    4: "redirect-from-host",
    5: "proxy-reply-no-socket",
}

_TC_INGRESS = "ffff:fff2"
_TC_EGRESS = "ffff:fff3"
_TC_PRIO = 0xC1F  # our filters' priority on both hooks


@dataclass(frozen=True)
class EndpointInfo:
    endpoint_id: int
    ifindex: int
    ip: IPv4Address
    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    audit: bool = False

    def flags(self) -> int:
        return (
            (EP_INGRESS_ENFORCED if self.ingress_enforced else 0)
            | (EP_EGRESS_ENFORCED if self.egress_enforced else 0)
            | (EP_AUDIT if self.audit else 0)
        )


@dataclass(frozen=True)
class DropEvent:
    """A dropped (or, with audited=True, audited-and-passed) new flow."""

    time_ns: int
    src_ip: IPv4Address
    src_port: int
    dst_ip: IPv4Address
    dst_port: int
    proto: int
    src_identity: int
    dst_identity: int
    endpoint_id: int
    direction: str
    reason: str
    audited: bool = False
    # Drops of this flow the event stands for: the kernel reports a flow at most
    # once per drop-report interval, with the count since its last report. An
    # event from the tail sweep (a flow that went quiet) has src_port 0.
    count: int = 1


# The fields that identify a flow for drop reporting (bpf/sockmap.c, drop_report_key).
DropFlow = tuple[int, int, int, int, int, int, int, int]


def _flow_of(fields: Any) -> DropFlow:
    """The flow of a drop event or a drop_reports key (both name the fields alike)."""
    f = fields
    return (f.saddr, f.daddr, f.dport, f.proto, f.reason, f.direction, f.audited, f.endpoint_id)


# --- policy compilation (pure; unit-tested without a kernel) ---------------

# (endpoint_id, direction number, identity, protocol, port, port prefix bits)
PolicyKey = tuple[int, int, int, int, int, int]
PolicyValue = tuple[int, int]  # (flags, proxy_port)


def port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """Split an inclusive port range into aligned prefix blocks (start, prefix bits)."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def _merge(entries: list[PolicyEntry]) -> PolicyValue:
    flags = 0
    proxy_ports = []
    for e in entries:
        if e.action == "deny":
            flags |= POL_AUDIT_DENY if e.audit else POL_DENY
        elif e.action == "redirect":
            flags |= POL_REDIRECT
            proxy_ports.append(e.proxy_port)
        else:
            flags |= POL_ALLOW
    # Two redirects to different proxy ports on one port: the lowest wins (deterministic).
    return flags, min(proxy_ports) if proxy_ports else 0


def compile_policy(entries: Iterable[PolicyEntry]) -> dict[PolicyKey, PolicyValue]:
    """Entries -> LPM keys. Within one (endpoint, direction, identity, protocol)
    group the port space is cut where any entry starts or ends, each piece gets
    the merged flags of every entry covering it, and equal neighbours are
    joined before splitting into prefix blocks: the kernel's longest-prefix
    match then finds exactly one block, already merged."""
    groups: dict[tuple[int, int, int, int], list[PolicyEntry]] = {}
    for e in entries:
        e.validate()
        groups.setdefault(
            (e.endpoint_id, DIRECTIONS[e.direction], e.identity, e.protocol), []
        ).append(e)
    out: dict[PolicyKey, PolicyValue] = {}
    for group, members in groups.items():
        cuts = sorted(
            {0, 65536} | {b for e in members for b in (e.port_range()[0], e.port_range()[1] + 1)}
        )
        pieces: list[tuple[int, int, PolicyValue]] = []
        for start, end in zip(cuts, cuts[1:], strict=False):
            covering = [
                e for e in members if e.port_range()[0] <= start and end - 1 <= e.port_range()[1]
            ]
            if not covering:
                continue
            value = _merge(covering)
            if pieces and pieces[-1][1] == start - 1 and pieces[-1][2] == value:
                pieces[-1] = (pieces[-1][0], end - 1, value)
            else:
                pieces.append((start, end - 1, value))
        for lo, hi, value in pieces:
            for start, bits in port_blocks(lo, hi):
                out[(*group, start, bits)] = value
    return out


# --- byte order helpers for map fields --------------------------------------


def _be32(ip: IPv4Address) -> int:
    """An address as the host-order u32 whose memory holds network order."""
    return int.from_bytes(IPv4Address(ip).packed, "little")


def _ip_from_be32(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _apply_diff(table, make_key, state: dict, desired: dict, what: str) -> bool:
    """Make a BPF map equal to `desired`, tracking it in `state`. Additions and
    changes go first so a key that is being replaced never vanishes for a
    moment; removals follow. A desired state larger than the map is refused
    before anything is written."""
    if len(desired) > table.max_entries:
        raise ValueError(f"{what}: {len(desired)} entries exceed the map's {table.max_entries}")
    stale = [k for k in state if k not in desired]
    if len(state) + sum(1 for k in desired if k not in state) > table.max_entries:
        for k in stale:  # no room for both: remove first
            with contextlib.suppress(KeyError):
                del table[make_key(k)]
            del state[k]
        stale = []
    changed = bool(stale)
    for k, value in desired.items():
        if state.get(k) != value:
            table[make_key(k)] = table.Leaf(*value)
            state[k] = value
            changed = True
    for k in stale:
        with contextlib.suppress(KeyError):
            del table[make_key(k)]
        del state[k]
    return changed


@dataclass
class _Attached:
    info: EndpointInfo
    hooks: list[str] = field(default_factory=list)  # parents of filters added


class Datapath:
    """Owns the BPF object, its maps and its tc attachments.

    `proxy_mark` is the SO_MARK the proxy puts on its upstream sockets;
    `redirect_mark` is what the datapath sets on packets it hands to a proxy
    socket, and is the mark to give netns.install_proxy_routing(). They must
    differ (a marked upstream connect would otherwise be routed locally).
    """

    def __init__(
        self,
        *,
        bpf_source: Path = BPF_SOURCE,
        proxy_mark: int,
        instance: str,
        redirect_mark: int | None = None,
        ct_size: int = 65536,
        pin_dir: Path | None = None,
        drop_report_interval: float = 1.0,
    ):
        self.bpf_source = Path(bpf_source)
        self.proxy_mark = proxy_mark
        self.redirect_mark = proxy_mark + 1 if redirect_mark is None else redirect_mark
        if not proxy_mark or self.redirect_mark == proxy_mark:
            raise ValueError("proxy_mark must be non-zero and differ from redirect_mark")
        self.instance = instance
        self.ct_size = ct_size
        # Maps pinned here survive this object: a restarted agent adopts them
        # (l7proxy/datapath/pins.py, docs/restarts.md). None: private maps.
        self.pin_dir = Path(pin_dir) if pin_dir is not None else None
        self._adopted: set[int] = set()  # endpoint ids found in pinned maps
        self._bpf: Any = None  # bcc's BPF object (bcc has no type hints)
        self._progs: dict[str, Any] = {}
        self._attached: dict[int, _Attached] = {}
        self._devices: dict[int, list[str]] = {}  # node devices: ifindex -> hooks added
        self._endpoints: dict[int, EndpointInfo] = {}
        self._ipcache_desired: dict[IPv4Network, int] = {}
        self._ipcache_state: dict[IPv4Network, tuple[int, int]] = {}
        self._policy_state: dict[PolicyKey, PolicyValue] = {}
        self._listeners: dict[int, int] = {}  # proxy port -> socket fd
        self._listener_fd = -1
        self._events: list[DropEvent] = []
        self.drop_report_interval = drop_report_interval
        # Per flow: drops already reported by the tail sweep, which the kernel's next
        # event for that flow includes again in its count.
        self._tail_reported: dict[DropFlow, int] = {}
        self._next_sweep_ns = 0
        self._revision = 0
        self._ct_fill: tuple[float, int, int] | None = None

    # --- lifecycle -------------------------------------------------------

    def load(self) -> None:
        """Compile and load the program (bcc, about a second)."""
        if self._bpf is not None:
            return
        from bcc import BPF
        from bcc.libbcc import lib

        cflags = [
            f"-DPROXY_MARK={self.proxy_mark:#x}",
            f"-DREDIRECT_MARK={self.redirect_mark:#x}",
            f"-DCT_SIZE={self.ct_size}",
            f"-DIDENTITY_WORLD={WORLD}",
            f"-DDROP_REPORT_INTERVAL_NS={int(self.drop_report_interval * 1e9)}ULL",
            "-w",
        ]
        if self.pin_dir is None:
            self._bpf = BPF(src_file=str(self.bpf_source).encode(), cflags=cflags)
        else:
            from l7proxy.datapath import pins

            self._bpf = pins.load_pinned(
                lambda extra: BPF(src_file=str(self.bpf_source).encode(), cflags=cflags + extra),
                self.pin_dir,
            )
        try:
            if self.pin_dir is not None:
                self._adopt()
            for name in ("from_endpoint", "to_endpoint", "from_netdev", "to_netdev"):
                self._progs[name] = self._bpf.load_func(name.encode(), BPF.SCHED_CLS)
            self._listener_fd = lib.bpf_table_fd(self._bpf.module, b"proxy_listeners")
            if self._listener_fd < 0:
                raise RuntimeError("proxy_listeners map has no fd")
            self._bpf[b"drop_events"].open_ring_buffer(self._on_event)
        except BaseException:
            bpf, self._bpf = self._bpf, None
            self._progs.clear()
            bpf.cleanup()
            raise

    def _require(self):
        if self._bpf is None:
            raise RuntimeError("Datapath.load() has not been called")
        return self._bpf

    def attach(self, info: EndpointInfo) -> None:
        """Fill the maps for the endpoint, then hook tc ingress and egress of its
        host-side veth (maps first: a hooked veth is never judged half-known)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._require()
        if info.endpoint_id in self._attached:
            self.detach(info.endpoint_id)
        self.set_endpoint(info)
        record = _Attached(info)
        self._attached[info.endpoint_id] = record
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", info.ifindex)
                record.hooks.append("clsact")  # ours: removed again on detach
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise
                if self._has_own_filters(ipr, info.ifindex):
                    # Left by an earlier run of this instance that did not
                    # detach (a crash): the clsact is ours and its filters are
                    # replaced below in place, without a gap.
                    record.hooks.append("clsact")
            for parent, prog in ((_TC_INGRESS, "from_endpoint"), (_TC_EGRESS, "to_endpoint")):
                fn = self._progs[prog]
                # A fixed priority and handle make "replace" swap the program atomically.
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    info.ifindex,
                    ":1",
                    fd=fn.fd,
                    name=f"l7p-{self.instance}-{prog}",
                    parent=parent,
                    classid=1,
                    prio=_TC_PRIO,
                    direct_action=True,
                )
                record.hooks.append(parent)

    def attach_device(self, ifindex: int) -> None:
        """Hook a node device (where other nodes' traffic arrives, cluster mode):
        ``from_netdev`` on its tc ingress, ``to_netdev`` on its egress. Idempotent."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._require()
        if ifindex in self._devices:
            return
        hooks: list[str] = []
        self._devices[ifindex] = hooks
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
                hooks.append("clsact")
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: someone else's clsact (or ours, left by a crash)
                    raise
                if self._has_own_filters(ipr, ifindex):
                    hooks.append("clsact")
            for parent, prog in ((_TC_INGRESS, "from_netdev"), (_TC_EGRESS, "to_netdev")):
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    ":1",
                    fd=self._progs[prog].fd,
                    name=f"l7p-{self.instance}-{prog}",
                    parent=parent,
                    classid=1,
                    prio=_TC_PRIO,
                    direct_action=True,
                )
                hooks.append(parent)

    def detach_device(self, ifindex: int) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        hooks = self._devices.pop(ifindex, None)
        if not hooks:
            return
        with IPRoute() as ipr:
            for hook in reversed(hooks):
                with contextlib.suppress(NetlinkError):
                    if hook == "clsact":
                        ipr.tc("del", "clsact", ifindex)
                    else:
                        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=hook, prio=_TC_PRIO)

    def _has_own_filters(self, ipr, ifindex: int) -> bool:
        prefix = f"l7p-{self.instance}-"
        for parent in (0xFFFFFFF2, 0xFFFFFFF3):
            for f in ipr.get_filters(index=ifindex, parent=parent):
                opts = f.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts else None
                if name and name.startswith(prefix):
                    return True
        return False

    def detach(self, endpoint_id: int) -> None:
        """Reverse of attach; tolerant of a veth that is already gone."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        record = self._attached.pop(endpoint_id, None)
        if record is not None:
            with IPRoute() as ipr:
                for hook in reversed(record.hooks):
                    with contextlib.suppress(NetlinkError):
                        if hook == "clsact":
                            ipr.tc("del", "clsact", record.info.ifindex)
                        else:
                            ipr.tc(
                                "del-filter",
                                "bpf",
                                record.info.ifindex,
                                ":1",
                                parent=hook,
                                prio=_TC_PRIO,
                            )
        if endpoint_id in self._endpoints and self._bpf is not None:
            self.remove_endpoint(endpoint_id)

    def close(self, keep: bool = False) -> None:
        """Detach everything in reverse order, unload and unpin. Idempotent.

        keep=True is a handover: programs stay attached and pinned maps (with
        the listener sockhash) stay as they are, for the successor to adopt."""
        if keep:
            if self._bpf is not None:
                bpf, self._bpf = self._bpf, None
                self._progs.clear()
                bpf.cleanup()
            self._attached.clear()
            self._devices.clear()
            self._listeners.clear()
            return
        for ifindex in reversed(list(self._devices)):
            with contextlib.suppress(Exception):
                self.detach_device(ifindex)
        for endpoint_id in reversed(list(self._attached)):
            with contextlib.suppress(Exception):
                self.detach(endpoint_id)
        if self._bpf is not None:
            for port in list(self._listeners):
                with contextlib.suppress(Exception):
                    self.unregister_proxy_listener(port)
            bpf, self._bpf = self._bpf, None
            self._progs.clear()
            bpf.cleanup()
        self._endpoints.clear()
        self._ipcache_state.clear()
        self._policy_state.clear()
        if self.pin_dir is not None:
            from l7proxy.datapath import pins

            pins.remove(self.pin_dir)

    def _adopt(self) -> None:
        """Take what a previous agent left in the pinned maps as our state, so
        the next sync diffs against it (stale keys are removed, equal keys are
        not rewritten) and the revision continues instead of restarting at 1."""
        bpf = self._bpf
        config = bpf[b"config"]
        self._revision = int(config[config.Key(0)].value)
        for k, v in bpf[b"policy"].items():
            key = (
                k.endpoint_id,
                k.direction,
                k.identity,
                k.protocol,
                int.from_bytes(int(k.port).to_bytes(2, "little"), "big"),
                k.prefixlen - POLICY_PREFIX_BASE,
            )
            self._policy_state[key] = (v.flags, v.proxy_port)
        ips: dict[int, IPv4Address] = {}
        for k, v in bpf[b"ipcache"].items():
            net = IPv4Network((_ip_from_be32(k.addr), k.prefixlen))
            self._ipcache_state[net] = (v.identity, v.endpoint_id)
            if v.endpoint_id and k.prefixlen == 32:
                ips[v.endpoint_id] = net.network_address
            elif not v.endpoint_id:
                self._ipcache_desired[net] = v.identity
        endpoints = bpf[b"endpoints"]
        for k, v in bpf[b"ifindex_endpoint"].items():
            ep_id, ifindex = v.value, k.value
            ep = endpoints.get(endpoints.Key(ep_id))
            if ep is None or ep_id not in ips:
                continue
            self._endpoints[ep_id] = EndpointInfo(
                endpoint_id=ep_id,
                ifindex=ifindex,
                ip=ips[ep_id],
                identity=ep.identity,
                ingress_enforced=bool(ep.flags & EP_INGRESS_ENFORCED),
                egress_enforced=bool(ep.flags & EP_EGRESS_ENFORCED),
                audit=bool(ep.flags & EP_AUDIT),
            )
            self._adopted.add(ep_id)

    def prune_adopted(self) -> list[int]:
        """After the first sync: endpoints found in the pinned maps that were
        not attached again are gone; remove their entries and tc filters."""
        gone = [i for i in self._adopted if i not in self._attached and i in self._endpoints]
        for ep_id in gone:
            info = self._endpoints[ep_id]
            self._attached[ep_id] = _Attached(info, ["clsact", _TC_INGRESS, _TC_EGRESS])
            self.detach(ep_id)
        self._adopted.clear()
        return gone

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- desired state ------------------------------------------------------

    def _bump_revision(self) -> None:
        """Conntrack entries judged under an older revision are re-judged."""
        self._revision += 1
        config = self._require()[b"config"]
        config[config.Key(0)] = config.Leaf(self._revision)

    def set_endpoint(self, info: EndpointInfo) -> None:
        bpf = self._require()
        if info.endpoint_id <= 0 or info.ifindex <= 0 or info.identity <= 0:
            raise ValueError(f"endpoint id, ifindex and identity must be positive: {info!r}")
        old = self._endpoints.get(info.endpoint_id)
        endpoints, by_ifindex = bpf[b"endpoints"], bpf[b"ifindex_endpoint"]
        endpoints[endpoints.Key(info.endpoint_id)] = endpoints.Leaf(info.identity, info.flags())
        if old is not None and old.ifindex != info.ifindex:
            with contextlib.suppress(KeyError):
                del by_ifindex[by_ifindex.Key(old.ifindex)]
        by_ifindex[by_ifindex.Key(info.ifindex)] = by_ifindex.Leaf(info.endpoint_id)
        self._endpoints[info.endpoint_id] = info
        self._write_ipcache()
        self._bump_revision()

    def remove_endpoint(self, endpoint_id: int) -> None:
        bpf = self._require()
        info = self._endpoints.pop(endpoint_id, None)
        if info is None:
            return
        endpoints, by_ifindex = bpf[b"endpoints"], bpf[b"ifindex_endpoint"]
        with contextlib.suppress(KeyError):
            del by_ifindex[by_ifindex.Key(info.ifindex)]
        with contextlib.suppress(KeyError):
            del endpoints[endpoints.Key(endpoint_id)]
        self._write_ipcache()
        self._bump_revision()

    def sync_ipcache(self, prefixes: Mapping[IPv4Network, int]) -> None:
        """Full desired prefix -> identity map (endpoint /32s are added by
        set_endpoint and win over a caller's entry for the same address)."""
        self._require()
        desired = {IPv4Network(p): int(i) for p, i in prefixes.items()}
        if any(i <= 0 for i in desired.values()):
            raise ValueError("identities must be positive")
        self._ipcache_desired = desired
        if self._write_ipcache():
            self._bump_revision()

    def _write_ipcache(self) -> bool:
        table = self._require()[b"ipcache"]
        desired = {net: (identity, 0) for net, identity in self._ipcache_desired.items()}
        for info in self._endpoints.values():
            desired[IPv4Network(f"{info.ip}/32")] = (info.identity, info.endpoint_id)

        def key(net: IPv4Network):
            return table.Key(net.prefixlen, _be32(net.network_address))

        return _apply_diff(table, key, self._ipcache_state, desired, "ipcache")

    def sync_policy(self, entries: Iterable[PolicyEntry]) -> None:
        """Full desired L3/L4 policy; only changed keys are written, then the
        revision is bumped so established flows are re-judged once."""
        table = self._require()[b"policy"]
        desired = compile_policy(entries)

        def key(k: PolicyKey):
            endpoint_id, direction, identity, proto, port, bits = k
            return table.Key(
                prefixlen=POLICY_PREFIX_BASE + bits,
                endpoint_id=endpoint_id,
                direction=direction,
                protocol=proto,
                identity=identity,
                port=_be16(port),
            )

        if _apply_diff(table, key, self._policy_state, desired, "policy"):
            self._bump_revision()

    # --- the proxy's listeners ----------------------------------------------

    def register_proxy_listener(self, proxy_port: int, sock: socket.socket) -> None:
        """Redirects for proxy_port go to this listening socket. It must have
        IP_TRANSPARENT (else the SYN-ACK cannot be routed) and listen already."""
        self._require()
        if not sock.getsockopt(socket.SOL_IP, socket.IP_TRANSPARENT):
            raise ValueError("proxy listener needs IP_TRANSPARENT")
        bpfsys.sockhash_put(self._listener_fd, proxy_port, sock.fileno())
        self._listeners[proxy_port] = sock.fileno()

    def unregister_proxy_listener(self, proxy_port: int) -> None:
        self._require()
        bpfsys.sockhash_delete(self._listener_fd, proxy_port)
        self._listeners.pop(proxy_port, None)

    # --- observation --------------------------------------------------------

    def counters(self) -> dict:
        """{"total": {name: packets}, "endpoints": {endpoint_id: {name: packets}}}."""
        bpf = self._require()
        totals = dict.fromkeys(COUNTER_NAMES, 0)
        table = bpf[b"counters"]
        for i, name in enumerate(COUNTER_NAMES):
            totals[name] = int(sum(table[table.Key(i)]))
        per_endpoint: dict[int, dict[str, int]] = {}
        for k, v in bpf[b"endpoint_counters"].items():
            if k.counter < len(COUNTER_NAMES):
                row = per_endpoint.setdefault(k.endpoint_id, dict.fromkeys(COUNTER_NAMES, 0))
                row[COUNTER_NAMES[k.counter]] += int(sum(v))
        return {"total": totals, "endpoints": per_endpoint}

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        e = self._bpf[b"drop_events"].event(data)
        flow = _flow_of(e)
        count = e.count - self._tail_reported.pop(flow, 0)
        self._events.append(
            self._drop_event(
                flow, e.time_ns, socket.ntohs(e.sport), count, e.src_identity, e.dst_identity
            )
        )

    def _drop_event(
        self,
        flow: DropFlow,
        time_ns: int,
        src_port: int,
        count: int,
        src_identity: int = 0,
        dst_identity: int = 0,
    ) -> DropEvent:
        """A drop report; the tail sweep knows the flow but not its identities (0: the
        agent resolves them from the addresses)."""
        saddr, daddr, dport, proto, reason, direction, audited, endpoint_id = flow
        return DropEvent(
            time_ns=time_ns,
            src_ip=_ip_from_be32(saddr),
            src_port=src_port,
            dst_ip=_ip_from_be32(daddr),
            dst_port=socket.ntohs(dport),
            proto=proto,
            src_identity=src_identity,
            dst_identity=dst_identity,
            endpoint_id=endpoint_id,
            direction=_DIRECTION_NAMES.get(direction, "?"),
            reason=REASONS.get(reason, str(reason)),
            audited=bool(audited),
            count=count,
        )

    def poll_drops(self, timeout_ms: int = 0) -> list[DropEvent]:
        """Drop (and audit) events since the last call; waits up to timeout_ms
        for the first one. Once per drop-report interval it also reports the
        drops the kernel counted for flows that went quiet since their last
        event, so that every drop is in some event's count."""
        bpf = self._require()
        if not self._events:
            bpf.ring_buffer_poll(timeout_ms)
        bpf.ring_buffer_consume()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns's clock
        if now >= self._next_sweep_ns:
            self._next_sweep_ns = now + int(self.drop_report_interval * 1e9)
            self._sweep_quiet_flows(now)
        out, self._events = self._events, []
        return out

    def _sweep_quiet_flows(self, now: int) -> None:
        interval = int(self.drop_report_interval * 1e9)
        live: dict[DropFlow, int] = {}
        for k, v in self._bpf[b"drop_reports"].items():
            flow = _flow_of(k)
            live[flow] = v.suppressed
            unreported = v.suppressed - self._tail_reported.get(flow, 0)
            if unreported > 0 and now - v.last_ns >= interval:
                self._tail_reported[flow] = v.suppressed
                self._events.append(self._drop_event(flow, now, 0, unreported))
        # Flows the LRU map let go of will not be reported again.
        self._tail_reported = {f: n for f, n in self._tail_reported.items() if f in live}

    def program_ids(self) -> dict[str, int]:
        """Kernel ids of the loaded programs, by function name."""
        return {name: bpfsys.prog_id(fn.fd) for name, fn in self._progs.items()}

    def map_fill(self, max_age: float = 0.0) -> dict[str, tuple[int, int]]:
        """name -> (used, max). Maps only user space writes are counted from
        its own record; conntrack is counted in the kernel (batched, ~80 ms for
        60k entries), reused for `max_age` seconds."""
        bpf = self._require()
        now = time.monotonic()
        if self._ct_fill is None or now - self._ct_fill[0] > max_age:
            table = bpf[b"conntrack"]
            try:
                used = sum(1 for _ in table.items_lookup_batch())
            except Exception:  # kernels/bcc without batch ops
                used = sum(1 for _ in table.keys())
            self._ct_fill = (now, used, table.max_entries)
        return {
            "ipcache": (len(self._ipcache_state), bpf[b"ipcache"].max_entries),
            "endpoints": (len(self._endpoints), bpf[b"endpoints"].max_entries),
            "ifindex_endpoint": (len(self._endpoints), bpf[b"ifindex_endpoint"].max_entries),
            "policy": (len(self._policy_state), bpf[b"policy"].max_entries),
            "conntrack": self._ct_fill[1:],
            "proxy_listeners": (len(self._listeners), PROXY_LISTENERS_MAX),
        }

    def status(self) -> dict:
        loaded = self._bpf is not None
        return {
            "instance": self.instance,
            "loaded": loaded,
            "proxy_mark": self.proxy_mark,
            "redirect_mark": self.redirect_mark,
            "policy_revision": self._revision,
            "attached": {i: a.info.ifindex for i, a in self._attached.items()},
            "devices": sorted(self._devices),
            "programs": self.program_ids() if loaded else {},
            "proxy_listeners": sorted(self._listeners),
            "policy_keys": len(self._policy_state),
            "maps": self.map_fill(max_age=5.0) if loaded else {},
            "counters": self.counters() if loaded else {},
            "checked_at": time.time(),
        }


def kernel_support() -> str | None:
    """None if this machine can run the datapath, else the reason it cannot."""
    import os

    if os.geteuid() != 0:
        return "needs root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable"
    return None


__all__ = [
    "Datapath",
    "DropEvent",
    "EndpointInfo",
    "PolicyEntry",
    "compile_policy",
    "port_blocks",
    "kernel_support",
]
