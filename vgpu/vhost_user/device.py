"""The one small interface between the vhost-user transport and a device.

A device implements only what it offers (the defaults describe a device with no config space, no shared memory
and no display socket), the way rust-vmm's `VhostUserBackend` is kept apart from its protocol handler.  The
transport calls in; the device calls back only through `Transport`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Protocol

from .memory import GuestMemory
from .message import Channel, Message
from .virtqueue import DescriptorChain, Virtqueue
from .wire import MAX_QUEUE_SIZE, BackendRequest, ProtocolFeature


class DeviceRefused(Exception):
    """The device will not do what the front end asked; the front end gets a failure ack (or a log line)."""


class BackendChannelError(Exception):
    """A back-end request failed: no channel, a non-zero ack, or no ack in time."""


class Transport(Protocol):
    """What the transport offers a device during one front-end connection."""

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def queues(self) -> list[Virtqueue]: ...

    @property
    def protocol_features(self) -> int:
        """The protocol features the front end acknowledged."""
        ...

    def complete(self, queue: Virtqueue, chain: DescriptorChain, written: int) -> None:
        """Hand `chain` back to the driver with `written` response bytes and release its views."""

    def flush(self, queue: Virtqueue) -> None:
        """Notify the driver of completed chains, if it asked to be."""

    def backend_request(
        self, request: BackendRequest, payload: bytes, fds: list[int] | None = None, timeout: float = 5.0
    ) -> None:
        """Send a request on the back-end channel and wait for its ack (when REPLY_ACK is negotiated) while
        still serving the front end.  Raises BackendChannelError."""

    def wait_reply(self, channel: Channel, request: int, timeout: float) -> Message:
        """Wait for a reply to `request` on a device-owned channel while still serving the front end."""
        ...

    def wait_writable(self, sock: socket.socket, timeout: float) -> None:
        """Wait until a device-owned socket can take more bytes, still serving the front end meanwhile (a front
        end may wait for our reply before it reads that socket again).  Raises BackendChannelError."""
        ...

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fd` is readable (until unwatch)."""

    def unwatch(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop after `delay` seconds (not while the device is mid-command)."""


class Device:
    """Base class: override what the device offers."""

    num_queues: int = 1
    # vhost-user has no message that tells the front end a ring limit, so a VMM offers the guest its own: crosvm
    # offers the virtio maximum and Linux takes it.  Anything smaller refuses such a guest its rings.
    max_queue_size: int = MAX_QUEUE_SIZE
    # The protocol-feature bit SHMEM is offered on: 22, or 21 for peers that still say so (see shmem_bit.py).
    shmem_feature_bit: int = ProtocolFeature.SHMEM

    def attach(self, transport: Transport) -> None:
        """A front end connected; keep `transport` for the connection's lifetime."""
        self.transport = transport

    def device_features(self) -> int:
        """Device-specific virtio feature bits (the transport adds VERSION_1, EVENT_IDX, INDIRECT_DESC and
        PROTOCOL_FEATURES itself)."""
        return 0

    def protocol_features(self) -> int:
        """Optional protocol features the device can use beyond the transport's own (CONFIG, SHMEM, ...)."""
        return 0

    def set_features(self, features: int) -> None:
        """The driver's acknowledged virtio features."""

    def config(self) -> bytes:
        """The whole device config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        raise DeviceRefused("this device has no writable config space")

    def shmem_regions(self) -> dict[int, int]:
        """Shared memory regions the device wants from the front end: {shmid: size in bytes}."""
        return {}

    def memory_changed(self) -> None:
        """The memory table changed; views into removed regions are no longer translated."""

    def queue_started(self, queue: Virtqueue) -> None:
        """The ring is set up and may be processed."""

    def queue_stopped(self, queue: Virtqueue) -> None:
        """GET_VRING_BASE stopped the ring; no chain of it may be completed any more."""

    def process_queue(self, queue: Virtqueue) -> None:
        """The driver kicked `queue`: take its chains and complete them through the transport."""

    def set_gpu_socket(self, sock: socket.socket) -> None:
        """vhost-user-gpu handed us its display socket; a device that has no display refuses it."""
        sock.close()
        raise DeviceRefused("this device has no display")

    def set_status(self, status: int) -> None:
        """The driver's device status byte (with F_STATUS)."""

    def reset(self) -> None:
        """Drop all device state: the connection ended or the front end sent RESET_DEVICE."""

    def status(self) -> Mapping[str, object]:
        """The device's state as plain, JSON-serialisable data for a status query.  Called on the loop, possibly
        while the device itself waits for an ack (that is when an operator most wants to look), so it only
        reads."""
        return {}

    def disconnected(self) -> None:
        """The front end is gone (closed, crashed or broke the protocol): release everything, as reset does; a
        device may first log what the connection left behind."""
        self.reset()
