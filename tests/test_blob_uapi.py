"""The blob layer's ioctl structs and numbers against the kernel's own headers, compiled by gcc.

Layouts go through the shared DWARF checker (tools/layoutcheck.py); ioctl numbers are printed by a C program
that expands the UAPI macros themselves, so our ``_IOC`` arithmetic is compared with the preprocessor's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vgpu.blob import uapi
from vgpu.vhost_user.layout import struct_of

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import layout_registry as reg  # noqa: E402
import layoutcheck as lc  # noqa: E402

BLOB_STRUCTS = {
    "dma_buf_sync",
    "dma_buf_info",
    "udmabuf_create",
    "dma_heap_allocation_data",
    "drm_version",
    "drm_mode_create_dumb",
    "drm_mode_destroy_dumb",
}


def test_blob_structs_are_registered_and_match_dwarf() -> None:
    entries = [e for e in reg.REGISTRY if e.ours_label.startswith("vgpu.blob.uapi:")]
    assert {e.c_name for e in entries} >= BLOB_STRUCTS
    results = lc.check_entries(entries)
    assert all(r.ok and r.c_size == r.our_size for r in results), lc.format_table(results, verbose=True)
    sizes = {r.entry.c_name: r.c_size for r in results}
    assert sizes["dma_buf_info"] == 16  # exactly the posted proposal
    assert sizes["drm_version"] == 64


def test_layoutcheck_tool_passes_with_blob_entries() -> None:
    proc = subprocess.run([sys.executable, str(TOOLS / "layoutcheck.py")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in BLOB_STRUCTS:
        assert any(line.startswith(name + " ") and line.endswith("ok") for line in proc.stdout.splitlines()), name


def test_drm_headers_source_is_stated() -> None:
    # This host's linux-libc-dev has no drm/ headers: the registry must then fall back to the lab's copy.
    if reg.SYSTEM_DRM_H is None:
        assert reg.DRM_H == reg.LAB_DRM_UAPI_H and Path(reg.DRM_H).is_file()
        assert not any(e.c_name == "drm_prime_handle" for e in reg.REGISTRY)
    else:
        assert any(e.c_name == "drm_prime_handle" for e in reg.REGISTRY)


def test_a_wrong_dma_buf_info_layout_is_caught() -> None:
    from construct import Int32ul, Int64ul, Struct

    wrong = Struct("param" / Int32ul, "value" / Int64ul)  # forgot the pad: 12 bytes, value at 4
    [res] = lc.check_entries([reg.LayoutEntry(reg.DMA_BUF_INFO_H, "dma_buf_info", wrong)])
    assert "size: C 16 != ours 12" in res.problems


C_IOCTLS = {
    "DMA_BUF_IOCTL_SYNC": "linux/dma-buf.h",
    "DMA_BUF_IOCTL_INFO": reg.DMA_BUF_INFO_H,
    "UDMABUF_CREATE": "linux/udmabuf.h",
    "DMA_HEAP_IOCTL_ALLOC": "linux/dma-heap.h",
    "DRM_IOCTL_VERSION": reg.DRM_H,
    "DRM_IOCTL_MODE_CREATE_DUMB": reg.DRM_H,
    "DRM_IOCTL_MODE_DESTROY_DUMB": reg.DRM_H,
}


def test_ioctl_numbers_match_the_c_macros(tmp_path: Path) -> None:
    headers = dict.fromkeys(C_IOCTLS.values())
    src = "#include <stdio.h>\n" + "".join(f"#include <{h}>\n" for h in headers)
    src += "int main(void) {\n"
    src += "".join(f'  printf("{n} %lu\\n", (unsigned long)({n}));\n' for n in C_IOCTLS)
    src += "  return 0;\n}\n"
    (tmp_path / "n.c").write_text(src)
    subprocess.run(["gcc", "-o", str(tmp_path / "n"), str(tmp_path / "n.c")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "n")], check=True, capture_output=True, text=True).stdout
    from_c = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert from_c == {name: uapi.IOCTLS[name] for name in C_IOCTLS}


def test_ioctl_numbers_pinned() -> None:
    # DMA_BUF_IOCTL_INFO as posted; drm_prime_handle's number checked once against Debian's libdrm-dev 2.4.114
    # drm.h (not installed here), pinned so a layout change cannot slip through.
    assert uapi.DMA_BUF_IOCTL_INFO == 0xC0106202
    assert uapi.DMA_BUF_IOCTL_INFO != 0xC0086202  # mainline's EXPORT_SYNC_FILE, same nr, 8-byte struct
    assert uapi.DRM_IOCTL_PRIME_HANDLE_TO_FD == 0xC00C642D
    assert uapi.drm_prime_handle.sizeof() == 12


def test_dma_buf_info_pad_defaults_to_zero() -> None:
    raw = uapi.dma_buf_info.build({"param": uapi.DMA_BUF_INFO_MAP_ATTR, "value": 0})
    assert raw == (2).to_bytes(4, "little") + bytes(12)


@pytest.mark.parametrize(("param", "pad", "value"), [(1, 0, 0), (0xFFFFFFFF, 7, (1 << 64) - 1), (2, 0, 1 << 40)])
def test_dma_buf_info_struct_codec_agrees_with_construct(param: int, pad: int, value: int) -> None:
    # The ioctl's hot path packs and unpacks through the struct derived from the construct layout (Default
    # included): both must give the same 16 bytes.
    st = struct_of(uapi.dma_buf_info)
    raw = uapi.dma_buf_info.build({"param": param, "pad": pad, "value": value})
    assert st.pack(param, pad, value) == raw
    assert st.unpack(raw) == (param, pad, value)


@pytest.mark.parametrize("size", [-1, 1 << 14])
def test_ioc_refuses_sizes_the_encoding_cannot_hold(size: int) -> None:
    with pytest.raises(ValueError, match="_IOC_SIZEBITS"):
        uapi._ioc(3, "b", 2, size)
