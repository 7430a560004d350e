"""What one front-end connection has negotiated and set up, apart from the loop that serves it and the handlers
that change it (h11 keeps its state machine apart from I/O the same way): features offered and acked, the
protocol features, ownership and status, guest memory, the rings and the back-end channel."""

from __future__ import annotations

from dataclasses import dataclass, field

from .memory import GuestMemory
from .message import Channel
from .virtqueue import Virtqueue
from .wire import MAX_MEM_SLOTS, ProtocolFeature, bit


@dataclass
class ConnectionState:
    offered_features: int
    # As offered on the wire; `protocol_features` is what the acked ones mean (SHMEM on its own bit, shmem_bit.py).
    offered_protocol: int
    queues: list[Virtqueue]
    memory: GuestMemory = field(default_factory=lambda: GuestMemory(MAX_MEM_SLOTS))
    acked_features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    backend_channel: Channel | None = None
    shmem_bit: int = ProtocolFeature.SHMEM

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & bit(feature))
