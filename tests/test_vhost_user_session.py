"""The back end as a real process, driven by our front end over a real Unix socket with memfd guest memory and
eventfds: handshake, ring traffic, the back-end channel, resume, reconnects — and the fds it holds afterwards."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, open_fds, wait_until
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.examples.echo import pattern
from vgpu.vhost_user.frontend import Frontend, FrontendError, _mem_table
from vgpu.vhost_user.shm_window import ShmMapping
from vgpu.vhost_user.wire import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    FrontendRequest,
    ProtocolFeature,
    bit,
    build_u64,
)

SHM_GPA = 0x1_0000_0000


def connect(b: BackendProcess, **negotiate: int) -> Frontend:
    fe = Frontend.connect(b.socket_path)
    fe.negotiate(**negotiate)
    return fe


def ready(b: BackendProcess, queues: int = 2) -> tuple[Frontend, GuestRam]:
    fe = connect(b)
    fe.reserve_shm()
    ram = GuestRam(8 << 20)
    fe.share_memory(ram)
    for i in range(queues):
        fe.setup_queue(i, 256)
    return fe, ram


def test_handshake_replies(echo_backend: BackendProcess) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    try:
        # Protocol features work before SET_FEATURES, and every reply is flagged version 1 | REPLY.
        feats = fe.u64(FrontendRequest.GET_FEATURES)
        assert feats & bit(VIRTIO_F_VERSION_1) and feats & bit(VHOST_USER_F_PROTOCOL_FEATURES)
        proto = fe.u64(FrontendRequest.GET_PROTOCOL_FEATURES)
        for f in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ,
                  ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.SHMEM,
                  ProtocolFeature.RESET_DEVICE, ProtocolFeature.STATUS):
            assert proto & bit(f), f.name
        fe.send(FrontendRequest.GET_QUEUE_NUM)
        msg = fe.recv()
        assert (msg.request, msg.flags, msg.payload) == (FrontendRequest.GET_QUEUE_NUM, 0x5, build_u64(2))
        assert fe.u64(FrontendRequest.GET_MAX_MEM_SLOTS) >= 32
        fe.negotiate()
        assert fe.has(ProtocolFeature.REPLY_ACK)
        # REPLY_ACK: a request that has no reply of its own gets a u64 0 when NEED_REPLY is set.
        fe.send(FrontendRequest.SET_STATUS, build_u64(0x0F), flags=0x9)
        ack = fe.recv()
        assert (ack.request, ack.flags, ack.payload) == (FrontendRequest.SET_STATUS, 0x5, build_u64(0))
        assert fe.u64(FrontendRequest.GET_STATUS) == 0x0F
        # A request with its own reply gets exactly that, no extra ack.
        fe.send(FrontendRequest.GET_FEATURES, flags=0x9)
        assert fe.recv().payload == build_u64(feats)
        with pytest.raises(TimeoutError):
            fe.recv(timeout=0.2)
        assert fe.shmem_config() == {1: 16 << 20}
    finally:
        fe.close()


def test_ring_traffic_both_queues_direct_and_indirect(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        assert fe.submit(0, b"to queue zero", 64) == b"to queue zero"
        assert fe.submit(1, b"to queue one", 64) == b"to queue one"
        assert fe.submit(0, b"indirect" * 100, 1024, indirect=True) == b"indirect" * 100
        # The response never overflows the writable part.
        assert fe.submit(0, b"0123456789", 4) == b"0123"
        batch = [f"req {i}".encode() for i in range(64)]
        assert fe.submit_batch(0, batch, 32) == batch
    finally:
        fe.close()
        ram.close()


def test_event_idx_negotiated_and_kick_suppression(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        assert fe.features & bit(VIRTIO_RING_F_EVENT_IDX)
        q = fe.queues[0]
        assert fe.submit(0, b"one", 8) == b"one"
        # The device has asked to be kicked at the next avail index; publishing two without a kick in between
        # only needs the kick for the first.
        p1 = q.add([b"a"], [1])
        q.publish(p1)
        assert q.needs_kick()
        os.eventfd_write(q.kick_fd, 1)
        assert wait_until(lambda: q.used_idx() == 2)
        p2 = q.add([b"b"], [1])
        q.publish(p2)
        p3 = q.add([b"c"], [1])
        q.publish(p3)
        assert q.needs_kick()  # avail_event was 2, we moved from 2 to 4
        os.eventfd_write(q.kick_fd, 1)
        assert wait_until(lambda: q.used_idx() == 4)
        assert {bytes(q.read_response(p, n)) for p, n in q.collect()} == {b"a", b"b", b"c"}
    finally:
        fe.close()
        ram.close()


def test_get_vring_base_stops_and_set_vring_base_resumes(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        for i in range(5):
            assert fe.submit(0, b"x%d" % i, 8) == b"x%d" % i
        q = fe.queues[0]
        assert fe.get_vring_base(0) == 5
        # Stopped: a new chain is not processed even when kicked.
        p = q.add([b"while stopped"], [32])
        q.publish(p)
        os.eventfd_write(q.kick_fd, 1)
        time.sleep(0.2)
        assert q.used_idx() == 5
        # Resume exactly where we left off: the pending chain is processed.
        fe.request(FrontendRequest.SET_VRING_BASE, (0).to_bytes(4, "little") + (5).to_bytes(4, "little"))
        fe.request(FrontendRequest.SET_VRING_KICK, build_u64(0), fds=[q.kick_fd])
        assert wait_until(lambda: q.used_idx() == 6)
        ((done, n),) = q.collect()
        assert done is p and q.read_response(p, n) == b"while stopped"
    finally:
        fe.close()
        ram.close()


def test_config_space_and_config_change(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        assert fe.get_config(0, 8) == bytes(8)
        fe.set_config(4, b"\x01\x02\x03\x04")
        assert fe.get_config(4, 4) == b"\x01\x02\x03\x04"
        with pytest.raises(FrontendError):
            fe.set_config(0, b"\xff")  # read-only part
        assert fe.get_config(4, 12) == b"\x01\x02\x03\x04" + bytes(8)  # past the end reads as zero
        with pytest.raises(FrontendError):
            fe.get_config(250, 8)  # past the largest config space vhost-user carries: size 0 (failed)
        assert fe.submit(0, b"config-change", 16) == b"ok"
        assert fe.config_changes == 1 and fe.get_config(0, 1) == b"\x01"
    finally:
        fe.close()
        ram.close()


def test_shmem_map_and_unmap_through_the_backend_channel(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        assert fe.submit(0, b"map 65536 131072", 64) == b"ok"
        window = fe.shm[1]
        assert window.read(65536, 4096) == pattern(131072)[:4096]
        assert fe.submit(0, b"map 0 65536", 64) == b"ok"
        # Overlap is refused by the front end and reported to the device, which keeps serving.
        assert fe.submit(0, b"map 131072 4096", 64).startswith(b"err")
        assert fe.submit(0, b"unmap 65536 131072", 64) == b"ok"
        assert fe.submit(0, b"unmap 0 65536", 64) == b"ok"
        assert [kind for kind, _ in window.log] == ["map", "map", "unmap", "unmap"]
        assert window.mappings == {}
    finally:
        fe.close()
        ram.close()


def test_no_deadlock_when_the_front_end_sends_add_mem_reg_before_acking(echo_backend: BackendProcess) -> None:
    """QEMU adds a mapped blob to the memory table (ADD_MEM_REG, NEED_REPLY) before it acks SHMEM_MAP."""
    fe, ram = ready(echo_backend)
    added: list[ShmMapping] = []

    def add_region_first(m: ShmMapping, fd: int) -> None:
        window = fe.shm[1]
        fe.add_mem_reg(SHM_GPA + m.shm_offset, m.length, window.base + m.shm_offset, m.fd_offset, fd)
        added.append(m)

    fe.on_shmem_map = add_region_first
    try:
        assert fe.submit(0, b"map 0 65536", 64) == b"ok"
        assert len(added) == 1
        fe.on_shmem_map = None
        assert fe.submit(0, b"unmap 0 65536", 64) == b"ok"
        fe.rem_mem_reg(SHM_GPA, 65536, fe.shm[1].base)
        assert fe.submit(0, b"still serving", 64) == b"still serving"
    finally:
        fe.close()
        ram.close()


def test_unacked_shmem_map_times_out_and_the_late_ack_is_ignored(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    gate = threading.Event()
    fe.on_shmem_map = lambda m, fd: gate.wait(3)  # hold the ack past the back end's 1 s timeout
    try:
        reply = fe.submit(0, b"map 0 65536", 64)
        assert reply.startswith(b"err") and b"no reply" in reply
        gate.set()
        fe.on_shmem_map = None
        # The late ack for the first map must not be taken for the ack of this one.
        time.sleep(0.1)
        assert fe.submit(0, b"map 1048576 65536", 64) == b"ok"
        assert echo_backend.alive()
    finally:
        fe.close()
        ram.close()


def test_reset_device_keeps_the_connection_usable(echo_backend: BackendProcess) -> None:
    fe, ram = ready(echo_backend)
    try:
        assert fe.submit(0, b"map 0 4096", 64) == b"ok"
        fe.request(FrontendRequest.RESET_DEVICE)
        for q in fe.queues.values():
            q.close()
        fe.queues.clear()
        fe.setup_queue(0, 128)
        assert fe.submit(0, b"after reset", 64) == b"after reset"
    finally:
        fe.close()
        ram.close()


def test_hundred_connect_disconnect_cycles_leak_nothing(echo_backend: BackendProcess) -> None:
    baseline = fd_count(echo_backend.pid)  # idle: nobody connected yet
    before = open_fds(echo_backend.pid)
    for i in range(100):
        fe, ram = ready(echo_backend)
        assert fe.submit(i % 2, b"cycle %d" % i, 32) == b"cycle %d" % i
        if i % 10 == 0:
            assert fe.submit(0, b"map 0 65536", 16) == b"ok"  # a mapping left behind for the disconnect
        fe.close()
        ram.close()
    assert echo_backend.settle_fds(baseline) == baseline, open_fds(echo_backend.pid) - before
    assert echo_backend.alive()


def test_set_mem_table_with_two_regions_then_replaced(echo_backend: BackendProcess) -> None:
    """Without CONFIGURE_MEM_SLOTS the table comes whole: rings in one region, buffers in another (above 4 GiB),
    then a second SET_MEM_TABLE replaces it and traffic carries on through the new mapping."""
    fe = Frontend.connect(echo_backend.socket_path)
    low = GuestRam(1 << 20, gpa_base=0)
    high = GuestRam(1 << 20, gpa_base=1 << 32)
    try:
        fe.negotiate(protocol_features=bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ))
        assert not fe.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        regions = [dict(guest_phys_addr=r.gpa_base, memory_size=r.size, userspace_addr=r.uva, mmap_offset=0)
                   for r in (low, high)]
        fe.request(FrontendRequest.SET_MEM_TABLE, _mem_table(regions), fds=[low.fd, high.fd])
        fe.ram = low
        q = fe.setup_queue(0, 64)
        gpa = high.alloc(64)
        high.write(gpa, b"from the high region")
        p = q.add_raw([(gpa, 20, False), (high.alloc(64), 64, True)])
        q.publish(p)
        q.kick()
        assert q.wait(5), echo_backend.log()
        ((done, n),) = q.collect()
        assert n == 20  # the echo wrote into the high buffer
        assert high.read(p.buffers[1][0], 20) == b"from the high region"
        # Replace the table with the low region only: the high buffer is no longer guest memory.
        fe.request(FrontendRequest.SET_MEM_TABLE, _mem_table(regions[:1]), fds=[low.fd])
        assert fe.submit(0, b"after replace", 32) == b"after replace"
        bad = q.add_raw([(gpa, 20, False)])
        q.publish(bad)
        q.kick()
        assert q.wait(5)
        ((done, n),) = q.collect()
        assert done is bad and n == 0
    finally:
        fe.close()
        low.close()
        high.close()


def test_kick_and_call_without_fds_poll(echo_backend: BackendProcess) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    try:
        fe.negotiate()
        fe.share_memory(ram)
        q = fe.setup_queue(0, 64)
        # Replace the kick and call eventfds by "no fd": the back end polls the ring and signals nothing.
        fe.request(FrontendRequest.SET_VRING_CALL, build_u64(0 | 0x100))
        fe.request(FrontendRequest.SET_VRING_KICK, build_u64(0 | 0x100))
        p = q.add([b"polled"], [16])
        q.publish(p)  # no kick
        assert wait_until(lambda: q.used_idx() == 1)
        ((done, n),) = q.collect()
        assert q.read_response(done, n) == b"polled"
        with pytest.raises(BlockingIOError):
            os.eventfd_read(q.call_fd)
    finally:
        fe.close()
        ram.close()


def test_without_protocol_features_rings_start_enabled(echo_backend: BackendProcess) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    try:
        fe.backend_features = fe.u64(FrontendRequest.GET_FEATURES)
        fe.features = bit(VIRTIO_F_VERSION_1)  # no bit 30: no SET_VRING_ENABLE will come
        fe.request(FrontendRequest.SET_OWNER, need_reply=False)
        fe.request(FrontendRequest.SET_FEATURES, build_u64(fe.features), need_reply=False)
        fe.share_memory(ram, use_add_mem_reg=False)
        fe.setup_queue(0, 64, enable=False)
        assert fe.submit(0, b"enabled by default", 32) == b"enabled by default"
    finally:
        fe.close()
        ram.close()


def test_features_never_offered_are_dropped_not_fatal(echo_backend: BackendProcess) -> None:
    """QEMU 10 acks VIRTIO_F_RING_RESET to back ends that never offered it: keep what was offered."""
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    try:
        fe.negotiate()
        fe.request(FrontendRequest.SET_FEATURES, build_u64(fe.features | 1 << 40))
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
        assert fe.submit(0, b"still fine", 16) == b"still fine"
        assert "ignoring bits 0x10000000000" in echo_backend.log()
    finally:
        fe.close()
        ram.close()
