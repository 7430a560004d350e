"""Options a VMM user sets on the device; the CLI fills them, the device reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import VIRTIO_GPU_MAX_SCANOUTS
from ..vhost_user import shmem_bit
from ..vhost_user.wire import ProtocolFeature
from .resources import Limits


@dataclass(frozen=True)
class GpuConfig:
    num_scanouts: int = 1
    # The display the guest sees when the front end gives us no display socket (or no display info).
    width: int = 1280
    height: int = 800
    edid: bool = True
    resource_uuid: bool = True
    # Blob resources (guest blobs now; host blobs when a context type provides them).
    blob: bool = True
    limits: Limits = field(default_factory=Limits)
    # Where to write scanout-N.png pictures (None: nowhere) and at most how many per second per scanout.
    png_dir: Path | None = None
    png_rate: float = 5.0
    # Keep every picture (numbered) rather than only the latest: for tests and for looking back at a boot.
    png_history: bool = False
    # Context types offered (capset ids; cross-domain = 5).  Any context type makes us offer VIRGL and
    # CONTEXT_INIT: the Linux guest accepts HOST3D blobs only with VIRGL, whatever the context type.
    context_types: tuple[int, ...] = ()
    # Size of the host-visible region (shared-memory id 1).  1 GiB or more lets firmware place the BAR above
    # 4 GiB, where the guest's MTRRs do not force cached mappings down to uncached.
    host_visible_size: int = 1 << 30
    # How long to wait for the front end to ack SHMEM_MAP/UNMAP before answering the guest with an error.
    map_timeout: float = 5.0
    # Show scanouts on the VMM's display socket when it hands one over (--display vmm, the default).
    vmm_display: bool = True
    # The protocol-feature bit SHMEM is offered on: 22 (the spec), or 21 for front ends on rust-vmm vhost 0.16 and
    # crosvm from 2026-03-09 to 2026-08-03 (spec/shmem-bit-21.md: never to QEMU 11.1, which reads it as
    # GPA_ADDRESSES).
    shmem_feature_bit: int = ProtocolFeature.SHMEM

    def __post_init__(self) -> None:
        if not 1 <= self.num_scanouts <= VIRTIO_GPU_MAX_SCANOUTS:
            raise ValueError(f"num_scanouts must be 1..{VIRTIO_GPU_MAX_SCANOUTS}")
        if not (16 <= self.width <= 16384 and 16 <= self.height <= 16384):
            raise ValueError("display size must be within 16..16384 pixels")
        if self.png_rate <= 0:
            raise ValueError("png_rate must be positive")
        if self.host_visible_size % 4096 or self.host_visible_size < 0:
            raise ValueError("host_visible_size must be a multiple of the page size")
        shmem_bit.check(self.shmem_feature_bit)
