"""The sid chroot's wrapper and records (:mod:`vgpu_lab.sid`), without QEMU: the mount-namespace script, the device
it configures, version parsing, mountinfo reading, and that a half-made root is never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vgpu_lab import sid
from vgpu_lab.qemu import VHOST_USER_TEST_DEVICE_GPU, QemuConfig, qemu_command
from vgpu_lab.shell import ProvisionError


def test_namespace_prefix_binds_parents_first_and_execs_chroot() -> None:
    prefix = sid.namespace_prefix(Path("/c/sid"), [Path("/tmp/a b/c"), Path("/tmp/a b"), Path("/k")])
    assert prefix[:4] == ("unshare", "--mount", "--propagation", "private")
    script = prefix[prefix.index("-c") + 1]
    lines = script.splitlines()
    assert lines[0] == "set -e" and lines[-1] == 'exec chroot /c/sid "$@"'
    assert "mount --rbind /dev /c/sid/dev" in lines and "mount -t proc proc /c/sid/proc" in lines
    binds = [line for line in lines if line.startswith("mount --bind ")]
    assert binds == ["mount --bind /k /c/sid/k", "mount --bind '/tmp/a b' '/c/sid/tmp/a b'",
                     "mount --bind '/tmp/a b/c' '/c/sid/tmp/a b/c'"]
    # Appended words become "$@": the wrapper composes with qemu_command.
    cmd = qemu_command(kernel=Path("/k/vmlinuz"), initrd=Path("/i"), socket_path=Path("/tmp/s"),
                       config=QemuConfig(command_prefix=prefix))
    assert cmd[len(prefix)] == "/usr/bin/qemu-system-x86_64"


def test_sid_qemu_config_uses_the_generic_device() -> None:
    q = sid.SidQemu(root=Path("/c/sid"), version="11.1.3", package_version="1:11.1.3+ds-1")
    config = q.config([Path("/tmp/x")])
    assert config.device == VHOST_USER_TEST_DEVICE_GPU and "config_size=16" in VHOST_USER_TEST_DEVICE_GPU
    assert config.qemu == Path("/usr/bin/qemu-system-x86_64") and config.command_prefix[0] == "unshare"


def test_qemu_version_parsing() -> None:
    text = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\nCopyright (c) 2003-2025 Fabrice Bellard\n"
    assert sid.parse_qemu_version(text) == (11, 1, 3)
    assert sid.parse_qemu_version("QEMU emulator version 12.0") == (12, 0, 0)
    with pytest.raises(ProvisionError):
        sid.parse_qemu_version("qemu-system-x86_64: not found")


def test_mounts_under_reads_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "90 1 0:5 / /c/sid/dev rw - devtmpfs udev rw\n"
        "91 1 0:5 / /c/sid\\040x/dev rw - devtmpfs udev rw\n"
        "92 1 0:5 / /c/sidney rw - tmpfs t rw\n"
    )
    assert sid.mounts_under(Path("/c/sid"), info) == ["/c/sid/dev"]
    assert sid.mounts_under(Path("/c/sid x"), info) == ["/c/sid x/dev"]


def test_incomplete_root_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "sid"
    (root / "usr" / "bin").mkdir(parents=True)
    assert sid._read_record(root) is None  # no record at all
    record = {"format": 1, "root": str(root), "version": "11.1.3", "package_version": "x",
              "packages": list(sid.SID_PACKAGES)}
    (tmp_path / "sid.json").write_text(json.dumps(record))
    assert sid._read_record(root) is None  # record, but no QEMU in the tree
    (root / "usr" / "bin" / "qemu-system-x86_64").write_text("")
    (root / "usr" / "bin" / "apt-get").write_text("")
    assert sid._read_record(root) is None  # the x86 emulator alone: the arm64 guest's is missing
    (root / "usr" / "bin" / "qemu-system-aarch64").write_text("")
    cached = sid._read_record(root)
    assert cached is not None and cached.version == "11.1.3"
    # A record written before qemu-system-arm joined the packages is redone (apt adds only what is missing).
    (tmp_path / "sid.json").write_text(json.dumps({**record, "packages": ["qemu-system-x86", "qemu-system-gui"]}))
    assert sid._read_record(root) is None
