"""Where an agent instance pins its BPF maps, and whether a pinned set fits.

The datapath's state maps (conntrack, policy, ipcache, endpoints, counters,
the proxy's listener sockhash) are pinned under ``/sys/fs/bpf/l7proxy-<instance>``
so that a restarted agent finds them again: established flows keep their
conntrack entries and policy is enforced without a gap. A full stop removes
the pins; a handover to a successor keeps them (docs/restarts.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
from pathlib import Path

from l7proxy.datapath import bpfsys

BPFFS = Path("/sys/fs/bpf")
PIN_PREFIX = "l7proxy-"

log = logging.getLogger("l7proxy.datapath.loader")

# Pinned state maps, by name in bpf/sockmap.c. The ring buffer is not pinned:
# each agent reads its own program's drop events.
PINNED_MAPS = (
    "ipcache",
    "endpoints",
    "ifindex_endpoint",
    "policy",
    "conntrack",
    "counters",
    "endpoint_counters",
    "config",
    "proxy_listeners",
)


def pin_dir(instance: str, root: Path = BPFFS) -> Path:
    return root / f"{PIN_PREFIX}{instance}"


def is_bpffs(path: Path) -> bool:
    """True if `path` is the root of a mounted BPF file system."""
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "bpf" and Path(parts[1]) == path:
                return True
    return False


def ensure_bpffs(root: Path = BPFFS) -> None:
    """Mount the BPF file system at `root` if it is not (as Cilium does)."""
    if is_bpffs(root):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount bpffs at {root}: {os.strerror(err)}")


def prepare(path: Path) -> None:
    ensure_bpffs(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)


def remove(path: Path) -> None:
    """Unpin every map of an instance (a map lives on while a program or an fd uses it)."""
    shutil.rmtree(path, ignore_errors=True)


def leftovers(root: Path = BPFFS) -> list[Path]:
    """Pin directories of any instance still present."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PIN_PREFIX))


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info, the leading fields.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    attr = bpfsys._InfoByFdAttr(
        bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)
    )
    bpfsys._bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def mismatches(bpf) -> list[str]:
    """Pinned maps that do not have the shape this program declares.

    bcc reuses a pinned map whatever its shape, so a program whose map
    changed (another max_entries, a new field in a value) would read the old
    layout. Such a set must be dropped and created afresh."""
    from bcc.libbcc import lib

    out = []
    for name in PINNED_MAPS:
        bname = name.encode()
        fd = lib.bpf_table_fd(bpf.module, bname)
        table_id = lib.bpf_table_id(bpf.module, bname)
        if fd < 0 or table_id < 0:
            out.append(f"{name}: not in the program")
            continue
        have = map_info(fd)
        want = {
            "type": lib.bpf_table_type_id(bpf.module, table_id),
            "max_entries": lib.bpf_table_max_entries_id(bpf.module, table_id),
            "map_flags": lib.bpf_table_flags_id(bpf.module, table_id),
        }
        if name != "proxy_listeners":  # bcc cannot open a sockhash to ask its sizes
            table = bpf[bname]
            want["key_size"] = ctypes.sizeof(table.Key)
            want["value_size"] = (
                ctypes.sizeof(table.sLeaf) if hasattr(table, "sLeaf") else ctypes.sizeof(table.Leaf)
            )
        for field, value in want.items():
            if getattr(have, field) != value:
                out.append(f"{name}: pinned {field} {getattr(have, field)}, program wants {value}")
    return out


def load_pinned(compile_with, path: Path):
    """Load the program with its state maps pinned under `path`.

    `compile_with(extra_cflags)` returns a bcc BPF object. A pinned set left
    by a program with other map shapes (an upgrade that changed a map) is
    dropped and created afresh: the old kernel state cannot be read safely."""
    prepare(path)
    flags = [f'-DPIN_DIR="{path}"']
    bpf = compile_with(flags)
    bad = mismatches(bpf)
    if not bad:
        return bpf
    log.warning(
        "pinned maps in %s do not fit this program (%s); starting with fresh maps",
        path,
        "; ".join(bad),
    )
    bpf.cleanup()
    remove(path)
    prepare(path)
    return compile_with(flags)
