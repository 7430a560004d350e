"""The arm64 lab's pieces that need no QEMU: the headers' Makefile rewrite, the QEMU command line, the guest command
and how a boot's serial lines are read back (the page-table line, steps per card)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpu_lab.arm64.boot import DeviceRun, Pte, _split_lines, guest_command, map_info_devices, qemu_command
from vgpu_lab.arm64.lab import Arm64Lab
from vgpu_lab.arm64.packages import Arm64Kernel, _point_makefile_at
from vgpu_lab.shell import ProvisionError
from vgpu_lab.sid import SidQemu

#: What the guest printed for card 1 in a real boot (WC, Normal-NC).
CARD_1 = [
    "VGPU-GUEST card 1 0000:00:02.0",
    "VGPU-GUEST reqs ok stride=256 size=16384 blob_id=1 map_info=3",
    "VGPU-GUEST pte ok va=0xffff98d95000 level=3 entry=0x168008040000ccb attrindx=2 mair=0x44 type=Normal-NC",
    "VGPU-GUEST unaligned ok signal=0",
]


def _lab(tmp_path: Path) -> Arm64Lab:
    kernel = Arm64Kernel(abi="6.12.118+deb12", version="6.12.118-1~deb12u1", root=tmp_path / "k", busybox_version="x")
    qemu = SidQemu(root=Path("/c/sid"), version="11.1.3", package_version="x")
    return Arm64Lab(qemu=qemu, kernel=kernel, applets=(), programs={}, pte_module=tmp_path / "m.ko")


def test_the_headers_makefile_names_the_unpacked_tree(tmp_path: Path) -> None:
    headers = tmp_path / "h"
    headers.mkdir()
    (headers / "Makefile").write_text("include /usr/src/linux-headers-6.12.118+deb12-common/Makefile\n")
    _point_makefile_at(headers, Path("/cache/arm64/kernel/x"))
    assert (headers / "Makefile").read_text() == \
        "include /cache/arm64/kernel/x/usr/src/linux-headers-6.12.118+deb12-common/Makefile\n"
    with pytest.raises(ProvisionError, match="does not include /usr/src"):
        _point_makefile_at(headers, Path("/elsewhere"))  # already rewritten: nothing left to point


def test_qemu_command_one_generic_gpu_per_socket_in_its_slot(tmp_path: Path) -> None:
    lab = _lab(tmp_path)
    cmd = qemu_command(lab, [Path("/tmp/s")], initrd=Path("/tmp/w/initrd.gz"),
                       sockets=[Path("/tmp/s/vgpu0.sock"), Path("/tmp/s/vgpu1.sock")])
    words = cmd[cmd.index("/usr/bin/qemu-system-aarch64"):]
    assert cmd[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert words[words.index("-M") + 1] == "virt,memory-backend=mem" and words[words.index("-cpu") + 1] == "max"
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in words
    assert words[words.index("-kernel") + 1] == str(tmp_path / "k/boot/vmlinuz-6.12.118+deb12-arm64")
    devices = [words[i + 1] for i, w in enumerate(words) if w == "-device"]
    assert devices == [f"vhost-user-test-device-pci,chardev=vgpu{i},virtio-id=16,num_vqs=2,config_size=16,"
                       f"addr={i + 1:#x}" for i in range(2)]
    assert [words[i + 1] for i, w in enumerate(words) if w == "-chardev"] == \
        ["socket,id=vgpu0,path=/tmp/s/vgpu0.sock", "socket,id=vgpu1,path=/tmp/s/vgpu1.sock"]


def test_guest_command_names_each_card_before_mapping_on_it() -> None:
    cmd = guest_command(3, 64, 32, 30)
    assert cmd.startswith("bad=0; insmod /lib/vgpu_pte.ko && for c in 0 1 2; do ")
    assert "/bin/blob_map 64 32 30 /dev/dri/card$c || bad=1" in cmd and cmd.endswith("[ $bad -eq 0 ]")


def test_serial_lines_go_to_their_card_and_decode(tmp_path: Path) -> None:
    devices = [d for d, _, _ in map_info_devices(tmp_path)]
    runs = [DeviceRun(d, f"0000:00:{i + 1:02x}.0") for i, d in enumerate(devices)]
    _split_lines(["VGPU-GUEST card 0 0000:00:01.0", "VGPU-GUEST reqs ok map_info=1", *CARD_1], runs)
    assert runs[0].lines == ["VGPU-GUEST reqs ok map_info=1"] and runs[1].lines == CARD_1[1:]
    assert runs[2].lines == [] and runs[2].pte is None
    d = runs[1]
    assert (d.guest_map_info, d.unaligned_signal) == (3, 0)
    assert d.pte == Pte(0xFFFF98D95000, 3, 0x168008040000CCB, 2, 0x44, "Normal-NC")
    # The entry maps the second card's window base (BAR 4 at 0x8040000000).
    assert d.pte.output_address == 0x80_4000_0000
    # The rules files the devices name exist and say what their name says.
    assert (tmp_path / "uncached.toml").read_text() == '[allocator_overrides]\nmemfd = "uncached"\n'
