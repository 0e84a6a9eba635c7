"""Network plumbing for endpoints and the proxy, with pyroute2 only.

An endpoint is a network namespace joined to the root namespace by a veth
pair: `eth0` inside, `host_ifname` outside. The root namespace routes between
endpoints (a /32 per endpoint via its host-side veth). Inside, the default
route points at a link-local gateway (169.254.1.1) whose neighbour entry is
the host veth's MAC, written statically so no ARP proxying is needed.

Besides datapath.py this is the only module that imports pyroute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

GATEWAY = "169.254.1.1"
NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
_ENOENT, _EEXIST, _ESRCH, _ENODEV = 2, 17, 3, 19

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class EndpointLink:
    ns_name: str
    host_ifname: str
    host_ifindex: int
    ip: IPv4Address


def _write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def ensure_forwarding() -> None:
    """The root namespace routes between endpoints. Written only when off: in a
    container /proc/sys is read-only, and a Kubernetes node forwards already."""
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        _write_sysctl("net/ipv4/ip_forward", "1")


def endpoint_exists(ns_name: str, host_ifname: str | None = None) -> bool:
    if ns_name in netns.listnetns():
        return True
    if host_ifname is not None:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=host_ifname))
    return False


def _link_index(ipr, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def create_endpoint(ns_name: str, host_ifname: str, ip: IPv4Address) -> EndpointLink:
    """Namespace + veth + addresses + routes; torn down again if any step fails."""
    if len(host_ifname) > 15:
        raise ValueError(f"interface name too long: {host_ifname!r}")
    ip = IPv4Address(ip)
    if endpoint_exists(ns_name, host_ifname):
        # Checked first so the clean-up below can never remove someone else's.
        raise FileExistsError(f"endpoint {ns_name}/{host_ifname} already exists")
    netns.create(ns_name)
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=host_ifname,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": ns_name},
            )
            index = _link_index(ipr, host_ifname)
            if index is None:
                raise RuntimeError(f"veth {host_ifname} did not appear")
            host_mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
            ipr.link("set", index=index, state="up")
            with NetNS(ns_name) as ns:
                lo = _link_index(ns, "lo")
                ns.link("set", index=lo, state="up")
                eth0 = _link_index(ns, "eth0")
                ns.addr("add", index=eth0, address=str(ip), prefixlen=32)
                ns.link("set", index=eth0, state="up")
                ns.route("add", dst=f"{GATEWAY}/32", oif=eth0, scope=253)
                ns.neigh(
                    "add",
                    dst=GATEWAY,
                    lladdr=host_mac,
                    ifindex=eth0,
                    state=ndmsg.states["permanent"],
                )
                ns.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)
            ipr.route("add", dst=f"{ip}/32", oif=index, scope=253)
        return EndpointLink(ns_name, host_ifname, index, ip)
    except BaseException:
        delete_endpoint(ns_name, host_ifname)
        raise


def delete_endpoint(ns_name: str, host_ifname: str) -> None:
    """Idempotent: removing the veth drops its peer and the /32 route with it."""
    with IPRoute() as ipr:
        index = _link_index(ipr, host_ifname)
        if index is not None:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
    if ns_name in netns.listnetns():
        with contextlib.suppress(FileNotFoundError):
            netns.remove(ns_name)


def list_namespaces(prefix: str = "") -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def list_links(prefix: str) -> list[tuple[str, int]]:
    """(ifname, ifindex) of root-namespace links whose name starts with prefix."""
    with IPRoute() as ipr:
        out = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name and name.startswith(prefix):
                out.append((name, link["index"]))
        return out


def delete_link(ifname: str) -> None:
    with IPRoute() as ipr:
        index = _link_index(ipr, ifname)
        if index is not None:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)


def remove_namespace(ns_name: str) -> None:
    if ns_name in netns.listnetns():
        with contextlib.suppress(FileNotFoundError):
            netns.remove(ns_name)


def link_index_in(ns_name: str, ifname: str) -> int | None:
    """ifindex of a link inside a namespace."""
    with NetNS(ns_name) as ns:
        return _link_index(ns, ifname)


def link_local_v6(ifindex: int) -> str | None:
    """The fe80:: address of a root-namespace link, once it is no longer tentative."""
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET6, index=ifindex):
            addr = a.get_attr("IFA_ADDRESS")
            tentative = (a.get_attr("IFA_FLAGS") or a["flags"]) & 0x40  # IFA_F_TENTATIVE
            if addr and addr.startswith("fe80") and not tentative:
                return addr
    return None


def host_addresses() -> list[IPv4Address]:
    """IPv4 addresses of the root namespace (the agent maps them to identity host)."""
    with IPRoute() as ipr:
        return [IPv4Address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET)]


def address_links() -> list[tuple[str, IPv4Address]]:
    """(ifname, IPv4 address) of every address of the root namespace but loopback's:
    the node's devices, where traffic from other nodes arrives."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        out = []
        for a in ipr.get_addr(family=socket.AF_INET):
            ip = IPv4Address(a.get_attr("IFA_ADDRESS"))
            if not ip.is_loopback and names.get(a["index"]):
                out.append((str(names[a["index"]]), ip))
        return out


def route_link(ip: IPv4Address | str) -> tuple[str, int] | None:
    """(ifname, ifindex) of the link that the main table's /32 route to ``ip`` goes
    out of: a pod's host-side veth, as a CNI that routes each pod (ptp, Calico,
    Cilium's generic veth chaining) installs it. None without such a route."""
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET, table=254, dst=str(ip), dst_len=32):
            oif = r.get_attr("RTA_OIF")
            if r["dst_len"] != 32 or r.get_attr("RTA_DST") != str(ip) or oif is None:
                continue
            links = ipr.get_links(oif)
            if links:
                return str(links[0].get_attr("IFLA_IFNAME")), int(oif)
    return None


def routes_in(network: IPv4Network) -> bool:
    """True if any root-namespace IPv4 route overlaps `network` (used to pick a free test /24)."""
    network = IPv4Network(network)
    with IPRoute() as ipr:
        for table in (254, 255):
            for r in ipr.get_routes(family=socket.AF_INET, table=table):
                dst = r.get_attr("RTA_DST") or "0.0.0.0"
                if r["dst_len"] == 0:
                    continue
                if IPv4Network(f"{dst}/{r['dst_len']}", strict=False).overlaps(network):
                    return True
        for a in ipr.get_addr(family=socket.AF_INET):
            if IPv4Address(a.get_attr("IFA_ADDRESS")) in network:
                return True
    return False


# --- policy routing for the proxy ------------------------------------------


def install_proxy_routing(mark: int, table: int, priority: int | None = None) -> None:
    """`ip rule fwmark M lookup T` + `local 0.0.0.0/0 dev lo table T`.

    Packets the datapath hands to a proxy socket with bpf_sk_assign() carry
    `mark`; without a local route they would be forwarded despite the assign.
    `mark` must differ from the proxy's own SO_MARK, or its upstream connects
    would be routed back into the host. Idempotent.
    """
    with IPRoute() as ipr:
        lo = _link_index(ipr, "lo")
        try:
            ipr.route("add", dst="0.0.0.0/0", type="local", oif=lo, table=table, scope=254)
        except NetlinkError as e:
            if e.code != _EEXIST:
                raise
        if not _find_rules(ipr, mark, table):
            kw = {"priority": priority} if priority is not None else {}
            ipr.rule(
                "add",
                family=socket.AF_INET,
                fwmark=mark,
                fwmask=0xFFFFFFFF,
                table=table,
                action="FR_ACT_TO_TBL",
                **kw,
            )


def remove_proxy_routing(mark: int, table: int) -> None:
    """Idempotent."""
    with IPRoute() as ipr:
        for rule in _find_rules(ipr, mark, table):
            with contextlib.suppress(NetlinkError):
                ipr.rule(
                    "del",
                    family=socket.AF_INET,
                    fwmark=mark,
                    fwmask=0xFFFFFFFF,
                    table=table,
                    priority=rule.get_attr("FRA_PRIORITY"),
                    action="FR_ACT_TO_TBL",
                )
        lo = _link_index(ipr, "lo")
        with contextlib.suppress(NetlinkError):
            ipr.route("del", dst="0.0.0.0/0", type="local", oif=lo, table=table, scope=254)


def _find_rules(ipr, mark: int, table: int) -> list:
    out = []
    for rule in ipr.get_rules(family=socket.AF_INET):
        t = rule.get_attr("FRA_TABLE") or rule["table"]
        if rule.get_attr("FRA_FWMARK") == mark and t == table:
            out.append(rule)
    return out


def proxy_routing_installed(mark: int, table: int) -> bool:
    with IPRoute() as ipr:
        return bool(_find_rules(ipr, mark, table))


def list_rules_by_table(tables: Sequence[int]) -> list[tuple[int, int]]:
    """(fwmark, table) of rules pointing at any of `tables` (for leak checks)."""
    with IPRoute() as ipr:
        out = []
        for rule in ipr.get_rules(family=socket.AF_INET):
            t = rule.get_attr("FRA_TABLE") or rule["table"]
            if t in tables:
                out.append((rule.get_attr("FRA_FWMARK") or 0, t))
        return out


def tc_bpf_filters(ifindex: int) -> list[str]:
    """Names of the tc bpf filters on a link's clsact hooks ([] if none or no link)."""
    names = []
    with IPRoute() as ipr:
        for parent in (0xFFFFFFF2, 0xFFFFFFF3):
            try:
                filters = ipr.get_filters(index=ifindex, parent=parent)
            except NetlinkError:
                continue
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts else None
                if name:
                    names.append(name)
    return names


# --- doing things inside a namespace --------------------------------------


def run_in_netns(ns_name: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start a program inside the namespace (`ip netns exec`); the caller kills it."""
    return subprocess.Popen(["ip", "netns", "exec", ns_name, *argv], **popen_kwargs)


def open_socket_in_netns(
    ns_name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in the namespace, usable from any thread afterwards.

    Namespaces are per thread, so the switch happens in a short-lived thread
    and never touches the caller's.
    """
    result: dict = {}

    def work() -> None:
        try:
            with open(NETNS_DIR / ns_name) as f:
                if _libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            result["sock"] = socket.socket(family, type, proto)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=work, name=f"setns-{ns_name}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]
