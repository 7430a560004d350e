"""The guest programs' headers and the patched kernel's build recipe (:mod:`vgpu_lab.kernel_build`), without
building: one copy of the proposed UAPI header, and the config check."""

from __future__ import annotations

from pathlib import Path

from vgpu_lab import guest, kernel_build

REPO = Path(__file__).resolve().parent.parent


def test_the_guest_program_compiles_against_the_one_spec_header() -> None:
    """No copy of spec/dma-buf-info.h beside the guest programs: they are built with spec/ on the include path, and
    a change of the header changes every program's build key."""
    assert not list(guest.SOURCE_DIR.glob("dma*buf*info*.h"))
    assert '#include "dma-buf-info.h"' in (guest.SOURCE_DIR / "dmabuf_info.c").read_text()
    assert REPO / "spec" in guest.include_dirs() and (REPO / "spec" / "dma-buf-info.h").is_file()


def test_fragment_parsing_catches_dropped_options() -> None:
    """The olddefconfig check: a fragment option that did not survive is named; ``=n`` may vanish entirely."""
    fragment = kernel_build.parse_fragment("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=n\nCONFIG_D=\"x\"\n")
    assert fragment == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "n", "CONFIG_D": '"x"'}
    final = kernel_build.parse_dotconfig("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=\"x\"\n")
    assert kernel_build.dropped_options(fragment, final) == []
    final = kernel_build.parse_dotconfig("# CONFIG_A is not set\nCONFIG_C=y\n")
    assert kernel_build.dropped_options(fragment, final) == [
        "CONFIG_A wanted y, got not set",
        "CONFIG_C wanted n, got y",
        'CONFIG_D wanted "x", got not set',
    ]


