"""The Linux Xen driver UAPI a vhost-user back end (and a front end playing the Xen VMM) needs: privcmd, gntdev,
gntalloc, and the two grant-table hypercall arguments used to find a page's machine frame.

Each argument struct is declared once, in construct, and checked against the DWARF of a Xen dom0 kernel built by
the lab (``tools/layout_registry.py``: ``XEN_REGISTRY``); the ioctl numbers are computed from these layouts'
sizes, as ``_IOC(_IOC_NONE, type, nr, sizeof(struct))`` does in the kernel headers.  Nothing here keeps state:
the calls are thin, synchronous and raise ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import fcntl
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
from construct import Array, Int16sn, Int16un, Int32un, Int64un, Padding, Struct

# --- privcmd (include/uapi/xen/privcmd.h) --------------------------------------------------------------------

privcmd_hypercall = Struct("op" / Int64un, "arg" / Array(5, Int64un))
privcmd_mmapbatch_v2 = Struct(
    "num" / Int32un,
    "dom" / Int16un,
    Padding(2),
    "addr" / Int64un,
    "arr" / Int64un,  # const xen_pfn_t *: one frame number per page
    "err" / Int64un,  # int *: one error per page, filled by the kernel
)

# --- gntdev (include/uapi/xen/gntdev.h) ----------------------------------------------------------------------

ioctl_gntdev_grant_ref = Struct("domid" / Int32un, "ref" / Int32un)
#: The fixed part of IOCTL_GNTDEV_MAP_GRANT_REF's argument; ``count`` grant refs follow it.
_map_grant_ref_head = Struct("count" / Int32un, "pad" / Int32un, "index" / Int64un)
#: As the header declares it (``refs[1]``): what ``sizeof`` — and so the ioctl number — is made of.
ioctl_gntdev_map_grant_ref = Struct(*_map_grant_ref_head.subcons, "refs" / Array(1, ioctl_gntdev_grant_ref))
ioctl_gntdev_unmap_grant_ref = Struct("index" / Int64un, "count" / Int32un, "pad" / Int32un)

# --- gntalloc (include/uapi/xen/gntalloc.h) ------------------------------------------------------------------

_alloc_gref_head = Struct("domid" / Int16un, "flags" / Int16un, "count" / Int32un, "index" / Int64un)
ioctl_gntalloc_alloc_gref = Struct(*_alloc_gref_head.subcons, "gref_ids" / Array(1, Int32un), Padding(4))
ioctl_gntalloc_dealloc_gref = Struct("index" / Int64un, "count" / Int32un, Padding(4))
GNTALLOC_FLAG_WRITABLE: Final = 1

# --- grant-table hypercall arguments (include/xen/interface/grant_table.h) -------------------------------------

gnttab_setup_table = Struct(
    "dom" / Int16un,
    Padding(2),
    "nr_frames" / Int32un,
    "status" / Int16sn,
    Padding(6),
    "frame_list" / Int64un,  # GUEST_HANDLE(xen_pfn_t): on x86 Linux a plain pointer
)
gnttab_query_size = Struct(
    "dom" / Int16un, Padding(2), "nr_frames" / Int32un, "max_nr_frames" / Int32un, "status" / Int16sn, Padding(2),
)
grant_entry_v1 = Struct("flags" / Int16un, "domid" / Int16un, "frame" / Int32un)

__HYPERVISOR_grant_table_op: Final = 20
GNTTABOP_setup_table: Final = 2
GNTTABOP_query_size: Final = 6
GTF_permit_access: Final = 1
GTF_type_mask: Final = 3
#: Set by Xen in a grant entry while a mapping of the grant (read-only, writable) exists anywhere.
GTF_reading: Final = 1 << 3
GTF_writing: Final = 1 << 4

#: Xen's name for "the calling domain" (include/xen/interface/xen.h).
DOMID_SELF: Final = 0x7FF0
#: Xen's frames are 4 KiB whatever the kernel's page size.
PAGE_SHIFT: Final = 12

DEV_PRIVCMD: Final = "/dev/xen/privcmd"
DEV_GNTDEV: Final = "/dev/xen/gntdev"
DEV_GNTALLOC: Final = "/dev/xen/gntalloc"


def _ioc_none(kind: str, nr: int, layout: Any) -> int:
    """``_IOC(_IOC_NONE, kind, nr, sizeof(layout))``: direction 0, so only the size and numbers."""
    return (int(layout.sizeof()) << 16) | (ord(kind) << 8) | nr


IOCTL_PRIVCMD_HYPERCALL: Final = _ioc_none("P", 0, privcmd_hypercall)
IOCTL_PRIVCMD_MMAPBATCH_V2: Final = _ioc_none("P", 4, privcmd_mmapbatch_v2)
IOCTL_GNTDEV_MAP_GRANT_REF: Final = _ioc_none("G", 0, ioctl_gntdev_map_grant_ref)
IOCTL_GNTDEV_UNMAP_GRANT_REF: Final = _ioc_none("G", 1, ioctl_gntdev_unmap_grant_ref)
IOCTL_GNTALLOC_ALLOC_GREF: Final = _ioc_none("G", 5, ioctl_gntalloc_alloc_gref)
IOCTL_GNTALLOC_DEALLOC_GREF: Final = _ioc_none("G", 6, ioctl_gntalloc_dealloc_gref)


def _ioctl(fd: int, request: int, arg: bytearray) -> int:
    """The ioctl on a mutable buffer (the kernel writes its OUT fields back into it)."""
    ret: int = fcntl.ioctl(fd, request, arg, True)
    return ret


# --- privcmd -------------------------------------------------------------------------------------------------


def mmapbatch_v2(fd: int, domid: int, addr: int, frames: Sequence[int]) -> list[int]:
    """Map ``frames`` of domain ``domid`` at ``addr`` (the start of a privcmd mapping of exactly that many pages);
    returns the per-page error codes (0, or a negative errno such as -ESRCH for a frame the domain does not own)."""
    arr = np.asarray(frames, dtype=np.uint64)
    err = np.zeros(len(arr), dtype=np.int32)
    arg = bytearray(privcmd_mmapbatch_v2.build(dict(num=len(arr), dom=domid, addr=addr, arr=arr.ctypes.data,
                                                    err=err.ctypes.data)))
    _ioctl(fd, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
    return [int(e) for e in err]


def hypercall(fd: int, op: int, *args: int) -> int:
    """A hypercall through privcmd (dom0 only); returns what Xen returned."""
    words = [*args, *([0] * (5 - len(args)))]
    return _ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, bytearray(privcmd_hypercall.build(dict(op=op, arg=words))))


# --- gntdev --------------------------------------------------------------------------------------------------


def map_grant_refs(fd: int, domid: int, refs: Sequence[int]) -> int:
    """IOCTL_GNTDEV_MAP_GRANT_REF: reserve ``refs`` of domain ``domid`` in gntdev; returns the mmap offset (index).
    Nothing is mapped until that offset is mmapped (for exactly ``len(refs)`` pages)."""
    tail = b"".join(ioctl_gntdev_grant_ref.build(dict(domid=domid, ref=r)) for r in refs)
    arg = bytearray(_map_grant_ref_head.build(dict(count=len(refs), pad=0, index=0)) + tail)
    _ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
    index: int = _map_grant_ref_head.parse(bytes(arg)).index
    return index


def unmap_grant_refs(fd: int, index: int, count: int) -> None:
    _ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, bytearray(ioctl_gntdev_unmap_grant_ref.build(
        dict(index=index, count=count, pad=0))))


# --- gntalloc ------------------------------------------------------------------------------------------------


def alloc_grefs(fd: int, domid: int, count: int, writable: bool = True) -> tuple[int, list[int]]:
    """IOCTL_GNTALLOC_ALLOC_GREF: ``count`` fresh zeroed pages granted to ``domid``; (mmap offset, grant refs)."""
    head = _alloc_gref_head.build(dict(domid=domid, flags=GNTALLOC_FLAG_WRITABLE if writable else 0, count=count,
                                       index=0))
    arg = bytearray(head + bytes(4 * max(count, 2)))  # the kernel writes count refs; sizeof covers two words
    _ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, arg)
    index: int = _alloc_gref_head.parse(bytes(arg)).index
    refs = np.frombuffer(bytes(arg), dtype=np.uint32, count=count, offset=_alloc_gref_head.sizeof())
    return index, [int(r) for r in refs]


def dealloc_grefs(fd: int, index: int, count: int) -> None:
    _ioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, bytearray(ioctl_gntalloc_dealloc_gref.build(
        dict(index=index, count=count))))


# --- the grant table ---------------------------------------------------------------------------------------------


def grant_table_frames(privcmd_fd: int) -> list[int]:
    """Machine frames of the calling domain's grant table (GNTTABOP_query_size, then GNTTABOP_setup_table for
    exactly the frames it has: asking for more would grow the table behind the kernel's back)."""
    query = bytearray(gnttab_query_size.build(dict(dom=DOMID_SELF, nr_frames=0, max_nr_frames=0, status=0)))
    qbuf = np.frombuffer(query, dtype=np.uint8)
    _check_gnttab(hypercall(privcmd_fd, __HYPERVISOR_grant_table_op, GNTTABOP_query_size, qbuf.ctypes.data, 1),
                  gnttab_query_size.parse(bytes(query)).status, "query_size")
    n = gnttab_query_size.parse(bytes(query)).nr_frames
    frames = np.zeros(n, dtype=np.uint64)
    setup = bytearray(gnttab_setup_table.build(dict(dom=DOMID_SELF, nr_frames=n, status=0,
                                                    frame_list=frames.ctypes.data)))
    sbuf = np.frombuffer(setup, dtype=np.uint8)
    _check_gnttab(hypercall(privcmd_fd, __HYPERVISOR_grant_table_op, GNTTABOP_setup_table, sbuf.ctypes.data, 1),
                  gnttab_setup_table.parse(bytes(setup)).status, "setup_table")
    return [int(f) for f in frames]


def _check_gnttab(ret: int, status: int, what: str) -> None:
    if ret or status:
        raise OSError(f"GNTTABOP_{what}: hypercall returned {ret}, status {status}")
