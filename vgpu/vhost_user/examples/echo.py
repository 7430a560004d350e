"""A trivial vhost-user device: proof that the transport/device interface carries a real device end to end.

Each chain's request bytes are written back into its writable buffers.  A few textual commands exercise the parts
of the interface an echo cannot: `map OFFSET LENGTH` / `unmap OFFSET LENGTH` (SHMEM_MAP/UNMAP of a memfd holding a
known pattern on the back-end channel) and `config-change` (CONFIG_CHANGE_MSG).  With `noop`, chains complete with
nothing written: the ring round-trip floor for benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from ..device import BackendChannelError, Device
from ..server import StopSignal, serve, serve_connection
from ..virtqueue import Virtqueue, VirtqueueError
from ..wire import MMAP_FLAG_READ_WRITE, BackendRequest, ProtocolFeature, bit, build_mmap_request

log = logging.getLogger("vgpu.vhost_user.echo")

SHMID = 1


_PATTERN_UNIT = bytes((i * 7 + 3) & 0xFF for i in range(256))


def pattern(length: int) -> bytes:
    """The bytes a mapped echo buffer starts with: a repeating, position-dependent pattern a test can predict."""
    return _PATTERN_UNIT * (length // 256) + bytes(length % 256)


class EchoDevice(Device):
    num_queues = 2

    def __init__(self, noop: bool = False, shm_size: int = 0, map_timeout: float = 5.0) -> None:
        self.noop = noop
        self.shm_size = shm_size
        self.map_timeout = map_timeout
        self.scratch = bytearray(8)
        self.buffers: dict[int, int] = {}  # shm offset -> memfd

    def device_features(self) -> int:
        return 0

    def protocol_features(self) -> int:
        return bit(ProtocolFeature.CONFIG) | (bit(ProtocolFeature.SHMEM) if self.shm_size else 0)

    def config(self) -> bytes:
        return bytes(self.scratch)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 4 or offset + len(data) > 8:
            from ..device import DeviceRefused

            raise DeviceRefused("only bytes 4..7 of the echo config are writable")
        self.scratch[offset:offset + len(data)] = data

    def shmem_regions(self) -> dict[int, int]:
        return {SHMID: self.shm_size} if self.shm_size else {}

    def process_queue(self, queue: Virtqueue) -> None:
        t = self.transport
        for item in queue.chains(t.memory):
            if isinstance(item, VirtqueueError):
                log.warning("bad chain: %s", item)
                continue
            if self.noop:
                t.complete(queue, item, 0)
                continue
            data = bytes(item.read_all())
            reply = self._command(data) if data[:4] in (b"map ", b"unma", b"conf") else data
            t.complete(queue, item, item.write(reply))
        t.flush(queue)

    def _command(self, data: bytes) -> bytes:
        words = data.split()
        try:
            if words[0] == b"config-change":
                self.scratch[0] = (self.scratch[0] + 1) & 0xFF
                self.transport.backend_request(BackendRequest.CONFIG_CHANGE_MSG, b"")
                return b"ok"
            offset, length = int(words[1]), int(words[2])
            req = build_mmap_request(SHMID, 0, offset, length, MMAP_FLAG_READ_WRITE)
            if words[0] == b"map":
                fd = os.memfd_create("echo-buffer", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, length)
                    os.pwrite(fd, pattern(length), 0)
                    self.transport.backend_request(BackendRequest.SHMEM_MAP, req, [fd], self.map_timeout)
                except BaseException:
                    os.close(fd)
                    raise
                self.buffers[offset] = fd
                return b"ok"
            if words[0] == b"unmap":
                self.transport.backend_request(BackendRequest.SHMEM_UNMAP, req, None, self.map_timeout)
                os.close(self.buffers.pop(offset))
                return b"ok"
        except (IndexError, ValueError, KeyError) as e:
            return b"err bad command: " + str(e).encode()
        except BackendChannelError as e:
            return b"err " + str(e).encode()
        return b"err unknown command"

    def reset(self) -> None:
        for fd in self.buffers.values():
            os.close(fd)
        self.buffers.clear()
        self.scratch = bytearray(8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgpu.vhost_user.examples.echo")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--socket-path")
    g.add_argument("--fd", type=int)
    p.add_argument("--noop", action="store_true")
    p.add_argument("--shm-size", type=int, default=0)
    p.add_argument("--map-timeout", type=float, default=5.0)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = StopSignal()
    try:
        def factory() -> Device:
            return EchoDevice(args.noop, args.shm_size, args.map_timeout)

        if args.fd is not None:
            serve_connection(factory(), socket.socket(fileno=args.fd), stop.r)
            return 0
        if os.path.exists(args.socket_path):
            os.unlink(args.socket_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
            listener.bind(args.socket_path)
            listener.listen(1)
            serve(factory, listener, stop.r)
        os.unlink(args.socket_path)
        return 0
    finally:
        stop.close()


if __name__ == "__main__":
    sys.exit(main())
