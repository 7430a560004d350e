"""The back end survives its VMM failing under it, frees everything, logs what it dropped and serves the next VMM.

One back-end process takes every fault in turn (each test also proves the previous VMM's failure left it able to
serve). The VMM is our front end in a child process, killed or stopped exactly where a fault needs it — a moment a
real QEMU cannot be made to hit (tests/e2e/test_qemu_killed.py kills a real QEMU 11.1). The same scenarios, measured,
make ``benchmarks/results/faults.json`` (``python -m benchmarks.faults``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_scenarios as fs
from tests.conftest import REPO
from vgpu.vhost_user.message import Channel
from vgpu.vhost_user.wire import VHOST_USER_VERSION, FrontendRequest


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fs.Subject]:
    s = fs.Subject(tmp_path_factory.mktemp("faults"))
    yield s
    s.close()


def freed(f: fs.Fault) -> None:
    """What every fault must end in (the row says what was seen)."""
    assert f.survived, f.row()
    assert f.released and f.fds_after == f.fds_before, f.row()
    assert not f.held_after, f.row()
    assert f.dropped, f.row()  # the back end's one line about what the VMM left behind
    assert f.served_next, f.row()
    assert "traceback" not in f.details, f.details["traceback"]


def test_sigkill_of_the_vmm_with_blobs_mapped(subject: fs.Subject) -> None:
    f = fs.kill_with_blobs_mapped(subject)
    assert sum("vgpu-blob" in h for h in f.details["held_before"]) == 2, f.details  # the fault had something to free
    freed(f)
    # Its two blobs and the ring resource, 2 x 256 KiB of host memory, and the context.
    assert f.dropped == "front end gone: dropped 3 resources, 2 mapped blobs, 1 contexts (524288 bytes of host memory)"


def test_sigkill_of_the_vmm_while_a_shmem_map_ack_is_pending(subject: fs.Subject) -> None:
    """The VMM is our front end, killed while it holds back the ack of SHMEM_MAP (QEMU cannot be stopped there)."""
    f = fs.kill_map_ack_pending(subject)
    freed(f)
    assert f.details["map_failed_logged"], f.row()


def test_main_socket_closed_while_a_shmem_map_ack_is_pending(subject: fs.Subject) -> None:
    """Regression: the VMM's main socket closing while the device waited for an ack escaped through the device as
    an exception (a traceback, "device failed while processing queue"); now the map fails like any channel
    failure and the session ends."""
    f = fs.main_socket_closed_map_pending(subject)
    freed(f)
    assert f.details["map_failed_logged"], f.row()


def test_sigkill_of_the_vmm_in_the_middle_of_a_transfer_batch(subject: fs.Subject) -> None:
    f = fs.kill_mid_transfer(subject)
    assert f.details["mid_batch"], f.details  # killed after the first transfer completed, before the last
    freed(f)


def test_sigstop_of_the_vmm_while_a_map_waits_then_sigcont(subject: fs.Subject) -> None:
    """The map times out (--map-timeout 1) while the VMM is stopped, the guest gets an error, and the late ack after
    SIGCONT is answered with SHMEM_UNMAP. Regression: the late ack used to be swallowed, leaving the blob mapped in
    the VMM with no record of it in the back end, so every later map of that range failed as overlapping."""
    f = fs.sigstop_during_map(subject)
    assert f.details["map_timed_out"] and f.details["stopped_throughout"], f.details
    assert f.details["guest_saw"]["map-response"] == "0x1200", f.details  # RESP_ERR_UNSPEC, once the VMM runs
    assert f.details["vmm_window_after_late_ack"] == {"mappings": "0", "log": "map,unmap"}, f.details
    assert f.details["guest_saw"]["map-again"] == "0x1106", f.details  # RESP_OK_MAP_INFO at the same offset
    assert f.details["guest_saw"]["unmap"] == "0x1100", f.details
    freed(f)


def test_sigstop_of_the_vmm_while_frames_go_to_its_display(subject: fs.Subject) -> None:
    """Regression: a VMM stopped while the back end sent it a frame blocked the whole back end in sendmsg until the
    VMM ran again (SIGTERM did not end it either). Display sends now never block: while the display takes nothing
    the back end keeps serving the front end, drops the display after SEND_TIMEOUT, the guest's flushes are still
    answered, and after SIGCONT the session goes on."""
    f = fs.sigstop_during_frames(subject)
    assert f.details["display_dropped"] and f.details["stopped_throughout"], f.details
    assert f.details["after_sigcont"]["answered"] == "3", f.details
    freed(f)


def test_disconnect_after_each_set_up_message(subject: fs.Subject) -> None:
    f = fs.disconnects_during_setup(subject)
    sequence = f.details["sequence"]
    # The recorded set-up is QEMU's order: negotiation, the back-end channel, memory, both rings, the display.
    assert sequence[:6] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
                            "SET_BACKEND_REQ_FD", "SET_FEATURES"], sequence
    assert sequence.count("SET_VRING_KICK") == 2 and sequence[-1] == "GPU_SET_SOCKET", sequence
    assert not f.details["problems"], f.details
    assert f.details["sessions_dropped"] == len(sequence), f.details
    # A connection that leaked its guest RAM mapping, a ring or a socket per cut would grow by far more than this
    # (allocator noise measured here: under 100 KiB over the 22 cuts).
    assert f.details["rss_growth_kib"] < 1024, f.details["rss_kib_per_cut"]
    freed(f)


def test_a_request_answered_into_a_closed_socket(subject: fs.Subject) -> None:
    """Regression: a front end that sent GET_FEATURES and left before the answer took the whole back end down
    (BrokenPipeError out of the loop), and with it every later VMM."""
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(subject.sock)
        Channel(s).send(FrontendRequest.GET_FEATURES, VHOST_USER_VERSION)
        s.close()
        assert subject.b.settle_fds(subject.idle_fds) == subject.idle_fds and subject.b.alive()
    fs.next_vmm(subject.sock)


def test_the_faults_command_writes_its_table_where_asked(tmp_path: Path) -> None:
    """`python -m benchmarks.faults` (without the QEMU row here: tests/e2e/test_qemu_killed.py has it) writes its rows
    where --json says, never into the tree."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.faults", "--no-qemu", "--cut-rounds=1", "--faults",
                        "kill_with_blobs_mapped", "disconnects_during_setup", f"--json={tmp_path}"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "faults.json").read_text())
    assert data["all_ok"] and len(data["rows"]) == 2, data
    assert all(row["dropped"].startswith("front end gone: dropped ") for row in data["rows"]), data
    assert "| SIGKILL with 2 blobs mapped |" in r.stdout and "wrote " not in r.stdout, r.stdout
