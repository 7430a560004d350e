"""How a VMM brings a vhost-user GPU back end up, as profiles of our front end.

VMMs differ in the order of their set-up messages and in what they ask for, and a back end that works with one can
fail with another (a queue size it never saw, a config read before SET_FEATURES, no display socket).  A `Profile`
names those choices; `bring_up` follows one, so a test or the conformance runner can drive a back end as that VMM
would, guest included: the Linux driver reads `num_scanouts` and `num_capsets` before it sets DRIVER_OK, which is
when a VMM activates the device (SET_FEATURES, memory, rings).

`QEMU` is what this front end has always done (modelled on QEMU's vhost-user front end).  `CROSVM` is read from
crosvm's source at the revision in `CROSVM.follows`; spec/crosvm-profile.md cites file and line for each choice.
No crosvm binary ran: crosvm is not packaged for Debian and is not built here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .driver import GuestRam
from .frontend import FRONTEND_PROTOCOL_FEATURES, QEMU_VRING_ORDER, Display, Frontend, FrontendError
from .message import Message
from .wire import (
    CONFIG_FLAG_MIGRATION,
    CONFIG_FLAG_WRITABLE,
    MAX_QUEUE_SIZE,
    SHMEM_MAX_REGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    CrosvmBackendRequest,
    FrontendRequest,
    ProtocolFeature,
    bit,
    build_u64,
)

# virtio_gpu_config: what the Linux driver reads before DRIVER_OK (virtgpu_kms.c, virtio_gpu_init).
NUM_SCANOUTS_FIELD: Final = (8, 4)
NUM_CAPSETS_FIELD: Final = (12, 4)


def _errno(code: int) -> int:
    """-errno as the u64 crosvm's FrontendServer::send_reply writes."""
    return -code & (1 << 64) - 1


@dataclass(frozen=True)
class Profile:
    """One VMM's way of bringing a vhost-user GPU up (see the module docstring)."""

    name: str
    #: The source the choices were read from (a revision, or "this front end").
    follows: str
    #: Protocol features the VMM asks for; it acks these where the back end offers them.
    protocol_features: int
    #: Transport feature bits the VMM lets through to the guest (device bits pass as the caller asks).
    transport_features: int
    #: SET_OWNER before GET_FEATURES (crosvm) or after the protocol features (QEMU, this front end).
    owner_first: bool
    #: SET_FEATURES only when the driver sets DRIVER_OK, after its config reads (crosvm's `activate`).
    features_at_activation: bool
    #: GET_QUEUE_NUM when MQ was negotiated (crosvm sizes the device from the answer).
    asks_queue_num: bool
    #: GET_SHMEM_CONFIG while the device is created, before the guest runs (crosvm); else after the rings.
    shmem_at_creation: bool
    #: More shared-memory regions than this and the VMM gives the device none (crosvm takes one).
    max_shmem_regions: int
    #: 0: ADD_MEM_REG where CONFIGURE_MEM_SLOTS was negotiated, else one SET_MEM_TABLE entry; n: always
    #: SET_MEM_TABLE with the RAM as n entries of one memfd.
    memory_regions: int
    vring_order: tuple[FrontendRequest, ...]
    #: The ring size the guest ends up with.
    queue_size: int
    #: Whether it hands the back end a vhost-user-gpu display socket (GPU_SET_SOCKET, QEMU's protocol).
    display_socket: bool
    #: GET_CONFIG requests the driver's reads turn into before DRIVER_OK: (offset, size) each.
    config_reads: tuple[tuple[int, int], ...]
    #: The flags word of its GET_CONFIG requests.
    config_flags: int
    #: Whether its own requests carry NEED_REPLY once REPLY_ACK is negotiated.
    acks_requests: bool
    #: The u64 it answers a back-end request it could not honour with.
    failure_status: int
    #: The protocol-feature bit it means SHMEM by (its `protocol_features` ask for SHMEM on that bit).
    shmem_bit: int = ProtocolFeature.SHMEM
    #: Its own back-end requests: request id → handler returning the status (always sent back).
    extra_backend_requests: dict[int, Callable[[Message], int]] = field(default_factory=dict)


QEMU: Final = Profile(
    name="qemu",
    follows="this front end (modelled on QEMU's vhost-user front end)",
    protocol_features=FRONTEND_PROTOCOL_FEATURES,
    transport_features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC),
    owner_first=False,
    features_at_activation=False,
    asks_queue_num=False,
    shmem_at_creation=False,
    max_shmem_regions=SHMEM_MAX_REGIONS,
    memory_regions=0,
    vring_order=QEMU_VRING_ORDER,
    queue_size=256,
    display_socket=True,
    config_reads=(),
    config_flags=CONFIG_FLAG_WRITABLE,
    acks_requests=True,
    failure_status=1,
)


def _crosvm_gpu_map(msg: Message) -> int:
    # crosvm imports the Vulkan memory through its VmRequester; this front end has no Vulkan, so the import fails
    # as crosvm's does when it cannot import (an error without an errno: -EINVAL).
    return _errno(errno.EINVAL)


def _crosvm_external_map(msg: Message) -> int:
    # A raw pointer is honoured only from an in-process back end (handler.rs, since 70f53985c).
    return _errno(errno.EPERM)


CROSVM: Final = Profile(
    name="crosvm",
    follows="google/crosvm f1e797a68dada35cbafef8d0cfae36bacfaea85e (2026-08-21)",
    protocol_features=(bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.BACKEND_REQ)
                       | bit(ProtocolFeature.DEVICE_STATE) | bit(ProtocolFeature.SHMEM)
                       | bit(ProtocolFeature.REPLY_ACK)),
    # base_features(): VERSION_1, RING_EVENT_IDX (and F_SUSPEND, ACCESS_PLATFORM for protected VMs, which no GPU
    # back end offers); INDIRECT_DESC is outside VIRTIO_DEVICE_TYPE_SPECIFIC_FEATURES_MASK and never passes.
    transport_features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX),
    owner_first=True,
    features_at_activation=True,
    asks_queue_num=True,
    shmem_at_creation=True,
    max_shmem_regions=1,
    # crosvm's guest RAM is ranges of one memfd (vm_memory create_shm), all in one SET_MEM_TABLE; two entries are
    # what a guest with RAM on both sides of the 32-bit PCI hole gets.
    memory_regions=2,
    vring_order=(FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_ADDR, FrontendRequest.SET_VRING_BASE,
                 FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_ENABLE),
    # crosvm offers Queue::MAX_SIZE without asking the back end (vhost-user cannot); Linux takes the device's
    # maximum (virtio_pci_modern.c setup_vq) and halves it only when the ring cannot be allocated.
    queue_size=MAX_QUEUE_SIZE,
    display_socket=False,
    config_reads=(NUM_SCANOUTS_FIELD, NUM_CAPSETS_FIELD),
    # VhostUserConfigFlags::WRITABLE = 1, which QEMU's numbering calls VHOST_SET_CONFIG_TYPE_MIGRATION.
    config_flags=CONFIG_FLAG_MIGRATION,
    acks_requests=False,
    failure_status=_errno(errno.EINVAL),
    extra_backend_requests={CrosvmBackendRequest.GPU_MAP: _crosvm_gpu_map,
                            CrosvmBackendRequest.EXTERNAL_MAP: _crosvm_external_map},
)

PROFILES: Final = {p.name: p for p in (QEMU, CROSVM)}


def bring_up(fe: Frontend, ram: GuestRam, profile: Profile, device_features: int, display: Display | None = None,
             queues: int = 2, protocol_features: int | None = None) -> None:
    """Set the back end up as `profile`'s VMM does and start `queues` rings; the driver acks `device_features`
    (of what the back end offers).  `display` is handed over only where the profile has a display socket.  With
    `queues` 0 it stops once the features are set (for callers that lay out memory and rings themselves), and
    `protocol_features` narrows what the VMM asks for."""
    fe.acks_requests = profile.acks_requests
    fe.failure_status = profile.failure_status
    fe.extra_backend_requests = dict(profile.extra_backend_requests)
    fe.shmem_bit = profile.shmem_bit
    asked = profile.protocol_features if protocol_features is None else protocol_features & profile.protocol_features
    if profile.owner_first:
        fe.request(FrontendRequest.SET_OWNER)
    fe.backend_features = fe.u64(FrontendRequest.GET_FEATURES)
    if fe.backend_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        fe.backend_protocol_features = fe.u64(FrontendRequest.GET_PROTOCOL_FEATURES)
        fe.protocol_features = fe.backend_protocol_features & asked
        fe.request(FrontendRequest.SET_PROTOCOL_FEATURES, build_u64(fe.protocol_features), need_reply=False)
    if not profile.owner_first:
        fe.request(FrontendRequest.SET_OWNER)
    if fe.has(ProtocolFeature.BACKEND_REQ):
        fe.open_backend_channel()
    if profile.asks_queue_num and fe.has(ProtocolFeature.MQ):
        n = fe.u64(FrontendRequest.GET_QUEUE_NUM)
        if n < queues:
            raise FrontendError(f"GET_QUEUE_NUM says {n} queues, the device needs {queues}")
    wanted = bit(VHOST_USER_F_PROTOCOL_FEATURES) | profile.transport_features | device_features
    fe.features = fe.backend_features & wanted
    if not profile.features_at_activation:
        fe.request(FrontendRequest.SET_FEATURES, build_u64(fe.features))
    if profile.shmem_at_creation:
        _shared_memory(fe, profile)
    for offset, size in profile.config_reads:
        fe.get_config(offset, size, profile.config_flags)
    if profile.features_at_activation:
        fe.request(FrontendRequest.SET_FEATURES, build_u64(fe.features))
    if not queues:
        return
    if profile.memory_regions:
        fe.share_memory(ram, use_add_mem_reg=False, regions=profile.memory_regions)
    else:
        fe.share_memory(ram)
    for index in range(queues):
        fe.setup_queue(index, profile.queue_size, order=profile.vring_order)
    if profile.display_socket and display is not None:
        fe.set_display(display)
    if not profile.shmem_at_creation:
        _shared_memory(fe, profile)


def _shared_memory(fe: Frontend, profile: Profile) -> None:
    """Reserve a window per region GET_SHMEM_CONFIG names (none when there are more than the VMM takes)."""
    if not fe.has(ProtocolFeature.SHMEM):
        return
    sizes = fe.shmem_config()
    if len(sizes) > profile.max_shmem_regions:
        fe.service_errors.append(f"{len(sizes)} shared-memory regions: {profile.name} takes at most "
                                 f"{profile.max_shmem_regions}, so the device gets none")
        return
    fe.reserve_shm(sizes)
