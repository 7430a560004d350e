"""Fast checks of the lab's pieces that need no QEMU: apt source parsing, the cpio writer, module ordering,
the guest pixel formulas against the C source, serial-log parsing and back-end process handling."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vgpu_lab import apt_sources, dmabuf_guest, guest, initramfs, patterns, provision
from vgpu_lab.qemu import VHOST_USER_TEST_DEVICE_GPU, Backend, GuestRun, LabError, QemuConfig, qemu_command
from vgpu_lab.shell import ProvisionError

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed (python -m vgpu_lab.provision toolchain)")


# -- apt sources -----------------------------------------------------------------------------------------------

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/archive/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/archive/debian-security
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: http://disabled.example/archive/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_deb822_parsing_keeps_continuations_and_flags() -> None:
    sources = apt_sources.parse_deb822_sources(DEB822, Path("x.sources"))
    assert len(sources) == 3
    assert sources[0].uris == ("http://mirror.example/archive/debian",)
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    assert sources[1].signed_by is not None and "BEGIN PGP" in sources[1].signed_by
    assert not sources[2].enabled


def test_mirror_is_the_codename_entry_not_security() -> None:
    sources = [s for s in apt_sources.parse_deb822_sources(DEB822, Path("x.sources")) if s.enabled]
    assert apt_sources.debian_mirror(sources, "bookworm").uris[0] == "http://mirror.example/archive/debian"
    with pytest.raises(ProvisionError):
        apt_sources.debian_mirror(sources, "trixie")


def test_one_line_sources() -> None:
    text = (
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/archive/debian bookworm main contrib\n"
        "deb-src http://m.example/archive/debian bookworm main\n"
    )
    sources = apt_sources.parse_one_line_sources(text, Path("sources.list"))
    assert [s.types for s in sources] == [("deb",), ("deb-src",)]
    assert sources[0].signed_by == "/k.gpg"
    assert sources[0].components == ("main", "contrib")
    assert apt_sources.debian_mirror(sources, "bookworm").uris == ("http://m.example/archive/debian",)


def test_backports_source_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc_apt = tmp_path / "apt"
    (etc_apt / "sources.list.d").mkdir(parents=True)
    (etc_apt / "sources.list.d" / "debian.sources").write_text(DEB822)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    p = provision.Provisioner(tmp_path / "cache", etc_apt=etc_apt, apt_lists=tmp_path / "lists")
    written = p.ensure_backports_source()
    assert written is not None
    text = written.read_text()
    assert "URIs: http://mirror.example/archive/debian\n" in text
    assert f"Suites: {p.backports_suite()}\n" in text
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in text
    assert p.ensure_backports_source() is None
    assert (tmp_path / "cache" / ".gitignore").read_text().splitlines()[-1] == "*"


def test_version_major() -> None:
    assert provision._version_major("1:10.0.2+ds-2+deb13u1~bpo12+1") == 10
    assert provision._version_major("1:7.2+dfsg-7+deb12u13") == 7


# -- cpio --------------------------------------------------------------------------------------------------------


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A minimal newc reader, independent of the writer: (name, mode, data, rdev) per entry."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = (fields[1], fields[6], fields[9], fields[10], fields[11])
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append((name, mode, body, (rdevmajor, rdevminor)))


def test_cpio_writer_round_trip_and_parent_order() -> None:
    writer = initramfs.CpioWriter()
    writer.add_file("/usr/share/x/hello.txt", b"hello", 0o640)
    writer.add_symlink("bin/sh", "busybox")
    writer.add_char_device("dev/console", 5, 1)
    writer.add_dir("usr/share")
    data = writer.finish()
    entries = read_newc(data)
    names = [e[0] for e in entries]
    assert names == ["usr", "usr/share", "usr/share/x", "usr/share/x/hello.txt", "bin", "bin/sh", "dev", "dev/console"]
    by_name = {e[0]: e for e in entries}
    assert by_name["usr/share/x/hello.txt"][2] == b"hello"
    assert stat.S_IMODE(by_name["usr/share/x/hello.txt"][1]) == 0o640
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"busybox"
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][3] == (5, 1)
    with pytest.raises(initramfs.InitramfsError):
        writer.add_file("late", b"")


def test_cpio_rejects_duplicates_and_escapes() -> None:
    writer = initramfs.CpioWriter()
    writer.add_file("a", b"")
    with pytest.raises(initramfs.InitramfsError):
        writer.add_file("/a", b"")
    with pytest.raises(initramfs.InitramfsError):
        writer.add_file("../etc/passwd", b"")


# -- kernel modules ---------------------------------------------------------------------------------------------


def make_module(directory: Path, file_name: str, depends: str, gcc: str) -> None:
    """A fake module: an ELF object whose .modinfo holds name= and depends=, xz-compressed like Debian's."""
    source = directory / "m.c"
    name = initramfs.module_name(file_name)
    source.write_text(
        f'__attribute__((section(".modinfo"), used)) static const char info[] = "name={name}\\0depends={depends}";\n'
    )
    obj = directory / "m.o"
    subprocess.run([gcc, "-c", "-o", str(obj), str(source)], check=True, timeout=60)
    target = directory / "kernel" / file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(lzma.compress(obj.read_bytes()))


@needs_gcc
def test_module_load_order_follows_depends(tmp_path: Path) -> None:
    assert GCC is not None
    make_module(tmp_path, "virtio-gpu.ko.xz", "drm_kms_helper,drm,virtio_dma_buf", GCC)
    make_module(tmp_path, "drm_kms_helper.ko.xz", "drm", GCC)
    make_module(tmp_path, "drm.ko.xz", "", GCC)
    make_module(tmp_path, "virtio_dma_buf.ko.xz", "virtio_pci", GCC)
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    tree = initramfs.ModuleTree(tmp_path)
    order = [m.name for m in tree.load_order(["virtio-gpu", "drm"])]
    assert order == ["drm", "drm_kms_helper", "virtio_dma_buf", "virtio_gpu"]
    assert tree.load_order(["virtio_pci"]) == []
    with pytest.raises(initramfs.InitramfsError, match="neither"):
        tree.load_order(["nowhere"])
    assert initramfs.read_module_bytes(tree.module("drm").path)[:4] == b"\x7fELF"


@needs_gcc
def test_module_cycle_is_reported(tmp_path: Path) -> None:
    assert GCC is not None
    make_module(tmp_path, "a.ko.xz", "b", GCC)
    make_module(tmp_path, "b.ko.xz", "a", GCC)
    with pytest.raises(initramfs.InitramfsError, match="cycle"):
        initramfs.ModuleTree(tmp_path).load_order(["a"])


def test_init_script_shape() -> None:
    script = initramfs.init_script(["drm.ko", "virtio_gpu.ko"], "/bin/prog 1", wait_timeout=2)
    lines = script.strip().splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[-1] == "poweroff -f"
    assert script.index("insmod /lib/modules/drm.ko") < script.index("insmod /lib/modules/virtio_gpu.ko")
    assert "mount -t devtmpfs devtmpfs /dev" in script
    assert "-lt 20 ]" in script
    assert f'echo "{initramfs.END_MARKER} rc=$rc' in script


def test_the_chroot_of_the_host_root_hides_no_host_path() -> None:
    """Every mount into the chroot but the 9p root itself lands where the guest's own /dev, /proc, /sys already
    cover the host (a tmpfs on the chroot's /tmp once hid a checkout living under the host's /tmp)."""
    root = dmabuf_guest.GUEST_HOST_ROOT
    targets = [line.split()[-1] for line in dmabuf_guest.chroot_mounts() if line.startswith("mount ")]
    assert targets[0] == root
    inside = [Path(t.removeprefix(root)) for t in targets[1:]]
    assert inside and all(t.startswith(root + "/") for t in targets[1:])
    assert dmabuf_guest.shadowed(inside) == inside
    assert Path(dmabuf_guest.GUEST_SCRATCH) in inside
    paths = [Path("/tmp/co/.venv/bin/python"), Path("/dev/shm/co"), Path("/sys"), Path("/devices"), Path("/procx")]
    assert dmabuf_guest.shadowed(paths) == [Path("/dev/shm/co"), Path("/sys")]


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="busybox is not installed")
def test_initramfs_has_no_busybox_self_link(tmp_path: Path) -> None:
    out = initramfs.build_initramfs(
        tmp_path / "i.gz", busybox=Path("/bin/busybox"), command="true", modules=(), files={"/etc/x": b"y"}
    )
    entries = {e[0]: e for e in read_newc(gzip.decompress(out.read_bytes()))}
    assert stat.S_ISREG(entries["bin/busybox"][1])
    assert entries["bin/sh"][2] == b"../bin/busybox"
    assert entries["usr/bin/timeout"][2] == b"../../bin/busybox"
    assert stat.S_IMODE(entries["init"][1]) == 0o755
    assert entries["etc/x"][2] == b"y"
    # Reproducible: the same inputs give the same bytes.
    again = initramfs.build_initramfs(
        tmp_path / "j.gz", busybox=Path("/bin/busybox"), command="true", modules=(), files={"/etc/x": b"y"}
    )
    assert again.read_bytes() == out.read_bytes()


# -- pixel formulas: Python against the C source ---------------------------------------------------------------

HARNESS = r"""
#define main kms_pattern_main
#include "kms_pattern.c"
#undef main
int main(int argc, char **argv)
{
    uint32_t w = (uint32_t)atoi(argv[1]), h = (uint32_t)atoi(argv[2]);
    for (uint32_t y = 0; y < h; y++)
        for (uint32_t x = 0; x < w; x++) { uint32_t p = frame_pixel(x, y); fwrite(&p, 4, 1, stdout); }
    for (uint32_t y = 0; y < CURSOR_SIZE; y++)
        for (uint32_t x = 0; x < CURSOR_SIZE; x++) { uint32_t p = cursor_pixel(x, y); fwrite(&p, 4, 1, stdout); }
    return 0;
}
"""


@needs_gcc
def test_patterns_match_the_guest_program(tmp_path: Path) -> None:
    assert GCC is not None
    harness = tmp_path / "harness.c"
    harness.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run([GCC, "-O2", "-I", str(guest.SOURCE_DIR), "-o", str(exe), str(harness)], check=True, timeout=120)
    width, height = 1280, 800
    out = subprocess.run([str(exe), str(width), str(height)], capture_output=True, check=True, timeout=60).stdout
    frame = patterns.as_bytes(patterns.frame_pixels(width, height))
    assert out[: len(frame)] == frame
    assert out[len(frame) :] == patterns.as_bytes(patterns.cursor_pixels())


def test_frame_pixels_are_unique_and_spot_checked() -> None:
    frame = patterns.frame_pixels(4096, 4096)
    # Every pixel decodes back to its own coordinates, so no two pixels are equal.
    x = ((frame >> 16) & 0xFF) | ((frame >> 4) & 0xF) << 8
    y = ((frame >> 8) & 0xFF) | (frame & 0xF) << 8
    assert np.array_equal(x, np.broadcast_to(np.arange(4096, dtype=np.uint32), frame.shape))
    assert np.array_equal(y, np.broadcast_to(np.arange(4096, dtype=np.uint32)[:, np.newaxis], frame.shape))
    assert np.all(frame >> 24 == 0xFF)
    assert int(frame[0x123, 0x456]) == patterns.frame_pixel(0x456, 0x123)
    assert int(patterns.cursor_pixels()[5, 7]) == patterns.cursor_pixel(7, 5)


@needs_gcc
def test_guest_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    assert GCC is not None
    first = guest.build_program("kms_pattern", tmp_path, gcc=Path(GCC))
    mtime = first.stat().st_mtime_ns
    assert guest.build_program("kms_pattern", tmp_path, gcc=Path(GCC)) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "guest").iterdir()] == [first.name]


# -- QEMU command and serial parsing ---------------------------------------------------------------------------


def test_qemu_command_shape() -> None:
    cmd = qemu_command(
        kernel=Path("/k"),
        initrd=Path("/i"),
        socket_path=Path("/s/sock"),
        config=QemuConfig(
            device=VHOST_USER_TEST_DEVICE_GPU, extra_args=("-virtfs", "x"), command_prefix=("chroot", "/c")
        ),
    )
    assert cmd[:3] == ["chroot", "/c", "/usr/bin/qemu-system-x86_64"]
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in cmd
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert cmd[cmd.index("-chardev") + 1] == "socket,id=vgpu,path=/s/sock"
    assert cmd[cmd.index("-device") + 1].startswith("vhost-user-test-device-pci,chardev=vgpu,virtio-id=16")
    assert cmd[-2:] == ["-virtfs", "x"]
    assert "-device" not in qemu_command(kernel=Path("/k"), initrd=Path("/i"), socket_path=None)
    assert cmd[cmd.index("-display") + 1] == "none"  # headless unless asked
    dbus = qemu_command(kernel=Path("/k"), initrd=Path("/i"), socket_path=None,
                        config=QemuConfig(display="dbus,addr=unix:path=/b,gl=off"))
    assert dbus[dbus.index("-display") + 1] == "dbus,addr=unix:path=/b,gl=off"


def test_guest_run_parsing() -> None:
    serial = (
        "[    0.1] boot\r\n"
        "VGPU-GUEST modeset ok 1280x800\r\n"
        f"{initramfs.DMESG_BEGIN}\r\n[    2.6] [drm] features: -virgl +edid\r\n{initramfs.DMESG_END}\r\n"
        f"{initramfs.END_MARKER} rc=3 uptime=3.4\r\n"
    )
    run = GuestRun(command=("q",), returncode=0, timed_out=False, elapsed=1.0, serial=serial, stderr="")
    assert run.guest_status == 3
    assert run.dmesg == "[    2.6] [drm] features: -virgl +edid"
    assert run.guest_lines() == ["VGPU-GUEST modeset ok 1280x800"]
    empty = GuestRun(command=("q",), returncode=None, timed_out=True, elapsed=1.0, serial="", stderr="")
    assert empty.guest_status is None and empty.dmesg == "" and "timed out" in empty.describe()


# -- back-end process handling ----------------------------------------------------------------------------------

LISTENER = (
    "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); "
    "print('listening', flush=True); time.sleep(60)"
)


def test_backend_starts_waits_for_socket_and_stops(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    with Backend([sys.executable, "-c", LISTENER, "{sock}"], sock) as backend:
        assert backend.running
        assert stat.S_ISSOCK(sock.stat().st_mode)
    assert not backend.running
    assert backend.returncode is not None and backend.returncode != 0
    assert "listening" in backend.output
    backend.close()


def test_backend_that_dies_early_is_an_error(tmp_path: Path) -> None:
    backend = Backend([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "never.sock")
    with pytest.raises(LabError, match="exited with 3") as info:
        backend.start()
    assert "boom" in str(info.value)
    backend.close()
