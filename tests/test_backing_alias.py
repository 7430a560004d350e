"""Backing copies through the region mappings and through a contiguous alias: the same bytes either way, writes
that reach the guest, and every mapping given back (counted in /proc/self/maps by the memfd's name)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu.gpu.backing import Backing, BackingError, Forbidden
from vgpu.vhost_user.alias import AliasRefused, AliasTable
from vgpu.vhost_user.memory import GuestMemory, RegionDesc

PAGE = 4096
U8 = npt.NDArray[np.uint8]


@dataclass
class Ram:
    """A memfd of guest RAM, read and written as the guest would (pread/pwrite: no mapping of our own, so the
    only mappings of it are the device's), and the GuestMemory the device uses."""

    name: str
    fd: int
    size: int
    mmap_offset: int
    memory: GuestMemory

    @property
    def view(self) -> U8:
        """The guest's bytes as they are now."""
        return np.frombuffer(os.pread(self.fd, self.size, self.mmap_offset), dtype=np.uint8)

    def write(self, offset: int, data: bytes) -> None:
        assert os.pwrite(self.fd, data, self.mmap_offset + offset) == len(data)

    def maps(self) -> int:
        """Mappings of this memfd in this process: the region's own, plus one per alias run."""
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return sum(1 for line in f if f"/memfd:{self.name} " in line)

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


def _ram(name: str, size: int, gpa: int = 0, mmap_offset: int = 0) -> Ram:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap_offset + size)
    ram = Ram(name, fd, size, mmap_offset, GuestMemory(8))
    ram.write(0, np.random.default_rng(len(name)).integers(0, 256, size, dtype=np.uint8).tobytes())
    ram.memory.set_table([RegionDesc(gpa, size, 0x7F0000000000, mmap_offset)], [os.dup(fd)])
    return ram


@pytest.fixture
def ram(request: pytest.FixtureRequest) -> Iterator[Ram]:
    r = _ram(f"vgpu-alias-{os.getpid()}-{request.node.name}"[:200], 16 << 20, gpa=0x10000, mmap_offset=0x3000)
    yield r
    r.close()


def _scattered(ram: Ram, pages: int, seed: int = 1) -> tuple[Backing, U8]:
    """A backing of `pages` distinct, shuffled, never adjacent guest pages, and the bytes it holds."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(ram.size // PAGE // 2, pages, replace=False) * 2  # even pages only: no two merge
    rng.shuffle(idx)
    b = Backing(idx.astype(np.uint64) * PAGE + 0x10000, np.full(pages, PAGE, dtype=np.uint32))
    view = ram.view
    want = np.concatenate([view[i * PAGE:(i + 1) * PAGE] for i in idx])
    return b, want


def _aliased(b: Backing, ram: Ram) -> Backing:
    """Make `b` build its alias at its next copy, and copy once."""
    b.alias_after = 0
    b.gather(ram.memory, 0, np.empty(1, dtype=np.uint8))
    assert b.has_alias
    return b


@pytest.mark.parametrize("aliased", [False, True])
@pytest.mark.parametrize(("start", "n"), [(0, 96 * PAGE), (3 * PAGE, 20 * PAGE), (100, 5000), (PAGE - 1, 40 * PAGE + 2),
                                        (7, 3)])
def test_gather_matches_the_guest_bytes(ram: Ram, aliased: bool, start: int, n: int) -> None:
    b, want = _scattered(ram, 96)
    if aliased:
        _aliased(b, ram)
    out = np.zeros(n, dtype=np.uint8)
    b.gather(ram.memory, start, out)
    assert np.array_equal(out, want[start:start + n])
    assert b.has_alias == aliased
    r = b.read(ram.memory, start, n)
    assert np.array_equal(r, want[start:start + n]) and not r.flags.writeable


@pytest.mark.parametrize("aliased", [False, True])
def test_a_rectangle_is_copied_row_by_row_into_a_strided_window(ram: Ram, aliased: bool) -> None:
    b, want = _scattered(ram, 64)
    if aliased:
        _aliased(b, ram)
    stride, row, rows, start = 1024, 300, 200, 3 * 1024 + 40
    image = np.zeros((256, 1024), dtype=np.uint8)
    window = image[10:10 + rows, 100:100 + row]  # a strided destination, as a rectangle of an image is
    b.gather_rows(ram.memory, start, stride, row, window)
    expect = np.stack([want[start + y * stride:start + y * stride + row] for y in range(rows)])
    assert np.array_equal(window, expect)
    assert not image[:10].any() and not image[10:10 + rows, :100].any()  # nothing written outside the window
    got = b.read_rows(ram.memory, start, stride, row, rows)
    assert np.array_equal(got, expect) and not got.flags.writeable
    # Whole rows (stride == row) take the one-copy path either way.
    flat = np.zeros((rows, stride), dtype=np.uint8)
    b.gather_rows(ram.memory, 0, stride, stride, flat)
    assert np.array_equal(flat.reshape(-1), want[:rows * stride])


def test_a_fallback_rectangle_larger_than_its_staging_is_copied_in_steps(ram: Ram) -> None:
    b, want = _scattered(ram, 600)
    stride, row, rows = 4100, 4000, 590
    out = np.zeros((rows, row), dtype=np.uint8)
    b.gather_rows(ram.memory, 5, stride, row, out)
    assert not b.has_alias
    assert np.array_equal(out, np.stack([want[5 + y * stride:5 + y * stride + row] for y in range(rows)]))


@pytest.mark.parametrize("aliased", [False, True])
def test_scatter_writes_the_guest_pages(ram: Ram, aliased: bool) -> None:
    b, _ = _scattered(ram, 32)
    if aliased:
        _aliased(b, ram)
    data = np.random.default_rng(9).integers(0, 256, 10 * PAGE + 17, dtype=np.uint8).tobytes()
    b.scatter(ram.memory, PAGE - 5, data)
    # Read back what the guest sees, page by page, through its own mapping of the file.
    pages = ((b.addr.astype(np.int64) - 0x10000) // PAGE).tolist()
    view = ram.view
    guest = np.concatenate([view[p * PAGE:(p + 1) * PAGE] for p in pages])
    assert guest[PAGE - 5:PAGE - 5 + len(data)].tobytes() == data


def test_the_alias_sees_what_the_guest_writes_later(ram: Ram) -> None:
    b, _ = _scattered(ram, 16)
    _aliased(b, ram)
    page = (int(b.addr[3]) - 0x10000) // PAGE
    ram.write(page * PAGE, b"\xa5" * PAGE)
    out = np.empty(PAGE, dtype=np.uint8)
    b.gather(ram.memory, 3 * PAGE, out)
    assert (out == 0xA5).all()


def test_an_alias_is_built_only_after_enough_slow_copies(ram: Ram) -> None:
    b, want = _scattered(ram, 8)
    b.alias_after = 3
    out = np.empty(8 * PAGE, dtype=np.uint8)
    for _ in range(2):
        b.gather(ram.memory, 0, out)
        assert not b.has_alias
    b.gather(ram.memory, 0, out)  # the third full copy has paid 3 x 8 runs: the next one goes through an alias
    assert b.has_alias and ram.maps() == 1 + 8
    out[:] = 0
    b.gather(ram.memory, 0, out)
    assert np.array_equal(out, want)


def test_close_and_dropping_the_backing_unmap_the_alias_and_leak_no_fd(ram: Ram) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    assert ram.maps() == 1
    b, _ = _scattered(ram, 50)
    _aliased(b, ram)
    assert ram.maps() == 1 + 50 and ram.memory.aliases.vmas == 50
    b.close()
    assert ram.maps() == 1 and ram.memory.aliases.vmas == 0 and not b.has_alias
    b2, _ = _scattered(ram, 20, seed=2)
    _aliased(b2, ram)
    assert ram.maps() == 1 + 20
    del b2  # what `res.backing = None` does
    assert ram.maps() == 1 and ram.memory.aliases.vmas == 0
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_new_memory_table_drops_the_alias_and_the_next_copy_reads_the_new_memory(ram: Ram) -> None:
    b, _ = _scattered(ram, 24)
    _aliased(b, ram)
    assert ram.maps() == 1 + 24
    other = _ram(ram.name + "-new", 16 << 20)
    try:
        fd = os.dup(other.fd)
        ram.memory.set_table([RegionDesc(0x10000, 16 << 20, 0x7F0000000000, 0)], [fd])
        ram.memory.collect()
        assert ram.maps() == 0  # the old region and every alias run of it are gone
        out = np.empty(24 * PAGE, dtype=np.uint8)
        b.gather(ram.memory, 0, out)
        pages = ((b.addr.astype(np.int64) - 0x10000) // PAGE).tolist()
        view = other.view
        assert np.array_equal(out, np.concatenate([view[p * PAGE:(p + 1) * PAGE] for p in pages]))
        ram.memory.clear()
        with pytest.raises(BackingError):
            b.gather(ram.memory, 0, out)
    finally:
        other.close()


def test_a_view_held_across_a_region_removal_keeps_reading_the_old_pages(ram: Ram) -> None:
    b, want = _scattered(ram, 12)
    _aliased(b, ram)
    view = b.read(ram.memory, 0, 12 * PAGE)
    ram.memory.remove(RegionDesc(0x10000, 16 << 20, 0x7F0000000000, 0))
    assert ram.memory.collect() == 1  # the alias is pinned by the view; the region itself is unmapped
    assert ram.maps() == 12
    assert np.array_equal(view, want)  # stale guest bytes from the file, never unmapped memory
    with pytest.raises(BackingError):
        b.read(ram.memory, 0, 1)  # the backing itself no longer reaches guest memory
    del view
    assert ram.memory.collect() == 0 and ram.maps() == 0 and ram.memory.aliases.vmas == 0


def test_past_the_mapping_budget_copies_still_work_without_an_alias(ram: Ram) -> None:
    ram.memory.aliases.budget = 30
    a, want_a = _scattered(ram, 20, seed=3)
    _aliased(a, ram)
    b, want_b = _scattered(ram, 20, seed=4)
    b.alias_after = 0
    out = np.empty(20 * PAGE, dtype=np.uint8)
    b.gather(ram.memory, 0, out)
    assert not b.has_alias and np.array_equal(out, want_b)
    assert ram.memory.aliases.vmas == 20 and ram.maps() == 1 + 20
    a.close()
    b.gather(ram.memory, 0, out)  # budget free again: the refused backing tries once more
    assert b.has_alias and np.array_equal(out, want_b)
    a.gather(ram.memory, 0, out)
    assert np.array_equal(out, want_a)


def test_unaligned_entries_are_copied_without_an_alias(ram: Ram) -> None:
    # Half pages: a run may end mid-page, so the next cannot be placed by mmap.
    starts = np.arange(0, 64, 4, dtype=np.uint64) * PAGE + 0x10000 + 512
    b = Backing(starts, np.full(len(starts), PAGE // 2, dtype=np.uint32))
    b.alias_after = 0
    out = np.empty(b.size, dtype=np.uint8)
    b.gather(ram.memory, 0, out)
    assert not b.has_alias
    off = (starts.astype(np.int64) - 0x10000).tolist()
    view = ram.view
    assert np.array_equal(out, np.concatenate([view[o:o + PAGE // 2] for o in off]))


def test_a_first_entry_that_starts_mid_page_is_aliased(ram: Ram) -> None:
    addr = np.array([0x10000 + 9 * PAGE + 100, 0x10000 + 2 * PAGE, 0x10000 + 30 * PAGE], dtype=np.uint64)
    length = np.array([PAGE - 100, PAGE, 777], dtype=np.uint32)
    b = _aliased(Backing(addr, length), ram)
    view = ram.view
    want = np.concatenate([view[9 * PAGE + 100:10 * PAGE], view[2 * PAGE:3 * PAGE], view[30 * PAGE:30 * PAGE + 777]])
    out = np.empty(b.size, dtype=np.uint8)
    b.gather(ram.memory, 0, out)
    assert np.array_equal(out, want)


def test_adjacent_pages_merge_into_one_run(ram: Ram) -> None:
    # Pages 40..47 in order: one run, one slice; an alias would add nothing and is never made.
    b = Backing(np.arange(40, 48, dtype=np.uint64) * PAGE + 0x10000, np.full(8, PAGE, dtype=np.uint32))
    b.alias_after = 0
    out = np.empty(b.size, dtype=np.uint8)
    b.gather(ram.memory, 0, out)
    assert np.array_equal(out, ram.view[40 * PAGE:48 * PAGE]) and not b.has_alias


def test_an_alias_spans_regions() -> None:
    one = _ram(f"vgpu-alias-{os.getpid()}-one", 1 << 20)
    two = _ram(f"vgpu-alias-{os.getpid()}-two", 1 << 20)
    try:
        memory = one.memory
        memory.add(RegionDesc(1 << 30, 1 << 20, 0x7E0000000000, 0), os.dup(two.fd))
        addr = np.array([5 * PAGE, (1 << 30) + 7 * PAGE, 3 * PAGE, (1 << 30)], dtype=np.uint64)
        b = Backing(addr, np.full(4, PAGE, dtype=np.uint32))
        b.alias_after = 0
        out = np.empty(b.size, dtype=np.uint8)
        b.gather(memory, 0, out)
        assert b.has_alias
        b.gather(memory, 0, out)
        v1, v2 = one.view, two.view
        want = np.concatenate([v1[5 * PAGE:6 * PAGE], v2[7 * PAGE:8 * PAGE], v1[3 * PAGE:4 * PAGE], v2[:PAGE]])
        assert np.array_equal(out, want)
        assert one.maps() == 1 + 2 and two.maps() == 2 + 2  # "two" is also mapped by its own GuestMemory
    finally:
        one.close()
        two.close()


def test_the_table_refuses_what_mmap_cannot_place() -> None:
    table = AliasTable(budget=100)
    name = f"vgpu-alias-{os.getpid()}-refuse"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    read_only = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE)
        with pytest.raises(AliasRefused, match="no file"):
            table.build([(fd, 0, PAGE), (-1, 0, PAGE)])
        with pytest.raises(AliasRefused, match="page aligned"):
            table.build([(fd, 0, PAGE), (fd, 100, PAGE)])
        with pytest.raises(AliasRefused, match="budget"):
            table.build([(fd, 0, PAGE)] * 101)
        with pytest.raises(AliasRefused, match="failed"):  # a shared writable mapping of a read-only fd
            table.build([(fd, 0, PAGE), (read_only, 0, PAGE)])
        assert table.vmas == 0
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            assert f"/memfd:{name} " not in f.read()  # the first run, placed before the failure, is gone too
    finally:
        os.close(fd)
        os.close(read_only)


@pytest.mark.parametrize(("addr", "length"), [
    (0x10000 - PAGE, PAGE),  # below the region
    (0x10000 + (16 << 20) - PAGE, 2 * PAGE),  # runs off the end
    (0x10000 + (16 << 20), PAGE),  # just past the end
])
def test_an_entry_outside_guest_memory_is_refused_whatever_its_arithmetic(ram: Ram, addr: int, length: int) -> None:
    inside = (0x10000, PAGE)
    for entries in ([(addr, length)], [inside, (addr, length)]):
        b = Backing(np.array([a for a, _ in entries], dtype=np.uint64),
                    np.array([n for _, n in entries], dtype=np.uint32))
        with pytest.raises(BackingError, match=f"entry {len(entries) - 1} at {addr:#x} .* is not inside guest memory"):
            b.validate(ram.memory, Forbidden([]))


def test_entries_over_a_ring_are_refused_and_the_rest_accepted(ram: Ram) -> None:
    rings = [(0x20000, 0x20100), (0x30000, 0x31000)]
    ok = Backing(np.array([0x10000, 0x21000], dtype=np.uint64), np.full(2, PAGE, dtype=np.uint32))
    ok.validate(ram.memory, Forbidden(rings))
    bad = Backing(np.array([0x10000, 0x30000 - PAGE + 1], dtype=np.uint64), np.full(2, PAGE, dtype=np.uint32))
    with pytest.raises(BackingError, match=f"entry 1 at {0x30000 - PAGE + 1:#x} overlaps a virtqueue ring"):
        bad.validate(ram.memory, Forbidden(rings))


_ranges = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 1 << 14)).map(lambda t: (t[0], t[0] + t[1])),
                   max_size=8)
_entries = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 14)), min_size=1, max_size=16)


@settings(max_examples=300, deadline=None)
@given(rings=_ranges, entries=_entries)
def test_forbidden_finds_the_first_entry_over_any_range_as_a_full_comparison_does(
        rings: list[tuple[int, int]], entries: list[tuple[int, int]]) -> None:
    # Rings may overlap, nest, touch or be empty: merged once, one sorted search per entry must still find exactly
    # the entries that share a byte with some range.
    want = next((i for i, (a, n) in enumerate(entries) if any(a < hi and lo < a + n and lo < hi for lo, hi in rings)),
                None)
    addr = np.array([a for a, _ in entries], dtype=np.uint64)
    length = np.array([n for _, n in entries], dtype=np.uint32)
    span = (min(a for a, _ in entries), max(a + n for a, n in entries))
    assert Forbidden(rings).first_overlap(addr, length, span) == want


def test_an_entry_whose_end_wraps_past_2_to_the_64_is_refused() -> None:
    """With guest memory at address 0, an entry near 2**64 has an offset whose end wraps to a small number."""
    ram = _ram(f"vgpu-wrap-{os.getpid()}", 1 << 20, gpa=0)
    try:
        b = Backing(np.array([(1 << 64) - 0x10], dtype=np.uint64), np.array([PAGE], dtype=np.uint32))
        with pytest.raises(BackingError, match="is not inside guest memory"):
            b.validate(ram.memory, Forbidden([]))
    finally:
        ram.close()
