"""Hostile commands against a live back-end process: random bytes and mutated valid commands always get an
answer (never a hang or a crash), and the process holds no more fds afterwards than before."""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.protocol import (
    COMMAND_CLASSES,
    CtrlType,
    Format,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceFlush,
    SetScanout,
    TransferToHost2D,
    encode_command,
)
from vgpu.session import Session, hdr

E = CtrlType


@contextlib.contextmanager
def _backend(tmp: Path) -> Iterator[tuple[BackendProcess, Session]]:
    b = start_backend([sys.executable, "-m", "vgpu", "--log-level=error", "--max-host-memory=32M",
                       "--scanout-png", str(tmp / "png")], tmp, "vgpu")
    g = Session.open(b.socket_path)
    # Something to aim at: a resource with backing, on a scanout.
    g.image_2d(1, 64, 64, Format.FORMAT_B8G8R8X8_UNORM)
    g.show(1, 0, Rect(0, 0, 64, 64))
    yield b, g
    g.close()
    b.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackendProcess, Session]]:
    """One back end for the storm: garbage may do anything a well-formed command can to it."""
    with _backend(tmp_path_factory.mktemp("fuzz")) as pair:
        yield pair


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[BackendProcess, Session]]:
    """A back end of its own, for a test that relies on resource 1 as the fixture made it: the storm on the shared
    one legitimately unrefs it (RESOURCE_UNREF with resource id 1 is well-formed garbage), re-creates it at
    another size, or spends the host-memory quota."""
    with _backend(tmp_path) as pair:
        yield pair


def answered(resp: bytes) -> int:
    assert len(resp) >= 24
    t = int(struct.unpack_from("<I", resp)[0])
    assert 0x1100 <= t <= 0x1106 or 0x1200 <= t <= 0x1205, hex(t)
    return t


types = st.sampled_from(sorted({int(c.TYPE) for c in COMMAND_CLASSES} | {0, 0x1100, 0x0999}))
u32 = st.one_of(st.integers(0, 70), st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 4095, 4096, 16384]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ctrl_type=types, flags=st.integers(0, 3), ring=st.integers(0, 255), body=st.lists(u32, max_size=24),
       tail=st.binary(max_size=64))
def test_structured_garbage_always_gets_an_answer(live: tuple[BackendProcess, Session], ctrl_type: int, flags: int,
                                                  ring: int, body: list[int], tail: bytes) -> None:
    _, g = live
    req = struct.pack("<IIQIB3x", ctrl_type, flags, 1, 0, ring) + b"".join(struct.pack("<I", v) for v in body)
    queue = 1 if ctrl_type in (E.CMD_UPDATE_CURSOR, E.CMD_MOVE_CURSOR) else 0
    answered(g.fe.submit(queue, req + tail, 1056))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), queue=st.integers(0, 1))
def test_random_bytes_always_get_an_answer(live: tuple[BackendProcess, Session], data: bytes, queue: int) -> None:
    _, g = live
    answered(g.fe.submit(queue, data or b"\0", 64))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=u32, y=u32, w=u32, h=u32, offset=st.integers(0, 1 << 64 - 1), rid=st.integers(0, 3),
       addr=st.integers(0, 1 << 40), length=u32)
def test_valid_shapes_with_hostile_values(fresh: tuple[BackendProcess, Session], x: int, y: int, w: int, h: int,
                                          offset: int, rid: int, addr: int, length: int) -> None:
    _, g = fresh
    r = Rect(x, y, w, h)
    for cmd in (TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), r, offset, rid),
                SetScanout(hdr(E.CMD_SET_SCANOUT), r, x % 3, rid),
                ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), r, rid),
                ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 100 + rid, x % 140, w % 5000, h % 5000),
                ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 100 + rid,
                                      MemEntries.of([(addr, length)]))):
        answered(g.fe.submit(0, encode_command(cmd), 64))
    # The resource under test still shows (none of the commands above may unref or resize it).
    g.show(1, 0, Rect(0, 0, 64, 64))


#: A resource id the storm cannot have taken: its ids are 0..70 and a few extremes (`u32`), or random bytes.
UNTOUCHED = 100_000


def test_after_the_storm(live: tuple[BackendProcess, Session]) -> None:
    """Still serving normally, and the fuzzing left no fd behind (the connection's own fds aside)."""
    b, g = live
    assert b.alive(), b.log()
    base = fd_count(b.pid)
    g.image_2d(UNTOUCHED, 16, 16)
    g.show(UNTOUCHED, 0, Rect(0, 0, 16, 16))
    g.flush(UNTOUCHED, Rect(0, 0, 16, 16))
    assert wait_until(lambda: fd_count(b.pid) == base)
