"""Progress of the lab's long steps (:mod:`vgpu_lab.progress`, the meters of :mod:`vgpu_lab.shell`, the kernel
build's counting): plain lines, throttled, where no terminal is attached; a bar redrawn in place on a real pty;
real commands metered as they print."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vgpu_lab import kernel_build, progress
from vgpu_lab.progress import Progress
from vgpu_lab.shell import ProvisionError, apt_meter, line_meter, run

PROGRESS_PY = Path(progress.__file__)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_throttled_and_say_how_it_ended() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("make", 200, stream=out, clock=clock, interval=5.0)
    p.update(1, "CC a.o")  # the first update is shown at once
    for i in range(2, 100):  # a flood within the same seconds is not
        clock.now += 0.01
        p.update(i, f"CC {i}.o")
    clock.now = 106.0
    p.update(120, "CC last.o")
    p.finish()
    assert out.getvalue().splitlines() == [
        "make: started (200 to go)",
        "make:   0% 1/200  0 s: CC a.o",
        "make:  60% 120/200  6 s: CC last.o",
        "make: done in 6 s (200)",
    ]


def test_an_estimated_total_is_not_claimed_before_the_end_and_failures_say_so() -> None:
    out, clock = io.StringIO(), Clock()
    with pytest.raises(RuntimeError), Progress("build", 10, stream=out, clock=clock) as p:
        p.update(25, "more steps than estimated")
        clock.now += 61
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert lines[1] == "build:  99% 25/10  0 s: more steps than estimated"
    assert lines[-1] == "build: failed (RuntimeError) in 1:01 (25)"


def test_without_a_total_it_counts() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("debootstrap", stream=out, clock=clock)
    p.advance(detail="I: Retrieving libc6")
    clock.now += 5
    p.advance(detail="I:   Extracting   libc6")
    p.finish()
    assert out.getvalue().splitlines() == ["debootstrap: started", "debootstrap: 1  0 s: I: Retrieving libc6",
                                           "debootstrap: 2  5 s: I: Extracting libc6", "debootstrap: done in 5 s (2)"]


def _read_pty(master: int, timeout: float = 10.0) -> str:
    """What was written to the pty, through its final line end. The line discipline hands bytes to the master side
    from a kernel work item, so under load one read can return the start only (seen: the closing \r\n missing)."""
    got = b""
    while not got.endswith(b"\r\n"):
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            break
        got += os.read(master, 4096)
    return got.decode()


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            clock = Clock()
            p = Progress("unpack", 40, stream=tty, clock=clock)
            assert p.tty
            p.update(10, "first")
            clock.now += 1
            p.update(30, "second and longer")
            clock.now += 1
            p.update(31, "x")  # shorter than the line before: the rest is blanked
            p.finish()
        got = _read_pty(master)
    finally:
        os.close(master)
        os.close(slave)
    # The pty's line discipline turns the final \n into \r\n; nothing but the last drawing ends a line.
    assert got.count("\n") == 1 and got.endswith("\r\n")
    frames = got.rstrip("\r\n").split("\r")[1:]
    assert frames[0] == "unpack [######..................]  25% 10/40  0 s first"
    assert frames[1] == "unpack [##################......]  75% 30/40  1 s second and longer"
    assert frames[2].startswith("unpack [##################......]  78% 31/40  2 s x")
    assert len(frames[2]) == len(frames[1]) and frames[2].endswith(" ")
    assert frames[3].startswith("unpack: done in 2 s (40)")


def test_the_command_counts_lines_of_another_program(tmp_path: Path) -> None:
    lines = "".join(f"Collecting pkg{i}\n  Downloading pkg{i}.whl\n" for i in range(3)) + "Installing collected\n"
    log = tmp_path / "pip.log"
    r = subprocess.run([sys.executable, str(PROGRESS_PY), "venv: pip install", "--match", "^(Collecting|Installing)",
                        "--log", str(log)], input=lines, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == ""
    err = r.stderr.splitlines()
    assert err[0] == "venv: pip install: started"
    assert err[1] == "venv: pip install: 1  0 s: Collecting pkg0"  # later steps come within the 5 s interval
    assert err[-1].startswith("venv: pip install: done in ") and err[-1].endswith(" (4)")
    assert log.read_text() == lines


def test_a_metered_command_shows_its_steps_and_keeps_its_output(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    script = "for i in 1 2 3; do echo \"  CC      obj$i.o\"; done; echo done >&2"
    r = run(["sh", "-c", script], timeout=30, what="build", meter=line_meter(r"^\s+CC"), total=3, output=out)
    assert out.getvalue() == "  CC      obj1.o\n  CC      obj2.o\n  CC      obj3.o\ndone\n"
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "done"
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "build: started (3 to go)" and err[1].startswith("build:  33% 1/3")
    assert err[-1].startswith("build: done in ") and err[-1].endswith("(3)")


def test_a_metered_command_that_fails_or_hangs_is_a_provision_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProvisionError, match=r"(?s)exited with 3:.*last words"):
        run(["sh", "-c", "echo last words; exit 3"], timeout=30, what="step", meter=line_meter())
    assert capsys.readouterr().err.splitlines()[-1].startswith("step: failed (exit 3) in ")
    with pytest.raises(ProvisionError, match="did not finish within 1 s"):
        run(["sleep", "30"], timeout=1, what="hung", meter=line_meter())
    assert capsys.readouterr().err.splitlines()[-1].startswith("hung: timed out in ")


def test_apt_status_lines_make_one_scale() -> None:
    out = io.StringIO()
    p = Progress("apt", 100, stream=out, interval=0)
    for line in ("Get:1 http://mirror bookworm InRelease", "dlstatus:3:40.0:Retrieving file 3 of 7",
                 "pmstatus:qemu-system-x86:50.0:Unpacking qemu-system-x86 (amd64)"):
        apt_meter(line, p)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("apt:  20% 20/100") and lines[1].endswith(": Retrieving file 3 of 7")
    assert lines[2].startswith("apt:  75% 75/100") and lines[2].endswith("Unpacking qemu-system-x86 (amd64)")


def test_kbuild_steps_and_the_last_builds_count(tmp_path: Path) -> None:
    steps = ["  CC      init/main.o", "  AR      lib/lib.a", "  HOSTCC  scripts/kallsyms", "  LD      vmlinux.o"]
    others = ["make[1]: Entering directory '/x'", "Kernel: arch/x86/boot/bzImage is ready  (#1)", ""]
    assert all(kernel_build.KBUILD_STEP.match(s) for s in steps)
    assert not any(kernel_build.KBUILD_STEP.match(s) for s in others)
    assert kernel_build._make_steps_before(tmp_path) == kernel_build.ESTIMATED_MAKE_STEPS
    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "build.json").write_text(json.dumps({"key": "key", "make_steps": 1234}))
    assert kernel_build._make_steps_before(tmp_path) == 1234


def test_the_source_is_unpacked_with_the_bytes_read_as_progress(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "linux").mkdir(parents=True)
    (src / "linux" / "Makefile").write_bytes(os.urandom(3 << 20))  # incompressible: several chunks
    tarball = tmp_path / "linux.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(src / "linux", arcname="linux")
    into = tmp_path / "into"
    into.mkdir()
    kernel_build._unpack(tarball, into, timeout=120)
    assert (into / "linux" / "Makefile").read_bytes() == (src / "linux" / "Makefile").read_bytes()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("patched kernel: unpack linux.tar.xz (MiB): started (3.0 to go)")
    assert err[-1].startswith("patched kernel: unpack linux.tar.xz (MiB): done in ")
    with pytest.raises(kernel_build.KernelBuildError, match="tar exited"):
        (tmp_path / "bad.tar.xz").write_bytes(b"not xz at all" * 1000)
        kernel_build._unpack(tmp_path / "bad.tar.xz", into, timeout=60)
