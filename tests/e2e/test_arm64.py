"""End to end on arm64: the memory type an arm64 guest's kernel used for each map_info our device sent, read from
the guest's own page table.

QEMU 11.1's ``qemu-system-aarch64`` (TCG, ``-M virt -cpu max``, sid chroot) boots Debian's arm64 6.12 kernel with
four GPUs, each served by its own back end on this x86 host: one answers CACHED (the memfd allocator's knowledge),
one WC (an operator override), one UNCACHED (an override, the guest declared x86_64: what a back end that does not
know its guest sends) and one UNCACHED again but with ``--guest-arch=aarch64``, which sends WC instead.  On each,
the guest maps a host blob, ``vgpu_pte.ko`` reads the page-table entry of the mapping (AttrIndx through MAIR_EL1),
bytes go both ways, and a plain unaligned ``memcpy`` into the mapping is tried in a child process.

What must hold: the memory type follows map_info (CACHED -> Normal write-back, WC -> Normal non-cacheable,
UNCACHED -> Device-nGnRnE), the entry maps the device's window at the offset the back end mapped the blob at, and
the memcpy dies of SIGBUS exactly on Device memory — why an arm64 guest is sent WC for an uncached buffer.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import component, shown
from vgpu_lab import provision
from vgpu_lab.arm64.boot import MEMORY_TYPE, Arm64BlobRun, DeviceRun, map_info_devices, run_blob_devices
from vgpu_lab.arm64.lab import Arm64Lab

STEPS = ("params", "context", "ring", "init", "reqs", "blob", "mmap", "pte", "write", "host", "unaligned", "done")
NAMES = {1: "CACHED", 2: "UNCACHED", 3: "WC"}


@pytest.fixture(scope="module")
def arm64(request: pytest.FixtureRequest, provisioner: provision.Provisioner) -> Arm64Lab:
    with shown(request):
        lab: Arm64Lab = component("arm64 (qemu-system-aarch64 in the sid chroot, Debian's arm64 6.12, cross gcc)",
                                  provisioner.arm64)
    return lab


def check_device(run: Arm64BlobRun, d: DeviceRun, map_info: int, provenance: str) -> None:
    context = f"device {d.device.name!r} in slot {d.slot}\n{run.describe()}"
    steps = d.steps
    for step in STEPS:
        assert steps.get(step, "").startswith("ok"), f"{step}: {steps.get(step)}\n{context}"
    # What the back end sent, in the image requirements and in MAP_BLOB, is what the guest was told.
    m = d.map_log
    assert m is not None, context
    assert (m[4], d.guest_map_info) == (NAMES[map_info], map_info), context
    assert m[5].startswith(provenance), m[0]
    # The guest kernel's page table: the memory type our map_info asks for, at the window address of our mapping.
    pte = d.pte
    assert pte is not None, context
    assert pte.memory_type == MEMORY_TYPE[map_info], f"{pte}\n{context}"
    assert pte.level == 3
    base, size = run.windows()[d.slot]
    assert size == 1 << 30 and pte.output_address == base + int(m[2], 16), f"{pte} window {base:#x}\n{context}"
    # The bytes went both ways through that very mapping.
    assert d.saw_guest_pattern and not d.host_error, context
    # Device memory faults on an unaligned access; Normal memory, cacheable or not, takes it.
    want = signal.SIGBUS if pte.memory_type.startswith("Device") else 0
    assert d.unaligned_signal == want, context
    assert "unmapped blob" in d.backend_output and d.released, context


def test_arm64_memory_types_follow_map_info(arm64: Arm64Lab, tmp_path: Path) -> None:
    devices = map_info_devices(tmp_path)
    run = run_blob_devices(arm64, tmp_path, [d for d, _, _ in devices])
    print(f"arm64 boot with {len(devices)} GPUs: {run.wall:.2f} s wall (QEMU {run.guest.elapsed:.2f} s)")
    for d in run.devices:
        print(f"  {d.device.name}: map_info {d.guest_map_info} -> {d.pte}; unaligned memcpy: signal "
              f"{d.unaligned_signal}")
    assert not run.guest.timed_out and run.guest.returncode == 0 and run.guest.guest_status == 0, run.describe()
    assert run.guest.dmesg.count("[drm] features: +virgl +edid +resource_blob +host_visible") == len(devices)
    for d, (_, map_info, provenance) in zip(run.devices, devices, strict=True):
        check_device(run, d, map_info, provenance)
    # The last device's back end says why it did not send what the host maps.
    last = run.devices[-1].map_log
    assert last is not None and "host mapping UNCACHED, sent as WC to an aarch64 guest" in last[5]
