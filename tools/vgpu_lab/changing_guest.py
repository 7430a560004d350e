"""The guest side of tests/e2e/test_changing_placement.py: vgem's test exporters under our back end, in the guest.

Runs inside the chroot of the host's root on the patched kernel (``python -m vgpu_lab.changing_guest [ROUND...]``,
booted by :func:`run_changing_guest` through :func:`vgpu_lab.dmabuf_guest.run_python_in_chroot`): each round selects
a test exporter (``/sys/module/vgem/parameters/test_exporter``), starts ``python -m vgpu --allocator=vgem`` and
drives it with our front end through MAP_BLOB, moving the buffer between write-combined and write-back pages
(``test_move``) and reading the front end's own PTE of the window from the kernel's page-table dump.  It prints one
``VGPU-GUEST device`` record per round, as :mod:`vgpu_lab.device_guest` does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from vgpu_lab import dmabuf_guest
from vgpu_lab.device_guest import (
    BACKEND_NAME,
    BOOT_TIMEOUT,
    HEIGHT,
    MAP_OFFSET,
    PTDUMP,
    SOCKET_DIR,
    WIDTH,
    _emit,
    _mapping_path,
    _start,
    pte_of,
    records,
)
from vgpu_lab.qemu import GuestRun

VGEM_PARAMS = Path("/sys/module/vgem/parameters")
#: round → (vgem test exporter, extra back-end options)
ROUNDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "moving-refused": ("moving", ()),
    "moving-opted-in": ("moving", ("--map-changing-placement",)),
    "incoherent": ("incoherent", ("--map-changing-placement",)),
}


# ================================================================================================================
# guest side


def _pte(addr: int) -> str | None:
    found = pte_of(Path(PTDUMP).read_text(), addr)
    return found[0] if found else None


def _move() -> None:
    (VGEM_PARAMS / "test_move").write_text("1")


def _map(client: Any) -> tuple[int, int | None]:
    """RESOURCE_MAP_BLOB of resource 1: (response type, map_info or None for an error response)."""
    from vgpu.protocol import CtrlType
    from vgpu.protocol import structs as s
    from vgpu.session import rtype

    raw = client.map(1, MAP_OFFSET)
    kind = rtype(raw)
    return kind, int(s.resp_map_info.parse(raw).map_info) if kind == CtrlType.RESP_OK_MAP_INFO else None


def _round(name: str) -> None:
    from vgpu.protocol import CtrlType, ResourceUnmapBlob
    from vgpu.session import CROSS_DOMAIN_FEATURES, PAGE, CrossDomainGuest, Session
    from vgpu.session import rtype as resp_type

    exporter, options = ROUNDS[name]
    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    (VGEM_PARAMS / "test_exporter").write_text(exporter)
    record: dict[str, Any] = {"allocator": name, "exporter": exporter, "options": list(options)}
    started = time.monotonic()
    backend = _start([sys.executable, "-m", "vgpu", "--context-types=cross-domain", "--allocator=vgem",
                      "--log-level=info", *options])
    try:
        gpu = Session.open(backend.socket_path, features=CROSS_DOMAIN_FEATURES, shm=True)
        try:
            client = CrossDomainGuest(gpu)
            client.start()
            reqs: Any = client.requirements(WIDTH, HEIGHT)
            record.update(reqs_size=reqs.size, reqs_map_info=reqs.map_info)
            record["create_blob"] = resp_type(client.create_blob(1, reqs))
            # The back end made its buffer: later dumb buffers (none here) are ordinary again.
            (VGEM_PARAMS / "test_exporter").write_text("off")
            record["map_resp"], record["map_info"] = _map(client)
            if record["map_resp"] == CtrlType.RESP_OK_MAP_INFO:
                window = gpu.fe.shm[1]
                addr = window.base + MAP_OFFSET
                marker = f"changing {name} {os.getpid()}".encode()

                def touch() -> str | None:
                    """Fault every page in (after a move the mapping is gone), then read the window's PTE."""
                    for page in range(0, reqs.size, PAGE):
                        window.read(MAP_OFFSET + page, 1)
                    return _pte(addr)

                window.write(MAP_OFFSET + PAGE, marker)
                ptes = [touch()]
                for _ in range(2):
                    _move()
                    ptes.append(touch())
                record["ptes"] = ptes
                record["marker_kept"] = window.read(MAP_OFFSET + PAGE, len(marker)) == marker
                record["frontend_mapping"] = _mapping_path(addr)
                _move()  # now write-back: the second MAP_BLOB must see it
                record["pte_before_remap"] = touch()
                unmap = ResourceUnmapBlob(client.h(CtrlType.CMD_RESOURCE_UNMAP_BLOB), 1)
                record["unmap_resp"] = resp_type(gpu.cmd(unmap))
                record["remap_resp"], record["remap_info"] = _map(client)
                if record["remap_resp"] == CtrlType.RESP_OK_MAP_INFO:
                    record["remap_pte"] = touch()
                    record["remap_marker_kept"] = window.read(MAP_OFFSET + PAGE, len(marker)) == marker
        finally:
            gpu.close()
    finally:
        backend.stop()
        (VGEM_PARAMS / "test_exporter").write_text("off")
    log = backend.log()
    record["map_log"] = [line for line in log.splitlines() if "map blob " in line and "unmapped" not in line]
    record["refused_log"] = [line for line in log.splitlines() if "refused:" in line]
    record["backend_errors"] = [line for line in log.splitlines() if "Traceback" in line]
    record["seconds"] = round(time.monotonic() - started, 2)
    _emit("round", **record)


def guest_main(rounds: list[str]) -> int:
    _emit("start", kernel=os.uname().release, uptime=float(Path("/proc/uptime").read_text().split()[0]))
    for name in rounds:
        try:
            _round(name)
        except Exception as exc:
            _emit("exception", allocator=name, error=f"{type(exc).__name__}: {exc}",
                  traceback=traceback.format_exc().splitlines()[-8:])
    _emit("done")
    return 0




def run_changing_guest(*, kernel: Path, busybox: Path, qemu: Path, work: Path,
                       rounds: tuple[str, ...] = tuple(ROUNDS)) -> tuple[GuestRun, list[dict[str, Any]]]:
    """Boot the patched `kernel` once with the given rounds; the run and the rounds' records."""
    debugfs = f"mount -t debugfs debugfs {dmabuf_guest.GUEST_HOST_ROOT}/sys/kernel/debug"
    run = dmabuf_guest.run_python_in_chroot("vgpu_lab.changing_guest", rounds, kernel=kernel, busybox=busybox,
                                            qemu=qemu, work=work, setup=[debugfs], timeout=BOOT_TIMEOUT)
    return run, records(run.guest_lines())


if __name__ == "__main__":
    sys.exit(guest_main(sys.argv[1:] or list(ROUNDS)))
