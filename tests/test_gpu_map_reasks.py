"""MAP_BLOB asks the kernel at every mapping: an answer is never cached across mappings (issue 15).

The kernel is played (``tests/fake_kernel_vgpu.py``: this host has no kernel with the ioctl) by a fake whose answer
changes at every question, as a buffer that moves would; everything else is real — our back end as a process, our
front end, real memfds and sockets. The same property on a real moving exporter is checked inside the patched
guest by tests/e2e/test_changing_placement.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import host_blob_options, start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.protocol import CtrlType, ResourceUnmapBlob
from vgpu.protocol import structs as s
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session
from vgpu.session import rtype as resp_type

E = CtrlType


def _start(tmp_path: Path, answers: str, *extra: str) -> BackendProcess:
    options = host_blob_options()
    return start_backend([sys.executable, "-m", "tests.fake_kernel_vgpu", f"--answers={answers}", "--", *options,
                          *extra], tmp_path, "vgpu")


@pytest.fixture
def alternating(tmp_path: Path) -> Iterator[BackendProcess]:
    b = _start(tmp_path, "WC+fixed,CACHED+fixed")
    yield b
    b.stop()


def _client(b: BackendProcess) -> CrossDomainGuest:
    c = CrossDomainGuest(Session.open(b.socket_path, features=CROSS_DOMAIN_FEATURES, shm=True))
    c.start()
    return c


def _map(client: CrossDomainGuest) -> tuple[int, int]:
    raw = client.map(1, 0)
    resp = s.resp_map_info.parse(raw) if resp_type(raw) == E.RESP_OK_MAP_INFO else None
    return resp_type(raw), int(resp.map_info) if resp is not None else 0


def test_map_blob_asks_the_fake_kernel_again_at_every_mapping(alternating: BackendProcess) -> None:
    client = _client(alternating)
    try:
        reqs: Any = client.requirements(64, 64)  # question 1: WC
        assert reqs.map_info == 3
        assert resp_type(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
        seen = []
        for _ in range(3):  # questions 2, 3, 4: CACHED, WC, CACHED
            seen.append(_map(client))
            unmap = client.sess.cmd(ResourceUnmapBlob(client.h(E.CMD_RESOURCE_UNMAP_BLOB), 1))
            assert resp_type(unmap) == E.RESP_OK_NODATA
    finally:
        client.sess.close()
    assert seen == [(E.RESP_OK_MAP_INFO, 1), (E.RESP_OK_MAP_INFO, 3), (E.RESP_OK_MAP_INFO, 1)]
    log = alternating.log()
    assert re.findall(r"fake kernel answer (\d+): (\S+)", log) == [
        ("1", "WC+fixed"), ("2", "CACHED+fixed"), ("3", "WC+fixed"), ("4", "CACHED+fixed")]
    maps = re.findall(r"map blob 1 at 0x0 \+0x4000: map_info (\w+) \(kernel: DMA_BUF_IOCTL_INFO: (\S+) ", log)
    assert maps == [("CACHED", "CACHED+fixed"), ("WC", "WC+fixed"), ("CACHED", "CACHED+fixed")]


def test_a_fake_kernels_changing_answer_is_refused_then_mapped_wc_when_opted_in(tmp_path: Path) -> None:
    """Default: refused, the log saying why; with --map-changing-placement: WC whatever the current answer."""
    for extra, expected in (((), [(E.RESP_ERR_UNSPEC, 0)] * 2),
                            (("--map-changing-placement",), [(E.RESP_OK_MAP_INFO, 3)] * 2)):
        backend = _start(tmp_path, "CACHED,WC", *extra)
        try:
            client = _client(backend)
            try:
                reqs = client.requirements(64, 64)
                assert resp_type(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
                seen = []
                for _ in range(2):
                    seen.append(_map(client))
                    if seen[-1][0] == E.RESP_OK_MAP_INFO:
                        client.sess.cmd(ResourceUnmapBlob(client.h(E.CMD_RESOURCE_UNMAP_BLOB), 1))
            finally:
                client.sess.close()
        finally:
            backend.stop()
        log = backend.log()
        assert seen == expected, log
        if not extra:
            assert log.count("may change while the buffer is mapped") >= 2, log
            assert "MAP_BLOB 1 refused" in log and "--map-changing-placement maps such buffers WC" in log, log
        else:
            assert log.count("map_info WC (operator rule: --map-changing-placement: mapped WC") == 2, log
        (tmp_path / "vgpu.sock").unlink(missing_ok=True)


def test_a_fake_kernels_incoherent_answer_is_refused_even_opted_in(tmp_path: Path) -> None:
    backend = _start(tmp_path, "CACHED+fixed+sync", "--map-changing-placement")
    try:
        client = _client(backend)
        try:
            reqs: Any = client.requirements(64, 64)
            assert reqs.map_info == 0  # nothing trustworthy to tell
            assert resp_type(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
            assert _map(client) == (E.RESP_ERR_UNSPEC, 0)
        finally:
            client.sess.close()
    finally:
        backend.stop()
    log = backend.log()
    assert "MAP_BLOB 1 refused" in log and "needs cache maintenance (DMA_BUF_IOCTL_SYNC)" in log, log
