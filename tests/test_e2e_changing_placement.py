"""End to end: buffers whose cache attribute can change, and buffers that need cache maintenance, inside a real guest.

Why: an answer the exporter gives at MAP_BLOB describes the buffer only until it moves (Christian König's objection
to the ioctl: TTM drivers move buffers between VRAM and system memory and change the pgprot of CPU mappings as they
go), and a buffer whose CPU access needs ``DMA_BUF_IOCTL_SYNC`` cannot be kept coherent through a guest's mapping
(Rob Clark's suggestion: refuse it). Our kernel patch lets the exporter say both, and gives vgem test exporters that
really do it (``/sys/module/vgem/parameters/test_exporter``: a "moving" buffer moves between write-combined and
write-back pages when ``test_move`` is written, tearing CPU mappings down as a TTM move does; an "incoherent" one
answers NEEDS_SYNC).

How: the boot of :mod:`tests.test_e2e_device_in_guest` (QEMU 10 TCG, the patched 6.12 kernel, the host's root over
9p) runs this file's ``--guest`` rounds: each selects a test exporter, starts ``python -m vgpu --allocator=vgem``
(whose dumb buffers then come from it) and drives it with our front end through MAP_BLOB:

- ``moving-refused``: the default refuses, and the log says why;
- ``moving-opted-in``: ``--map-changing-placement`` maps it WC; the front end's own PTE of the window (its mapping
  stands for the VMM's) is read from the kernel's page-table dump before, between and after two moves — it really
  goes write-combined → write-back → write-combined, the bytes survive, and map_info stays the WC that is safe in
  both; after a third move (write-back now) the blob is unmapped and mapped again: the back end asks the kernel
  afresh and its log names the new answer;
- ``incoherent``: refused even with the opt-in.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.test_e2e_device_in_guest import (
    BACKEND_NAME,
    HEIGHT,
    MAP_LOG,
    MAP_OFFSET,
    PTDUMP,
    SOCKET_DIR,
    WIDTH,
    _boot_device,
    _emit,
    _mapping_path,
    pte_of,
)

if TYPE_CHECKING:
    from tests.test_e2e_kernel_ioctl import Rig

pytestmark = pytest.mark.e2e

VGEM_PARAMS = Path("/sys/module/vgem/parameters")
#: round → (vgem test exporter, extra back-end options)
ROUNDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "moving-refused": ("moving", ()),
    "moving-opted-in": ("moving", ("--map-changing-placement",)),
    "incoherent": ("incoherent", ("--map-changing-placement",)),
}
REFUSED = re.compile(r"MAP_BLOB (\d+) refused: (.*)$")


# ================================================================================================================
# guest side


def _pte(addr: int) -> str | None:
    found = pte_of(Path(PTDUMP).read_text(), addr)
    return found[0] if found else None


def _move() -> None:
    (VGEM_PARAMS / "test_move").write_text("1")


def _map(client: Any) -> tuple[int, int | None]:
    """RESOURCE_MAP_BLOB of resource 1: (response type, map_info or None for an error response)."""
    from tests.gpu_helpers import resp_type
    from vgpu.protocol import CtrlType
    from vgpu.protocol import structs as s

    raw = client.map(1, MAP_OFFSET)
    kind = resp_type(raw)
    return kind, int(s.resp_map_info.parse(raw).map_info) if kind == CtrlType.RESP_OK_MAP_INFO else None


def _round(name: str) -> None:
    from tests.conftest import start_backend, stop_backend
    from tests.gpu_helpers import PAGE, Gpu, resp_type
    from tests.test_gpu_host_blob import FEATURES, Client, h
    from vgpu.protocol import CtrlType, ResourceUnmapBlob

    exporter, options = ROUNDS[name]
    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    (VGEM_PARAMS / "test_exporter").write_text(exporter)
    record: dict[str, Any] = {"allocator": name, "exporter": exporter, "options": list(options)}
    started = time.monotonic()
    backend = start_backend([sys.executable, "-m", "vgpu", "--context-types=cross-domain", "--allocator=vgem",
                             "--log-level=info", *options], SOCKET_DIR, BACKEND_NAME)
    try:
        gpu = Gpu.connect(backend.socket_path, features=FEATURES)
        try:
            gpu.fe.reserve_shm()
            client = Client(gpu)
            client.start()
            reqs: Any = client.requirements(WIDTH, HEIGHT)
            record.update(reqs_size=reqs.size, reqs_map_info=reqs.map_info)
            record["create_blob"] = resp_type(client.blob(1, reqs))
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
                record["unmap_resp"] = resp_type(gpu.cmd(ResourceUnmapBlob(h(CtrlType.CMD_RESOURCE_UNMAP_BLOB), 1)))
                record["remap_resp"], record["remap_info"] = _map(client)
                if record["remap_resp"] == CtrlType.RESP_OK_MAP_INFO:
                    record["remap_pte"] = touch()
                    record["remap_marker_kept"] = window.read(MAP_OFFSET + PAGE, len(marker)) == marker
        finally:
            gpu.close()
    finally:
        stop_backend(backend)
        (VGEM_PARAMS / "test_exporter").write_text("off")
    log = backend.log()
    record["map_log"] = [line for line in log.splitlines() if "map blob " in line and "unmapped" not in line]
    record["refused_log"] = [line for line in log.splitlines() if "refused:" in line]
    record["backend_errors"] = [line for line in log.splitlines() if "Traceback" in line]
    record["seconds"] = round(time.monotonic() - started, 2)
    _emit("round", **record)


def guest_main(rounds: list[str]) -> int:
    import traceback

    _emit("start", kernel=os.uname().release, uptime=float(Path("/proc/uptime").read_text().split()[0]))
    for name in rounds:
        try:
            _round(name)
        except Exception as exc:
            _emit("exception", allocator=name, error=f"{type(exc).__name__}: {exc}",
                  traceback=traceback.format_exc().splitlines()[-8:])
    _emit("done")
    return 0


# ================================================================================================================
# host side


@pytest.fixture(scope="module")
def rig() -> Rig:
    from tests.test_e2e_kernel_ioctl import Rig

    return Rig()


def test_changing_and_incoherent_exporters_in_the_patched_guest(rig: Rig, tmp_path: Path) -> None:
    from vgpu.protocol import CtrlType

    rounds, context, elapsed = _boot_device(rig, tmp_path, patched=True, rounds=tuple(ROUNDS),
                                            script_file=Path(__file__))
    print(f"patched kernel, rounds {list(ROUNDS)}: {elapsed:.2f} s wall")

    refused = rounds["moving-refused"]
    where = f"{refused}\n{context}"
    assert refused["create_blob"] == CtrlType.RESP_OK_NODATA, where
    assert refused["map_resp"] == CtrlType.RESP_ERR_UNSPEC and refused["map_log"] == [], where
    (line,) = refused["refused_log"]
    print(f"default  : {line}")
    assert "exporter 'vgem-test'" in line and "may change while the buffer is mapped" in line, where
    assert "DMA_BUF_IOCTL_INFO: WC (for now: the exporter may move the buffer)" in line, where
    assert "--map-changing-placement maps such buffers WC" in line, where

    mapped = rounds["moving-opted-in"]
    where = f"{mapped}\n{context}"
    assert mapped["map_resp"] == CtrlType.RESP_OK_MAP_INFO and mapped["map_info"] == 3, where  # WC
    assert (mapped["frontend_mapping"] or "").startswith(("/dmabuf:", "anon_inode:dmabuf")), where
    # Page-table truth: the placement really changed under the mapping, and WC is what the guest was told in all.
    print(f"opted in : map_info WC; front end's PTE across two moves {mapped['ptes']}, then "
          f"{mapped['pte_before_remap']}; bytes kept {mapped['marker_kept']}")
    assert mapped["ptes"] == ["WC", "WB", "WC"] and mapped["marker_kept"] is True, where
    assert mapped["pte_before_remap"] == "WB", where
    first, second = (MAP_LOG.search(line) for line in mapped["map_log"])
    assert first is not None and second is not None, where
    for m in (first, second):
        assert (m.group(4), m.group(5)) == ("WC", "operator rule"), where
        assert m.group(6).startswith("--map-changing-placement: mapped WC"), where
    # Asked afresh at the second MAP_BLOB: the kernel's answer is the placement of now.
    assert "kernel: DMA_BUF_IOCTL_INFO: WC (for now" in first.group(6), where
    assert "kernel: DMA_BUF_IOCTL_INFO: CACHED (for now" in second.group(6), where
    print(f"remapped : {second.group(0)}")
    assert mapped["unmap_resp"] == CtrlType.RESP_OK_NODATA, where
    assert (mapped["remap_resp"], mapped["remap_info"]) == (CtrlType.RESP_OK_MAP_INFO, 3), where
    assert mapped["remap_pte"] == "WB" and mapped["remap_marker_kept"] is True, where

    incoherent = rounds["incoherent"]
    where = f"{incoherent}\n{context}"
    assert incoherent["map_resp"] == CtrlType.RESP_ERR_UNSPEC and incoherent["map_log"] == [], where
    (line,) = incoherent["refused_log"]
    print(f"incoherent: {line}")
    assert "needs cache maintenance (DMA_BUF_IOCTL_SYNC)" in line, where
    assert "DMA_BUF_IOCTL_INFO: CACHED+fixed+sync" in line, where
    for r in rounds.values():
        assert r["backend_errors"] == [], f"{r}\n{context}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        sys.exit(guest_main(sys.argv[2:] or list(ROUNDS)))
    sys.exit(f"usage: {sys.argv[0]} --guest [ROUND...] (inside the lab guest; pytest runs the host side)")
