"""The two input formats, read and written: what one fuzz input means to each entry point.

Both are byte strings a coverage-guided mutator can work on directly, so they are kept flat: a few bytes of
framing around the bytes the product reads (a command's bytes, a message's payload), and every read past the end
yields zeros, so any byte string is a valid input. The writers exist for the seed corpus and the tests: a seed is
written with exactly the framing the reader takes apart.

Commands (``commands`` entry point)::

    features:u8 (which GPU features the driver acks; bit 4: a display socket)  then records until the end:
    op:u8  length:u16le  command bytes
      op bit 0     queue (0 controlq, 1 cursorq)
      op bit 1     kick after this chain (the device serves every chain made available so far)
      op bits 2-3  the command is split over 1..4 readable descriptors
      op bit 4     the chain is an indirect table
      op bits 5-7  the response buffer's size, an index into RESPONSE_SIZES

vhost-user (``vhost_user`` entry point)::

    records until the end:
    request:u8  (RAW: then length:u16le and bytes sent as they are, no framing)
    flags:u8  payload length:u16le  payload  fd count:u8 (0..3, of the low 2 bits)  per fd: kind:u8 size:u8
      and, for a memfd, content length:u16le and the bytes at its start
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

#: Response buffer sizes an op can ask for: the sizes of the device's answers (header, MAP_INFO, UUID, display
#: info, EDID), none at all, one shorter than a header, and a large one.
RESPONSE_SIZES: Final = (24, 0, 8, 32, 40, 408, 1056, 4096)
MAX_SPLIT: Final = 4
#: The request byte of a vhost-user record that is sent without framing.
RAW: Final = 0xFF
MAX_FDS_PER_MESSAGE: Final = 3
PAGE: Final = 4096

# Feature selector bits of a commands input (which GPU features the driver acks for that input).
SEL_EDID: Final = 1 << 0
SEL_UUID: Final = 1 << 1
SEL_BLOB: Final = 1 << 2
SEL_VIRGL: Final = 1 << 3  # VIRGL and CONTEXT_INIT together, as a driver that uses a context type acks them
SEL_DISPLAY: Final = 1 << 4  # the VMM hands over a display socket (GPU_SET_SOCKET) before the commands


class FdKind(IntEnum):
    """What an fd attached to a vhost-user message is: the kinds a front end really sends."""

    MEMFD = 0    # guest memory (size: the size byte in pages)
    EVENTFD = 1  # kick, call, err
    SOCKET = 2   # back-end channel, display socket (the harness holds the other end)
    PIPE = 3     # something that is none of those


class Reader:
    """Reads a fuzz input front to back; past the end every read is zeros (or empty)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() | self.u8() << 8

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


# --- commands ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chain:
    queue: int
    kick: bool
    split: int
    indirect: bool
    response_size: int
    command: bytes

    def op(self) -> int:
        size = RESPONSE_SIZES.index(self.response_size)
        return self.queue | self.kick << 1 | (self.split - 1) << 2 | self.indirect << 4 | size << 5


@dataclass
class CommandsInput:
    features: int
    chains: list[Chain] = field(default_factory=list)


def parse_commands(data: bytes) -> CommandsInput:
    r = Reader(data)
    out = CommandsInput(r.u8())
    while r.left > 0:
        op = r.u8()
        command = r.take(r.u16())
        out.chains.append(Chain(queue=op & 1, kick=bool(op & 2), split=1 + (op >> 2 & 3), indirect=bool(op & 16),
                                response_size=RESPONSE_SIZES[op >> 5], command=command))
    return out


def write_commands(inp: CommandsInput) -> bytes:
    out = bytearray([inp.features])
    for c in inp.chains:
        out += struct.pack("<BH", c.op(), len(c.command)) + c.command
    return bytes(out)


# --- vhost-user ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FdSpec:
    kind: FdKind
    pages: int = 0         # a memfd's size in pages
    content: bytes = b""   # a memfd's first bytes


@dataclass(frozen=True)
class Framed:
    request: int
    flags: int
    payload: bytes
    fds: tuple[FdSpec, ...] = ()


@dataclass(frozen=True)
class Raw:
    data: bytes


Record = Framed | Raw


def parse_vhost_user(data: bytes) -> list[Record]:
    r = Reader(data)
    out: list[Record] = []
    while r.left > 0:
        request = r.u8()
        if request == RAW:
            out.append(Raw(r.take(r.u16())))
            continue
        flags = r.u8()
        payload = r.take(r.u16())
        fds = []
        for _ in range(r.u8() & 3):
            kind = FdKind(r.u8() & 3)
            pages = r.u8()
            content = r.take(r.u16()) if kind == FdKind.MEMFD else b""
            fds.append(FdSpec(kind, pages, content))
        out.append(Framed(request, flags, payload, tuple(fds)))
    return out


def write_vhost_user(records: list[Record]) -> bytes:
    out = bytearray()
    for rec in records:
        if isinstance(rec, Raw):
            out += struct.pack("<BH", RAW, len(rec.data)) + rec.data
            continue
        out += struct.pack("<BBH", rec.request, rec.flags, len(rec.payload)) + rec.payload
        out.append(len(rec.fds))
        for f in rec.fds:
            out += bytes([f.kind, f.pages])
            if f.kind == FdKind.MEMFD:
                out += struct.pack("<H", len(f.content)) + f.content
    return bytes(out)
