"""The status socket of a real back-end process: what it reports (idle, with a front end holding resources and a
mapped host blob, during a SHMEM_MAP, after the front end left), and that no status client — silent, garbage,
flooding, too many — stalls the VMM's commands, grows the back end or leaks an fd."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VGPU, WINDOW, host_blob_options
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.protocol import CtrlType, Format, GetDisplayInfo, Rect, ResourceUnmapBlob
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, hdr, rtype
from vgpu.status import StatusError, query, render
from vgpu.vhost_user.control import CLIENT_TIMEOUT, MAX_CLIENTS, MAX_REQUEST, ControlServer
from vgpu.vhost_user.shm_window import ShmMapping

pytestmark = pytest.mark.vgpu(*host_blob_options(), "--status-socket={tmp}/status.sock")

E = CtrlType
XR24_SIZE = 256 * 256 * 4
# The console script pip installs next to this interpreter (tools/venv.sh installs the project editable).
VGPU_STATUS = Path(sys.executable).with_name("vgpu-status")


def status_path(b: BackendProcess) -> str:
    return str(Path(b.socket_path).with_name("status.sock"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def display_info_seconds(g: Session) -> float:
    t = time.monotonic()
    assert rtype(g.cmd(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)), 408)) == E.RESP_OK_DISPLAY_INFO
    return time.monotonic() - t


def test_idle_back_end_answers_with_its_limits(vgpu: BackendProcess) -> None:
    path = status_path(vgpu)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = query(path)
    assert (doc["state"], doc["vmm_connected"], doc["vmm_connections"]) == ("idle", False, 0)
    assert doc["transport"] is None and doc["device"] is None
    assert (doc["pid"], doc["program"], doc["allocator"], doc["context_types"]) == \
        (vgpu.pid, "vhost-user-vgpu", "memfd", ["cross-domain"])
    assert doc["quotas"] == {"host_memory_bytes": {"used": 0, "limit": 32 << 20},
                             "resources": {"used": 0, "limit": 16384}, "contexts": {"used": 0, "limit": 64}}
    assert "idle, no VMM connected" in render(doc)
    # Between front ends the back end's accept loop serves the socket, deadlines included.
    before = fd_count(vgpu.pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)
        silent.settimeout(CLIENT_TIMEOUT + 30)
        assert silent.recv(1) == b""
    assert wait_until(lambda: fd_count(vgpu.pid) == before)


def test_status_lists_resources_mappings_and_quotas(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    g = client.sess
    g.image_2d(7, 256, 256, Format.FORMAT_B8G8R8X8_UNORM)
    g.show(7, 0, Rect(0, 0, 256, 256))
    reqs = client.requirements(256, 256)
    assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
    assert rtype(client.map(1, 0x200000)) == E.RESP_OK_MAP_INFO

    doc = query(status_path(vgpu))
    assert (doc["state"], doc["vmm_connected"], doc["vmm_connections"]) == ("connected", True, 1)
    t = doc["transport"]
    assert t["features"]["acked"] == g.fe.features and "VERSION_1" in t["features"]["names"]
    assert t["protocol_features"]["acked"] == g.fe.protocol_features
    assert {"SHMEM", "REPLY_ACK", "BACKEND_REQ"} <= set(t["protocol_features"]["names"])
    assert not t["device_busy"] and t["backend_channel"]
    d = doc["device"]
    assert {"VIRGL", "RESOURCE_BLOB", "CONTEXT_INIT"} <= set(d["features"])
    res = {r["id"]: r for r in d["resources"]}
    assert set(res) == {7, 100, 1}
    assert (res[7]["kind"], res[7]["size"], res[7]["width"], res[7]["format"], res[7]["format_name"],
            res[7]["backing_entries"], res[7]["scanouts"], res[7]["mapped"]) == \
        ("2d", XR24_SIZE, 256, int(Format.FORMAT_B8G8R8X8_UNORM), "B8G8R8X8_UNORM", XR24_SIZE // 4096, [0], False)
    assert (res[100]["kind"], res[100]["size"], res[100]["backing_entries"], res[100]["contexts"]) == \
        ("guest_blob", 4096, 1, [1])
    blob = res[1]
    assert (blob["kind"], blob["size"], blob["blob_mem_name"], blob["mapped"], blob["buffer"]["allocator"]) == \
        ("host_blob", reqs.size, "HOST3D", True, "memfd")  # type: ignore[attr-defined]
    # The one mapping, as the front end saw it mapped, with the answer the guest got and why.
    window = g.fe.shm[1]
    assert [(k, m.shm_offset, m.length) for k, m in window.log] == [("map", 0x200000, reqs.size)]  # type: ignore
    (m,) = d["mappings"]
    assert (m["resource_id"], m["offset"], m["length"], m["map_info"], m["map_info_name"], m["provenance"]) == \
        (1, 0x200000, reqs.size, 1, "CACHED", "allocator")  # type: ignore[attr-defined]
    assert m["detail"].startswith("memfd: ") and "kernel: DMA_BUF_IOCTL_INFO" in m["detail"]
    # The fd it names is the very buffer the front end mapped: a write through the window shows in it.
    window.write(0x200000, b"seen through the window")
    with open(f"/proc/{vgpu.pid}/fd/{m['buffer']['fd']}", "rb") as f:
        assert f.read(23) == b"seen through the window"
    assert d["host_visible_region"] == {"size": WINDOW, "available": True, "mappings": 1,
                                        "mapped_bytes": reqs.size}  # type: ignore[attr-defined]
    assert d["contexts"] == [{"id": 1, "capset_id": 5, "type": "cross-domain", "attached": [100],
                              "pending_blobs": 0, "pending_bytes": 0}]
    q = doc["quotas"]
    assert q["host_memory_bytes"] == {"used": XR24_SIZE + reqs.size, "limit": 32 << 20}  # type: ignore
    assert (q["resources"]["used"], q["contexts"]["used"]) == (3, 1)
    assert "quotas" not in d

    # The console script: the same document with --json, and the text form names the mapping.
    out = subprocess.run([str(VGPU_STATUS), "--json", status_path(vgpu)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out)["device"]["mappings"][0]["map_info"] == 1
    text = subprocess.run([str(VGPU_STATUS), status_path(vgpu)], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    assert "resource 1 at window offset 0x200000 +0x40000: map_info 1 (CACHED), provenance allocator\n" \
        "  because     : memfd: " in text, text

    g.ok(ResourceUnmapBlob(client.h(E.CMD_RESOURCE_UNMAP_BLOB), 1))
    d = query(status_path(vgpu))["device"]
    assert d["mappings"] == [] and not {r["id"]: r for r in d["resources"]}[1]["mapped"]


def test_status_answers_while_the_device_waits_for_the_vmm(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    """The front end queries status before it acks SHMEM_MAP: the back end is mid-command, and answers anyway."""
    seen: list[dict[str, Any]] = []

    def before_ack(m: ShmMapping, fd: int) -> None:
        seen.append(query(status_path(vgpu)))

    client.sess.fe.on_shmem_map = before_ack
    reqs = client.requirements(64, 64)
    client.create_blob(2, reqs)
    assert rtype(client.map(2, 0)) == E.RESP_OK_MAP_INFO
    (doc,) = seen
    assert doc["transport"]["device_busy"] is True
    assert doc["device"]["mappings"] == []  # not mapped until the VMM says so
    assert query(status_path(vgpu))["device"]["mappings"][0]["resource_id"] == 2


def test_after_the_vmm_leaves_the_back_end_is_idle_again(vgpu: BackendProcess) -> None:
    g = Session.open(vgpu.socket_path, features=CROSS_DOMAIN_FEATURES)
    g.image_2d(3, 64, 64)
    assert query(status_path(vgpu))["quotas"]["resources"]["used"] == 1
    g.close()
    assert wait_until(lambda: query(status_path(vgpu))["state"] == "idle", 10)
    doc = query(status_path(vgpu))
    assert (doc["vmm_connections"], doc["device"], doc["quotas"]["resources"]["used"]) == (1, None, 0)


def test_a_silent_client_does_not_stall_the_vmm(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    g = client.sess
    before = fd_count(vgpu.pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as halfway:
        silent.connect(status_path(vgpu))
        halfway.connect(status_path(vgpu))
        halfway.sendall(b'{"query": ')  # a request that never ends
        # Commands right away (while the back end accepts them) and once it holds both: a loop that waited for
        # either client would hold these up for its whole client timeout.
        took = [display_info_seconds(g) for _ in range(20)]
        accepted = wait_until(lambda: fd_count(vgpu.pid) == before + 2)
        took += [display_info_seconds(g) for _ in range(20)]
        # Both still connected and unanswered: the commands were served meanwhile, not after they were dropped.
        for s in (silent, halfway):
            with pytest.raises(BlockingIOError):
                s.recv(1, socket.MSG_DONTWAIT)
        assert query(status_path(vgpu))["vmm_connected"]  # other status clients are answered too
        silent.settimeout(CLIENT_TIMEOUT + 30)
        t = time.monotonic()
        assert silent.recv(1) == b""  # closed by the back end at its deadline, without an answer
        waited = time.monotonic() - t
        halfway.settimeout(30)
        assert halfway.recv(1) == b""
    print(f"slowest of 40 GET_DISPLAY_INFO with silent status clients connected: {max(took) * 1000:.1f} ms; "
          f"silent client closed after a further {waited:.2f} s")
    assert accepted
    # Generous for a loaded 2-core machine (a GET_DISPLAY_INFO takes about a millisecond), yet far below the
    # client timeout that a loop waiting on a status client would add.
    assert max(took) < CLIENT_TIMEOUT / 2
    assert wait_until(lambda: fd_count(vgpu.pid) == before)


def _exchange(path: str, data: bytes) -> bytes:
    """Send `data`, then read whatever comes back until the back end closes (or resets) the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        got = b""
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                got += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        return got


def test_garbage_floods_and_crowds_are_refused_and_leave_nothing(client: CrossDomainGuest,
                                                                vgpu: BackendProcess) -> None:
    g = client.sess
    path = status_path(vgpu)
    before, rss_before = fd_count(vgpu.pid), rss_kib(vgpu.pid)
    for raw, why in ((b"\x00\xffnot json\n", "not JSON"), (b"[1, 2]\n", "JSON object"),
                     (b'{"query": "reboot"}\n', "unknown query"), (b"[" * 5000 + b"\n", "request longer"),
                     (b"[" * 4000 + b"\n", "not JSON")):
        answer = json.loads(_exchange(path, raw))
        assert why in answer["error"], (raw[:20], answer)
    with pytest.raises(StatusError, match="unknown query"):
        query(path, {"query": "reboot"})

    # 10 MB at the status socket while the VMM's commands keep being served.
    flood_result: list[bytes] = []
    flood = threading.Thread(target=lambda: flood_result.append(_exchange(path, b"x" * (10 << 20))))
    flood.start()
    took = max(display_info_seconds(g) for _ in range(20))
    flood.join(60)
    assert not flood.is_alive()
    # Refused after MAX_REQUEST bytes: the answer, if the reset did not overtake it, says so.
    assert flood_result[0] in (b"", b'{"error": "request longer than %d bytes"}\n' % MAX_REQUEST)

    # More clients than allowed at once: the extra ones are closed at once, the first ones time out.
    crowd = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CLIENTS + 4)]
    try:
        for s in crowd:
            s.connect(path)
        display_info_seconds(g)
        for s in crowd[MAX_CLIENTS:]:
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in crowd:
            s.close()
    assert wait_until(lambda: fd_count(vgpu.pid) == before, CLIENT_TIMEOUT + 10)
    grown = rss_kib(vgpu.pid) - rss_before
    print(f"slowest GET_DISPLAY_INFO during a 10 MB flood: {took * 1000:.1f} ms; RSS grew {grown} KiB")
    assert grown < 4096, f"the back end grew by {grown} KiB"
    assert query(path)["vmm_connected"] and vgpu.alive()


def test_vgpu_status_says_why_it_has_no_answer(tmp_path: Path) -> None:
    r = subprocess.run([str(VGPU_STATUS), str(tmp_path / "nothing.sock")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "vgpu-status:" in r.stderr and "nothing.sock" in r.stderr
    assert r.stdout == ""


def test_a_status_socket_that_cannot_be_made_fails_at_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "status.sock"
    blocker.write_text("not a socket")
    r = subprocess.run([*VGPU, *host_blob_options(), f"--socket-path={tmp_path / 'v.sock'}",
                        f"--status-socket={blocker}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr
    assert blocker.read_text() == "not a socket" and not (tmp_path / "v.sock").exists()


def test_a_large_answer_is_written_only_as_fast_as_the_client_reads(tmp_path: Path) -> None:
    """In process: the answer is far larger than a socket buffer and the client has not read yet, so a blocking
    send would stop the loop; service() must return at once every time and the whole answer still arrive."""
    big = {"resources": ["x" * 100] * 40000}  # about 4 MB, like a guest at the resource limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        listener.bind(str(tmp_path / "control.sock"))
        listener.listen()
        server = ControlServer(listener, lambda request: big)
        try:
            client.connect(str(tmp_path / "control.sock"))
            client.sendall(b'{"query": "status"}\n')
            got = bytearray()
            calls = 0
            while True:
                worker = threading.Thread(target=server.service, daemon=True)
                worker.start()
                worker.join(10)
                if worker.is_alive():
                    client.close()  # unblocks the stuck send so the thread ends
                    pytest.fail("service() blocked on a client that was not reading")
                calls += 1
                try:
                    chunk = client.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                got += chunk
            assert json.loads(got) == big and calls > 2
            assert server.timeout() is None  # the client is gone from the server's books
        finally:
            server.close()
