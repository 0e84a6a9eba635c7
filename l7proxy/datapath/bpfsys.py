"""The few raw bpf(2) commands bcc 0.26 cannot do for us.

bcc refuses to open sockmap/sockhash tables ("Unknown table type 15/18"), so
the proxy's listening sockets are put into the sockhash by map fd here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_ANY = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapElemAttr(ctypes.Structure):
    # union bpf_attr, the BPF_MAP_*_ELEM member.
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def map_update(
    map_fd: int, key: ctypes._SimpleCData, value: ctypes._SimpleCData, flags: int = BPF_ANY
) -> None:
    attr = _MapElemAttr(
        map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=flags
    )
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_delete(map_fd: int, key: ctypes._SimpleCData) -> bool:
    """Delete a key; False if it was not there."""
    attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def sockhash_put(map_fd: int, key: int, sock_fd: int) -> None:
    """Store a socket (by its fd) in a sockhash keyed by a u32."""
    map_update(map_fd, ctypes.c_uint32(key), ctypes.c_uint64(sock_fd))


def sockhash_delete(map_fd: int, key: int) -> bool:
    return map_delete(map_fd, ctypes.c_uint32(key))


BPF_OBJ_GET_INFO_BY_FD = 15


class _InfoByFdAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


def prog_id(prog_fd: int) -> int:
    """Kernel id of a loaded program (as `bpftool prog show id N` knows it)."""
    info = (ctypes.c_uint32 * 4)()  # bpf_prog_info starts: type, id, tag[8]
    attr = _InfoByFdAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info[1]
