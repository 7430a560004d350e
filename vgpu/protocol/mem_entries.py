"""An immutable, numpy-backed list of guest scatter-gather entries.

ATTACH_BACKING and CREATE_BLOB may carry thousands of entries (one per guest page of a large framebuffer);
materialising a Python object per entry would dominate decode time, so the entries stay in two numpy arrays
and only become ``MemEntry`` objects when someone iterates them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from ..vhost_user.layout import dtype_of as struct_dtype
from .records import MemEntry
from .structs import mem_entry

if TYPE_CHECKING:
    import numpy.typing as npt

MEM_ENTRY_DTYPE: np.dtype[Any] = struct_dtype(mem_entry)
MEM_ENTRY_SIZE: int = mem_entry.sizeof()


def _frozen(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a.setflags(write=False)
    return a


class MemEntries(Sequence[MemEntry]):
    """Read-only sequence of ``MemEntry`` with vectorised ``addr`` / ``length`` views."""

    __slots__ = ("_addr", "_length")

    def __init__(self, addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32]) -> None:
        if addr.shape != length.shape or addr.ndim != 1:
            raise ValueError("addr and length must be 1-d arrays of equal length")
        self._addr = _frozen(np.ascontiguousarray(addr, dtype=np.uint64))
        self._length = _frozen(np.ascontiguousarray(length, dtype=np.uint32))

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview, count: int) -> MemEntries:
        """Decode ``count`` packed ``virtio_gpu_mem_entry`` structs; the caller has checked the length."""
        arr = np.frombuffer(data, dtype=MEM_ENTRY_DTYPE, count=count)
        # astype copies, detaching the result from guest memory that may change under us.
        return cls(arr["addr"].astype(np.uint64), arr["length"].astype(np.uint32))

    @classmethod
    def of(cls, entries: Iterable[MemEntry | tuple[int, int]]) -> MemEntries:
        pairs = [(e.addr, e.length) if isinstance(e, MemEntry) else e for e in entries]
        addr = np.fromiter((p[0] for p in pairs), dtype=np.uint64, count=len(pairs))
        length = np.fromiter((p[1] for p in pairs), dtype=np.uint32, count=len(pairs))
        return cls(addr, length)

    def to_wire(self) -> bytes:
        arr = np.zeros(len(self), dtype=MEM_ENTRY_DTYPE)
        arr["addr"] = self._addr
        arr["length"] = self._length
        return arr.tobytes()

    @property
    def addr(self) -> npt.NDArray[np.uint64]:
        return self._addr

    @property
    def length(self) -> npt.NDArray[np.uint32]:
        return self._length

    def total_length(self) -> int:
        """Sum of all lengths as a Python int (no uint64 wrap-around however many entries there are)."""
        return int(self._length.sum(dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._addr.shape[0])

    @overload
    def __getitem__(self, index: int) -> MemEntry: ...
    @overload
    def __getitem__(self, index: slice) -> MemEntries: ...
    def __getitem__(self, index: int | slice) -> MemEntry | MemEntries:
        if isinstance(index, slice):
            return MemEntries(self._addr[index], self._length[index])
        return MemEntry(int(self._addr[index]), int(self._length[index]))

    def __iter__(self) -> Iterator[MemEntry]:
        for a, n in zip(self._addr.tolist(), self._length.tolist(), strict=True):
            yield MemEntry(a, n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemEntries):
            return NotImplemented
        return bool(np.array_equal(self._addr, other._addr) and np.array_equal(self._length, other._length))

    def __hash__(self) -> int:
        return hash((self._addr.tobytes(), self._length.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(f"({e.addr:#x}, {e.length})" for e in self[:4])
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"MemEntries([{shown}{more}])"
