"""End to end: a real QEMU 10 boots the 6.12 guest against QEMU's own C back end, ``vhost-user-gpu``.

Why against the peer first: it proves the harness (provisioning, initramfs, guest program, QEMU command line,
serial parsing) independently of our device, so when the same test later runs against our back end a failure
points at the device, not at the lab.

In CI (``CI=true``) every lab component must provision; outside CI a missing component skips the test with a
reason naming it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.e2e.conftest import BOOT_TIMEOUT
from vgpu_lab import initramfs, provision
from vgpu_lab.qemu import QemuConfig, run_with_backend


def test_kms_pattern_against_qemu_vhost_user_gpu(lab: provision.Lab, tmp_path: Path) -> None:
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz",
        busybox=lab.busybox,
        command="/bin/kms_pattern 500",
        modules_dir=lab.kernel.modules_dir,
        modules=initramfs.VIRTIO_GPU_MODULES,
        files={"/bin/kms_pattern": lab.guest_programs["kms_pattern"]},
    )
    started = time.monotonic()
    run = run_with_backend(
        f"{lab.qemu.vhost_user_gpu} --socket-path={{sock}}",
        kernel=lab.kernel.vmlinuz,
        initrd=initrd,
        config=QemuConfig(qemu=lab.qemu.system),
        timeout=BOOT_TIMEOUT,
        serial_log=tmp_path / "serial.log",
    )
    guest = run.guest
    print(f"boot + test + poweroff: {time.monotonic() - started:.2f} s wall (QEMU {guest.elapsed:.2f} s)")
    context = guest.describe() + f"\n--- back end (exit {run.backend_returncode})\n{run.backend_output}"

    assert not guest.timed_out, context
    assert guest.returncode == 0, context
    assert guest.guest_status == 0, context

    features = [line for line in guest.dmesg.splitlines() if re.search(r"\[drm\] features: .*edid", line)]
    assert features, context
    assert "+edid" in features[0], context
    assert re.search(r"\[drm\] Initialized virtio_gpu ", guest.dmesg), context

    lines = guest.guest_lines()
    assert not [line for line in lines if " fail " in line], context
    modeset = [line for line in lines if line.startswith("VGPU-GUEST modeset ok ")]
    assert modeset, context
    assert re.fullmatch(r"VGPU-GUEST modeset ok \d+x\d+", modeset[0]), context
    for step in ("dirtyfb", "cursor", "cursor-move", "done"):
        assert any(line.startswith(f"VGPU-GUEST {step} ok") for line in lines), f"{step}\n{context}"
