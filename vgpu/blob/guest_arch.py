"""What the guest's architecture does with a map_info, and the one answer the device adapts to it.

The resolver (:mod:`vgpu.blob.resolve`) says how the *host* maps a buffer.  The guest turns the map_info it is sent
into a memory type of its own (Linux ``virtio_gpu_vram_mmap``: CACHED keeps the default pgprot, WC takes
``pgprot_writecombine``, UNCACHED ``pgprot_noncached``), and the same request means different memory on different
CPUs — measured in an arm64 guest's own page tables (``spec/arm64.md``):

=========  ===============================  =====================================
map_info   x86 guest (PAT)                  arm64 guest (AttrIndx -> MAIR_EL1)
=========  ===============================  =====================================
CACHED     write-back                       Normal write-back
WC         write-combining                  Normal non-cacheable
UNCACHED   uncached-minus                   Device-nGnRnE
=========  ===============================  =====================================

Device memory is for registers: an unaligned access faults, so a client's plain ``memcpy`` into an UNCACHED blob
dies of SIGBUS on arm64 (our arm64 guest shows it, QEMU enforcing the alignment rule as hardware does), where x86's
uncached-minus tolerates it.  For a buffer, what UNCACHED must guarantee is that no cache holds its bytes, and
Normal non-cacheable guarantees exactly that: no alias of the buffer anywhere is cacheable, so the hazard of
mismatched attributes (a cache line that the other side's uncached accesses bypass) cannot arise.  What the guest
gives up is Device memory's ordering and no-gathering rules, which a buffer does not need.  Linux makes the same
choice for arm64: its own "uncached" DMA buffers are mapped Normal-NC (``pgprot_dmacoherent``), and since 6.8 KVM
maps VFIO PCI BARs Normal-NC at stage 2 (``VM_ALLOW_ANY_UNCACHED``) so that guests can access them unaligned.

So for an aarch64 guest an UNCACHED answer is sent as WC, saying so in the detail; every other answer is sent as
resolved.  The direction that matters is never touched: nothing non-cacheable on the host becomes cacheable in the
guest.

How the back end knows the architecture: vhost-user does not say (the front end sends memory regions and rings,
never the guest's machine).  With KVM — the only case where the memory type reaches hardware — the guest has the
host's architecture, so that is the default; an emulated guest of another architecture is named by the operator
(``--guest-arch``), and the start-up log and status document say which was used and why.
"""

from __future__ import annotations

import enum
import platform
from dataclasses import dataclass

from .types import CacheAttr, CacheResolver, HostBuffer, Resolution


class GuestArch(enum.Enum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    OTHER = "other"  # an architecture we have not measured: answers are sent as resolved


#: ``uname -m`` spellings of each architecture.
_MACHINES = {"x86_64": GuestArch.X86_64, "amd64": GuestArch.X86_64, "aarch64": GuestArch.AARCH64,
             "arm64": GuestArch.AARCH64}

#: Why the UNCACHED -> WC substitution is safe, in the words the MAP_BLOB log line and status detail carry.
AARCH64_UNCACHED = ("sent as WC to an aarch64 guest: its UNCACHED is Device-nGnRnE, where unaligned accesses "
                    "and memcpy fault; Normal non-cacheable keeps every alias of the buffer uncached")


def host_guest_arch(machine: str | None = None) -> GuestArch:
    """The guest architecture assumed when the operator names none: the host's (what KVM runs)."""
    return _MACHINES.get(machine if machine is not None else platform.machine(), GuestArch.OTHER)


def parse_guest_arch(text: str) -> GuestArch:
    """``--guest-arch`` values: x86_64, aarch64 (or their ``uname -m`` aliases amd64, arm64), other."""
    if text in _MACHINES:
        return _MACHINES[text]
    try:
        return GuestArch(text)
    except ValueError:
        known = ", ".join(sorted({*_MACHINES, GuestArch.OTHER.value}))
        raise ValueError(f"unknown guest architecture {text!r} (known: {known})") from None


def for_guest(resolution: Resolution, arch: GuestArch) -> Resolution:
    """The answer to send a guest of ``arch`` for a buffer the host maps as ``resolution`` says."""
    if arch is GuestArch.AARCH64 and resolution.attr is CacheAttr.UNCACHED:
        return Resolution(CacheAttr.WC, resolution.provenance,
                          f"{resolution.detail}; host mapping UNCACHED, {AARCH64_UNCACHED}")
    return resolution


@dataclass(frozen=True)
class GuestResolver:
    """A :class:`~vgpu.blob.types.CacheResolver` that resolves with ``inner`` and adapts the answer to the guest:
    what the device tells the guest (image requirements, RESP_OK_MAP_INFO, the status query) all comes from here."""

    inner: CacheResolver
    arch: GuestArch

    def resolve(self, buffer: HostBuffer) -> Resolution:
        resolution = for_guest(self.inner.resolve(buffer), self.arch)
        buffer.resolution = resolution
        return resolution
