"""The Xen lab: Debian's Xen 4.17 hypervisor and our dom0 kernel, booted under QEMU TCG, our Python run in dom0.

Why: vhost-user on Xen reaches guest memory through Xen's drivers (privcmd for foreign frames, gntdev for grants),
which exist only in a Xen domain; a dom0 is the one domain that can be started here without a toolstack.  What
was measured on this machine kind is in the project's shared reference (xen-lab.md); this module is the lab's
own version of it:

* the hypervisor: ``xen-hypervisor-4.17-amd64``, fetched with apt (the machine's own mirror) and unpacked into the
  cache — never installed, so the host's boot configuration is left alone — and gunzipped: QEMU's multiboot loader
  takes Xen's 32-bit ELF directly;
* dom0's kernel: built by :mod:`vgpu_lab.kernel_build` (profile ``xen-dom0``: PV dom0, gntdev with its dma-buf
  extension, gntalloc, privcmd, evtchn, 9p, PTDUMP_DEBUGFS, our DMA_BUF_IOCTL_INFO patch);
* the boot: ``-kernel xen -append XEN_ARGS -initrd "DOM0_KERNEL DOM0_ARGS,INITRAMFS"`` (the first module carries
  its own command line); dom0's console is ``hvc0``, on the same serial line as Xen's;
* the end: dom0's ``reboot -f`` makes Xen reboot, which ``-no-reboot`` turns into QEMU exiting.

Use :func:`xen_hypervisor` and :func:`dom0_kernel` to provision, :func:`run_dom0` to boot.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vgpu_lab import dmabuf_guest, initramfs, kernel_build, provision
from vgpu_lab.qemu import QEMU_SYSTEM_X86_64, GuestRun, run_qemu
from vgpu_lab.shell import APT_DOWNLOAD_TIMEOUT, EXTRACT_TIMEOUT, QUERY_TIMEOUT, ProvisionError, run

log = logging.getLogger("vgpu_lab")

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
#: Inside the package: the hypervisor, gzip-compressed.
XEN_IMAGE = "boot/xen-4.17-amd64.gz"
#: Xen's own command line: its console on the first serial port, a fixed dom0 of one vCPU.  The memory is dom0's
#: whole world: Python, the back end and its front end run in it, with the host root's page cache over 9p.
XEN_ARGS = "console=com1 com1=115200,8n1 dom0_mem=768M,max:768M dom0_max_vcpus=1 loglvl=warning guest_loglvl=warning"
DOM0_ARGS = "console=hvc0 earlyprintk=xen loglevel=4 panic=-1"
#: Xen and a 768 MiB dom0 fit in 1 GiB of machine memory with room for Xen's own heap.
MACHINE_MEMORY_MIB = 1280
#: dom0 ends the run this way (see the module's description).
DOM0_SHUTDOWN = "reboot -f"
#: The 9p share is ready once its driver has bound the device.
NINEP_READY = "/sys/bus/virtio/drivers/9pnet_virtio/virtio0"


@dataclasses.dataclass(frozen=True)
class XenHypervisor:
    """Debian's hypervisor, unpacked into the cache."""

    package: str
    version: str
    image: Path


def _record(cache: Path) -> Path:
    return cache / "xen" / "xen.json"


def xen_hypervisor(provisioner: provision.Provisioner | None = None) -> XenHypervisor:
    """The hypervisor image, downloaded with apt and unpacked once into ``<cache>/xen``."""
    p = provisioner or provision.Provisioner()
    with p.locked():
        record = _record(p.cache)
        if record.is_file():
            try:
                data = json.loads(record.read_text())
                found = XenHypervisor(str(data["package"]), str(data["version"]), Path(data["image"]))
                if found.image.is_file():
                    return found
            except (ValueError, KeyError, TypeError):
                log.warning("xen: ignoring unreadable %s", record)
        p.ensure_apt()
        return _fetch(p.cache)


def _fetch(cache: Path) -> XenHypervisor:
    root = cache / "xen"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        run(["apt-get", "-q", "download", "-o", "APT::Sandbox::User=root", XEN_PACKAGE],
            timeout=APT_DOWNLOAD_TIMEOUT, what="xen", cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ProvisionError(f"xen: expected one .deb from apt-get download {XEN_PACKAGE}, got {debs}")
        version = run(["dpkg-deb", "-f", str(debs[0]), "Version"], timeout=QUERY_TIMEOUT, what="xen").stdout.strip()
        unpack = tmp / "root"
        run(["dpkg", "-x", str(debs[0]), str(unpack)], timeout=EXTRACT_TIMEOUT, what="xen")
        packed = unpack / XEN_IMAGE
        if not packed.is_file():
            raise ProvisionError(f"xen: {XEN_PACKAGE} has no {XEN_IMAGE}")
        final = root / re.sub(r"[^A-Za-z0-9.+~-]", "_", version)
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        image = final / "xen"
        image.write_bytes(gzip.decompress(packed.read_bytes()))
    found = XenHypervisor(XEN_PACKAGE, version, image)
    record = _record(cache)
    tmp_record = record.with_name(record.name + ".tmp")
    tmp_record.write_text(json.dumps({"package": found.package, "version": found.version, "image": str(image)},
                                     indent=2) + "\n")
    tmp_record.replace(record)
    log.info("xen: %s %s unpacked to %s", XEN_PACKAGE, version, image)
    return found


def dom0_kernel(provisioner: provision.Provisioner | None = None) -> kernel_build.PatchedKernel:
    """Our dom0 kernel (built once, about 7 minutes on 2 cores, then cached by its own key)."""
    p = provisioner or provision.Provisioner()
    return kernel_build.patched_kernel(p.cache, profile=kernel_build.XEN_DOM0)


def dom0_command(
    *, xen: Path, kernel: Path, initrd: Path, qemu: Path = QEMU_SYSTEM_X86_64, xen_args: str = XEN_ARGS,
    dom0_args: str = DOM0_ARGS, extra_args: Sequence[str] = (), memory_mib: int = MACHINE_MEMORY_MIB,
) -> list[str]:
    """The QEMU command line booting Xen with ``kernel`` as dom0 (the shape in the module's description)."""
    for path in (kernel, initrd):
        if "," in str(path):
            raise ProvisionError(f"xen: {path} has a comma, which QEMU's multiboot module list cannot carry")
    return [
        str(qemu), "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-m", f"{memory_mib}M", "-smp", "1",
        "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        "-kernel", str(xen), "-append", xen_args,
        "-initrd", f"{kernel} {dom0_args},{initrd}",
        *extra_args,
    ]


def dom0_initramfs(output: Path, *, busybox: Path, command: str, files: dict[str, Path] | None = None) -> Path:
    """An initramfs whose /init runs ``command`` in dom0 once the 9p share is ready, then ends the run."""
    return initramfs.build_initramfs(
        output, busybox=busybox, command=command, modules=(), files=files or {}, wait_for=NINEP_READY,
        shutdown=DOM0_SHUTDOWN,
    )


def run_dom0(
    *, xen: Path, kernel: Path, initrd: Path, qemu: Path = QEMU_SYSTEM_X86_64, share_host_root: bool = True,
    timeout: float = 300.0, serial_log: Path | None = None, dom0_args: str = DOM0_ARGS,
) -> GuestRun:
    """Boot Xen and dom0 once (the host root shared read-only over 9p, as for the other in-guest runs)."""
    extra = dmabuf_guest.host_root_args() if share_host_root else ()
    cmd = dom0_command(xen=xen, kernel=kernel, initrd=initrd, qemu=qemu, extra_args=extra, dom0_args=dom0_args)
    return run_qemu(cmd, timeout=timeout, serial_log=serial_log)
