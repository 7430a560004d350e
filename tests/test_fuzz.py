"""The coverage-guided fuzzer in short: each entry point fuzzed for a few thousand units under atheris, the committed
corpus and reproducers replayed through the same entry points, and the harness's own checks shown to catch what
they claim (a leaked fd, an exception the product swallowed, a response that drops the fence).

The long runs are `python -m vgpu_fuzz run TARGET --units N` (results in benchmarks/results/fuzz.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from vgpu.gpu.device import GpuDevice
from vgpu.protocol import CtrlType
from vgpu_fuzz import seeds
from vgpu_fuzz.checks import Failure, Leak
from vgpu_fuzz.harness import Harness
from vgpu_fuzz.inputs import parse_commands, parse_vhost_user, write_commands, write_vhost_user

FUZZ = REPO / "tools" / "vgpu_fuzz"
TARGETS = ("commands", "vhost_user")


def fuzz(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vgpu_fuzz", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


def last_json(out: str) -> Any:
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("target", TARGETS)
def test_a_short_fuzzing_run_finds_nothing(target: str, tmp_path: Path) -> None:
    p = fuzz("run", target, "--units", "3000", "--max-time", "120", "--no-report", "--no-coverage",
             "--work", str(tmp_path), "--probe-every", "1000")
    result = last_json(p.stdout)
    log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert result["completed"], log
    assert result["units_executed"] >= 3000
    assert (result["crashes"], result["hangs"], result["leaks"]) == (0, 0, 0), (result["failures"], log)
    assert result["fds"]["after_warmup"] == result["fds"]["end"]
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("target", TARGETS)
def test_the_committed_corpus_replays_cleanly(target: str) -> None:
    dirs = [d for d in (FUZZ / "corpus" / target, FUZZ / "reproducers" / target) if d.is_dir()]
    p = fuzz("replay", target, *map(str, dirs), "--json")
    result = last_json(p.stdout)
    assert result["inputs"] >= 10
    assert result["failures"] == [], result["failures"]
    assert result["fds"]["before"] == result["fds"]["after"]
    assert p.returncode == 0


def test_the_seed_corpus_is_what_seeds_writes(tmp_path: Path) -> None:
    """The committed corpus is generated (python -m vgpu_fuzz seeds): a change to a layout shows up here."""
    seeds.write_all(tmp_path)
    for target in TARGETS:
        want = sorted(p.name for p in (tmp_path / target).iterdir())
        assert sorted(p.name for p in (FUZZ / "corpus" / target).iterdir()) == want


def test_input_formats_round_trip() -> None:
    cmds = seeds.host_blob()
    assert parse_commands(write_commands(cmds)) == cmds
    recs = seeds.whole_connection()
    assert parse_vhost_user(write_vhost_user(recs)) == recs
    # Any bytes are an input: reads past the end are zeros.
    assert parse_commands(b"\x07\xff").chains[0].command == b""


# --- the harness's checks can fail ------------------------------------------------------------------------------

@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness("commands", warmup=1)
    yield h
    h.close()


TWO_D = write_commands(seeds.two_d())


def test_harness_flags_a_leaked_fd_with_a_fake_bug(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.one(TWO_D)
    leaked: list[int] = []
    original = GpuDevice._create_2d

    def leaky(self: GpuDevice, cmd: Any) -> None:
        leaked.append(os.open("/dev/null", os.O_RDONLY))
        original(self, cmd)

    monkeypatch.setattr(GpuDevice, "_create_2d", leaky)
    try:
        with pytest.raises(Leak, match="/dev/null"):
            harness.one(TWO_D)
    finally:
        for fd in leaked:
            os.close(fd)


def test_harness_flags_an_exception_the_product_caught_with_a_fake_bug(harness: Harness,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: GpuDevice, cmd: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(GpuDevice, "_flush", broken)
    with pytest.raises(Failure, match="ZeroDivisionError"):
        harness.one(TWO_D)
    monkeypatch.undo()
    harness.one(TWO_D)  # the harness rebuilt its target and goes on


def test_harness_flags_a_response_without_the_fence_with_a_fake_bug(harness: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def unfenced(self: GpuDevice, request: bytes | memoryview, cursor: bool) -> bytes:
        return int(CtrlType.RESP_OK_NODATA).to_bytes(4, "little") + bytes(20)

    monkeypatch.setattr(GpuDevice, "_execute", unfenced)
    with pytest.raises(Failure, match="echoes"):
        harness.one(TWO_D)  # its RESOURCE_FLUSH is fenced
