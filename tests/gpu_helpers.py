"""A guest's-eye handle on a GPU back end: our front end with memory and both queues set up."""

from __future__ import annotations

from dataclasses import dataclass

from vgpu.protocol import GpuFeature
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend


@dataclass
class Gpu:
    fe: Frontend
    ram: GuestRam

    @classmethod
    def connect(cls, path: str, features: int = GpuFeature.F_EDID.mask, ram_size: int = 32 << 20) -> Gpu:
        fe = Frontend.connect(path)
        fe.negotiate(device_features=features)
        ram = GuestRam(ram_size)
        fe.share_memory(ram)
        fe.setup_queue(0, 256)
        fe.setup_queue(1, 256)
        return cls(fe, ram)

    def cmd(self, request: bytes, response_size: int, queue: int = 0) -> bytes:
        return self.fe.submit(queue, request, response_size)

    def close(self) -> None:
        self.fe.close()
        self.ram.close()
