"""Which protocol-feature bit spells SHMEM on a connection.

The spec (QEMU 11.1, crosvm since 2026-08-04, rust-vmm vhost 0.17) says bit 22.  rust-vmm vhost 0.16 and crosvm
from 2026-03-09 to 2026-08-03 said bit 21, which the spec gives to GPA_ADDRESSES: a back end that offers bit 21 to
QEMU 11.1 is taken to accept guest-physical ring addresses (measured: QEMU 11.1.3 acks it).  So bit 21 is offered
only when the operator asks (spec/shmem-bit-21.md); inside the back end SHMEM is always `ProtocolFeature.SHMEM`,
and only what crosses the wire is translated.
"""

from __future__ import annotations

from typing import Final

from .wire import LEGACY_SHMEM_BIT, ProtocolFeature, bit

SHMEM_BITS: Final = (int(ProtocolFeature.SHMEM), int(LEGACY_SHMEM_BIT))


def check(shmem_bit: int) -> int:
    if shmem_bit not in SHMEM_BITS:
        raise ValueError(f"SHMEM is spelled on bit {' or '.join(map(str, SHMEM_BITS))}, not {shmem_bit}")
    return shmem_bit


def to_wire(features: int, shmem_bit: int) -> int:
    """Protocol features as the front end sees them: SHMEM on `shmem_bit`."""
    if shmem_bit == ProtocolFeature.SHMEM or not features & bit(ProtocolFeature.SHMEM):
        return features
    return features & ~bit(ProtocolFeature.SHMEM) | bit(shmem_bit)


def from_wire(features: int, shmem_bit: int) -> int:
    """What the front end's protocol features mean to us: `shmem_bit` read as SHMEM."""
    if shmem_bit == ProtocolFeature.SHMEM or not features & bit(shmem_bit):
        return features
    return features & ~bit(shmem_bit) | bit(ProtocolFeature.SHMEM)
