"""A VMM that fails on cue: our front end in a process of its own, for the faults whose moment a real QEMU cannot
be made to hit (a SHMEM_MAP whose ack is pending, a batch of transfers the back end is in the middle of).

    python -m tests.fault_frontend SCENARIO SOCKET

It prints one line per stage on stdout (``STAGE key=value ...``, flushed) so the parent knows when to strike:

* ``mapped``: a cross-domain context, two host blobs mapped into the window, then ``mapped`` and a wait to be killed.
* ``map-pending``: MAP_BLOB; the SHMEM_MAP arrives, ``map-pending`` is printed and the ack never leaves (the parent
  kills us while the back end waits for it).
* ``main-closed``: like ``map-pending``, but at the SHMEM_MAP the main socket is shut down (a VMM tearing the
  device down) while the back-end channel stays open.
* ``transfer``: 120 TRANSFER_TO_HOST_2D of a 2048x2048 image from scattered pages in one kick, then ``kicked``
  with where the used ring is (so the parent can watch the back end's progress through our guest RAM).
* ``stopped-map``: MAP_BLOB; at the SHMEM_MAP, ``map-pending`` and the ack waits for a line on stdin while the
  parent stops the whole process (SIGSTOP) — the VMM frozen with a back-end request waiting. After the parent's
  SIGCONT: the MAP_BLOB's answer, what our window holds once the late ack has been answered, and a second
  MAP_BLOB at the same offset, then its UNMAP_BLOB.
* ``display-stopped``: a display socket and 1280x800 frames flushed in a loop; at the second frame the display
  stops reading, ``display-blocked`` (the parent stops the whole process: a VMM stopped while frames were on their
  way); after SIGCONT and a line on stdin, three more flushes and ``after`` with how many were answered.

Every wait is bounded: a scenario the parent forgets ends by itself after ``LIFETIME`` seconds.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time

from vgpu.protocol import (
    CtrlType,
    Format,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceUnmapBlob,
    TransferToHost2D,
    encode_command,
)
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, hdr, make_display, pattern, rtype
from vgpu.vhost_user.message import Message
from vgpu.vhost_user.shm_window import ShmMapping
from vgpu.vhost_user.wire import GpuRequest

E = CtrlType
LIFETIME = 60.0
# 120 chains of two descriptors fill a 256-entry ring; 16 MiB each keeps the back end busy for about half a second.
TRANSFERS = 120
SIDE = 2048
FRAME = (1280, 800)  # 4 MB per UPDATE: a display that stops reading fills its socket within the first frame


def say(*words: object) -> None:
    print(*words, flush=True)


def linger() -> None:
    """Wait to be killed (bounded)."""
    time.sleep(LIFETIME)
    say("lifetime-over")
    sys.exit(3)


def mapped(sock: str) -> None:
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES)
    g.fe.reserve_shm()
    c = CrossDomainGuest(g)
    c.start()
    total = 0
    for rid, offset in ((1, 0), (2, 0x100000)):
        reqs = c.requirements(256, 256)
        assert rtype(c.create_blob(rid, reqs)) == E.RESP_OK_NODATA
        assert rtype(c.map(rid, offset)) == E.RESP_OK_MAP_INFO
        g.fe.shm[1].write(offset, b"guest was here")
        total += int(reqs.size)  # type: ignore[attr-defined]
    say("mapped", f"blobs=2 bytes={total}")
    linger()


def map_pending(sock: str) -> None:
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES)
    g.fe.reserve_shm()
    c = CrossDomainGuest(g)
    c.start()
    c.create_blob(1, c.requirements(256, 256))

    def hold(m: ShmMapping, fd: int) -> None:
        say("map-pending", f"offset={m.shm_offset:#x} length={m.length:#x}")
        linger()  # on the service thread: the ack is never sent

    g.fe.on_shmem_map = hold
    g.fe.timeout = LIFETIME
    c.map(1, 0)
    say("map-answered")  # the parent kills us first; reaching this is a failure it will see
    linger()


def main_socket_closed(sock: str) -> None:
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES)
    g.fe.reserve_shm()
    c = CrossDomainGuest(g)
    c.start()
    c.create_blob(1, c.requirements(256, 256))

    def leave(m: ShmMapping, fd: int) -> None:
        # A VMM tearing the device down: the main socket goes first, the back-end channel is still open.
        g.fe.channel.sock.shutdown(socket.SHUT_RDWR)
        say("main-closed", f"offset={m.shm_offset:#x}")
        linger()

    g.fe.on_shmem_map = leave
    g.fe.timeout = LIFETIME
    c.map(1, 0)
    linger()


def transfer(sock: str) -> None:
    nbytes = SIDE * SIDE * 4
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES, ram_size=nbytes + (8 << 20))
    g.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, Format.FORMAT_B8G8R8X8_UNORM, SIDE, SIDE))
    b = g.backing(nbytes)
    g.ok(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 1, b.entries))
    q = g.fe.queues[0]
    cmd = encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, SIDE, SIDE), 0, 1))
    for _ in range(TRANSFERS):
        q.publish(q.add([cmd], [24]))
    start = q.used_idx()
    q.kick(force=True)
    [(_, ram_fd)] = g.ram.regions()
    say("kicked", f"ram_fd={ram_fd} used_gpa={q.used_gpa} used_start={start} count={TRANSFERS}")
    linger()


def display_stopped(sock: str) -> None:
    disp = make_display()
    resumed = threading.Event()
    seen = 0
    handle = disp.handle

    def stall(msg: Message) -> None:
        # At the second frame the display stops reading (the parent then stops the whole process): the back end's
        # next UPDATE fills the socket. A line on stdin lets it read again.
        nonlocal seen
        if msg.request == GpuRequest.UPDATE:
            seen += 1
            if seen == 2:
                # Strike only once the back end has started the next frame (bytes wait in our socket): a 4 MB frame
                # cannot fit, so it is blocked on us now, whatever the machine's load.
                assert disp.channel is not None
                select.select([disp.channel.sock], [], [], LIFETIME)
                say("display-blocked")
                sys.stdin.readline()
                resumed.set()
        handle(msg)

    disp.handle = stall  # type: ignore[method-assign]
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES, ram_size=16 << 20, display=disp)
    w, h_ = FRAME
    g.image_2d(1, w, h_, pixels=pattern(w, h_))
    g.show(1, 0, Rect(0, 0, w, h_))
    g.fe.timeout = LIFETIME
    deadline = time.monotonic() + LIFETIME
    while not resumed.is_set() and time.monotonic() < deadline:
        g.flush(1, Rect(0, 0, w, h_))
    # The guest's side after the stop: every flush still answered, whatever became of the display.
    answered = 0
    for _ in range(3):
        g.flush(1, Rect(0, 0, w, h_))
        answered += 1
    say("after", f"answered={answered} updates={len(disp.of(GpuRequest.UPDATE))}",
        f"display_errors={len(g.fe.service_errors)}")
    linger()


def stopped_map(sock: str) -> None:
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES)
    g.fe.reserve_shm()
    c = CrossDomainGuest(g)
    c.start()
    c.create_blob(1, c.requirements(256, 256))
    window = g.fe.shm[1]

    def freeze(m: ShmMapping, fd: int) -> None:
        g.fe.on_shmem_map = None
        say("map-pending", f"offset={m.shm_offset:#x}")
        # The parent stops this whole process now (SIGSTOP) and, before it continues us, writes a line: waiting
        # for it keeps the ack from leaving before the stop has taken hold.
        sys.stdin.readline()

    g.fe.on_shmem_map = freeze
    g.fe.timeout = LIFETIME
    say("map-response", f"type={rtype(c.map(1, 0)):#x}")
    # The late ack mapped the blob on our side (the service thread maps, then acks); a back end that gave up on
    # the map must take it back with SHMEM_UNMAP.
    deadline = time.monotonic() + 10
    while not window.log and time.monotonic() < deadline:
        time.sleep(0.01)
    while window.mappings and time.monotonic() < deadline:
        time.sleep(0.01)
    say("window-after", f"mappings={len(window.mappings)} log={','.join(k for k, _ in window.log)}")
    say("map-again", f"type={rtype(c.map(1, 0)):#x} mappings={len(window.mappings)}")
    window.write(0, b"mapped after the stop")
    unmap = g.cmd(encode_command(ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB, ctx_id=1), 1)), 24)
    say("unmap", f"type={rtype(unmap):#x} mappings={len(window.mappings)}")
    say("errors", f"n={len(g.fe.service_errors)} {g.fe.service_errors}")
    g.close()
    say("done")


SCENARIOS = {"mapped": mapped, "map-pending": map_pending, "main-closed": main_socket_closed, "transfer": transfer,
             "stopped-map": stopped_map, "display-stopped": display_stopped}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SCENARIOS:
        print(f"usage: python -m tests.fault_frontend {{{','.join(SCENARIOS)}}} SOCKET", file=sys.stderr)
        return 2
    SCENARIOS[argv[0]](argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
