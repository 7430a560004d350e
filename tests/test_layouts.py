"""Our construct layouts and constants against the kernel UAPI headers, as compiled by gcc and read from DWARF;
plus proof that the checker notices a wrong layout."""

from __future__ import annotations

import subprocess
import sys
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import Any

import pytest
from construct import Array, Bytes, Int16ul, Int32ul, Int64ul, Padding, Struct

from vgpu.protocol import constants as k
from vgpu.protocol import structs as s

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import layout_registry as reg  # noqa: E402
import layoutcheck as lc  # noqa: E402

GPU_H = reg.VIRTIO_GPU_H


@pytest.fixture(scope="module")
def results() -> list[lc.Result]:
    return lc.check_entries(reg.REGISTRY)


def test_registry_has_no_mismatches(results: list[lc.Result]) -> None:
    bad = {r.entry.c_name: r.problems for r in results if not r.ok}
    assert bad == {}, lc.format_table(results)


def test_every_registered_struct_was_compared(results: list[lc.Result]) -> None:
    for res in results:
        assert res.c_size is not None and res.c_size == res.our_size, res.entry.c_name


def test_every_virtio_gpu_struct_is_registered() -> None:
    in_header = lc.struct_names([GPU_H], prefix="virtio_gpu_")
    registered = {e.c_name for e in reg.REGISTRY}
    assert in_header - registered - set(reg.UNREGISTERED_OK) == set()
    assert len(in_header) >= 30


def check(c_name: str, ours: Any, field_map: dict[str, str] | None = None, header: str = GPU_H) -> list[str]:
    [res] = lc.check_entries([reg.LayoutEntry(header, c_name, ours, field_map or {})])
    return res.problems


# --- the checker must fail on wrong layouts ----------------------------------------------------------------


def test_checker_accepts_the_correct_struct() -> None:
    assert check("virtio_gpu_mem_entry", s.mem_entry) == []


def test_checker_fails_on_moved_field() -> None:
    moved = Struct("addr" / Int64ul, "padding" / Padding(4), "length" / Int32ul)
    problems = check("virtio_gpu_mem_entry", moved)
    assert any(pr.startswith("length: C at 8+4") for pr in problems), problems


def test_checker_fails_on_wrong_field_size() -> None:
    wrong = Struct("addr" / Int64ul, "length" / Int64ul)
    problems = check("virtio_gpu_mem_entry", wrong)
    assert any("length" in pr and "8+8" in pr for pr in problems), problems


def test_checker_fails_on_total_size() -> None:
    short = Struct("addr" / Int64ul, "length" / Int32ul)
    assert "size: C 16 != ours 12" in check("virtio_gpu_mem_entry", short)


def test_checker_fails_on_renamed_and_extra_fields() -> None:
    renamed = Struct("address" / Int64ul, "length" / Int32ul, "padding" / Padding(4))
    problems = check("virtio_gpu_mem_entry", renamed)
    assert any(pr.startswith("addr: in C") for pr in problems)
    assert any(pr.startswith("address: ours") for pr in problems)


def test_checker_fails_when_padding_hides_a_real_field() -> None:
    hidden = Struct("addr" / Int64ul, "padding" / Padding(8))
    problems = check("virtio_gpu_mem_entry", hidden)
    assert any(pr.startswith("length: in C at 8+4, missing") for pr in problems), problems


def test_checker_fails_inside_nested_structs_and_arrays() -> None:
    bad_hdr = Struct(
        "type" / Int32ul,
        "flags" / Int32ul,
        "fence_id" / Int64ul,
        "ctx_id" / Int32ul,
        "ring_idx" / Int16ul,
        "padding" / Padding(2),
    )
    nested = Struct("hdr" / bad_hdr, "resource_id" / Int32ul, "padding" / Padding(4))
    problems = check("virtio_gpu_resource_unref", nested)
    assert any(pr.startswith("hdr.ring_idx:") for pr in problems), problems

    strides3 = Struct(*[sub for sub in s.set_scanout_blob.subcons if sub.name != "offsets"],
                      "offsets" / Array(3, Int32ul), Padding(4))  # fmt: skip
    problems = check("virtio_gpu_set_scanout_blob", strides3)
    assert any(pr.startswith("offsets[3]: in C") for pr in problems), problems


def test_checker_fails_on_byte_array_length() -> None:
    short_name = Struct("hdr" / s.ctrl_hdr, "nlen" / Int32ul, "context_init" / Int32ul, "debug_name" / Bytes(32),
                        Padding(32))  # fmt: skip
    problems = check("virtio_gpu_ctx_create", short_name)
    assert any(pr.startswith("debug_name:") for pr in problems), problems


def test_field_map_is_needed_and_honoured() -> None:
    region = Struct("guest_phys_addr" / Int64ul, "memory_size" / Int64ul, "userspace_addr" / Int64ul,
                    "mmap_offset" / Int64ul)  # fmt: skip
    h = reg.VHOST_TYPES_H
    assert check("vhost_memory_region", region, {"mmap_offset": "flags_padding"}, h) == []
    assert check("vhost_memory_region", region, None, h) != []


def test_checker_reports_missing_struct_and_missing_attribute() -> None:
    assert check("virtio_gpu_no_such_struct", s.mem_entry) != []
    assert any("MISSING" in pr for pr in check("virtio_gpu_mem_entry", "vgpu.protocol.structs:no_such"))


def test_dwarf_flattening_sees_nested_arrays_and_unions() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dwarf = lc.DwarfLayouts(lc.compile_headers([GPU_H, reg.VHOST_TYPES_H], Path(tmp)))
        try:
            disp = {leaf.name: leaf for leaf in dwarf.layout("virtio_gpu_resp_display_info").leaves}
            msg = {leaf.name: leaf for leaf in dwarf.layout("vhost_msg").leaves}
        finally:
            dwarf.close()
    assert (disp["pmodes[15].flags"].offset, disp["pmodes[15].flags"].size) == (404, 4)
    assert disp["hdr.padding"].size == 3
    assert msg["iotlb.perm"].offset == 32 and msg["padding"].offset == 8  # anonymous union at 8


def test_main_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert lc.main([]) == 0
    assert "0 mismatched" in capsys.readouterr().out
    wrong = Struct("addr" / Int64ul, "length" / Int32ul, "oops" / Int32ul)
    monkeypatch.setattr(lc, "REGISTRY", [reg.LayoutEntry(GPU_H, "virtio_gpu_mem_entry", wrong)])
    assert lc.main([]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_script_runs_standalone() -> None:
    proc = subprocess.run([sys.executable, str(TOOLS / "layoutcheck.py")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "virtio_gpu_ctrl_hdr" in proc.stdout


# --- Xen: the driver UAPI as the lab's dom0 kernel compiled it ---------------------------------------------------


def test_xen_uapi_matches_the_dom0_kernel() -> None:
    """Our privcmd, gntdev, gntalloc and grant-table layouts against the DWARF of the dom0 kernel's own objects
    (built once with the kernel by vgpu_lab.kernel_build, profile xen-dom0)."""
    from tests.conftest import unavailable
    from vgpu_lab import kernel_build
    from vgpu_lab.shell import ProvisionError

    # Only a finished build is read: a unit test never starts minutes of compiling. tools/test builds this kernel
    # before pytest starts (with its progress in the log), so in CI a missing one is a failure.
    try:
        kernel = kernel_build.find_patched_kernel(profile=kernel_build.XEN_DOM0)
    except (ProvisionError, kernel_build.KernelBuildError, OSError) as exc:
        unavailable(f"the Xen dom0 kernel: {exc}")
    if kernel is None:
        unavailable("the Xen dom0 kernel (python -m vgpu_lab.kernel_build --profile xen-dom0 builds it)")
    results = lc.check_objects(reg.XEN_REGISTRY, kernel.dwarf_dir)
    assert {r.entry.c_name: r.problems for r in results if not r.ok} == {}, lc.format_table(results)
    assert all(r.c_size is not None and r.c_size == r.our_size for r in results)


def test_xen_ioctl_numbers_come_from_the_checked_sizes() -> None:
    """``_IOC(_IOC_NONE, 'P'/'G', nr, sizeof)``, with the sizes the DWARF check above holds us to."""
    from vgpu.vhost_user import xen_uapi as x

    assert x.IOCTL_PRIVCMD_HYPERCALL == 0x305000
    assert x.IOCTL_PRIVCMD_MMAPBATCH_V2 == 0x205004
    assert x.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700
    assert x.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x104701
    assert x.IOCTL_GNTALLOC_ALLOC_GREF == 0x184705
    assert x.IOCTL_GNTALLOC_DEALLOC_GREF == 0x104706


def test_the_xen_checker_fails_on_a_wrong_layout(tmp_path: Path) -> None:
    """The object-file path of the checker notices a moved field too (on an object compiled here)."""
    src = tmp_path / "x.c"
    src.write_text("struct grant_entry_v1 { unsigned short flags; unsigned short domid; unsigned int frame; };\n"
                   "struct grant_entry_v1 g;\n")
    subprocess.run(["gcc", "-g", "-c", "-o", str(tmp_path / "x.o"), str(src)], check=True)
    wrong = Struct("flags" / Int16ul, "frame" / Int32ul, "domid" / Int16ul)
    [res] = lc.check_objects([reg.LayoutEntry("x.o", "grant_entry_v1", wrong)], tmp_path)
    assert any(pr.startswith("domid: C at 2+2") for pr in res.problems), res.problems
    [res] = lc.check_objects([reg.LayoutEntry("x.o", "grant_entry_v1", "vgpu.vhost_user.xen_uapi:grant_entry_v1")],
                             tmp_path)
    assert res.ok, res.problems


# --- constants against the header ----------------------------------------------------------------------------

_ENUMS: list[type[IntEnum] | type[IntFlag]] = [
    k.CtrlType, k.GpuFeature, k.Format, k.BlobMem, k.MapCache, k.Capset, k.ShmId, k.CtrlFlag, k.BlobFlag, k.Event
]  # fmt: skip


def our_value(c_name: str) -> int | None:
    if hasattr(k, c_name):
        v = getattr(k, c_name)
        return int(v) if isinstance(v, int) else None
    short = c_name.removeprefix("VIRTIO_GPU_")
    for enum in _ENUMS:
        if short in enum.__members__:
            return int(enum.__members__[short])
    return None


def test_constants_match_header() -> None:
    c = lc.c_constants([GPU_H], "VIRTIO_GPU_")
    assert len(c) > 60
    mismatched = {n: (v, our_value(n)) for n, v in c.items() if our_value(n) != v}
    assert mismatched == {}
