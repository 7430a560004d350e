"""``vgpu-dmabuf-info`` on this host: memfd buffers (the only kind here), fd paths, rules, errors, no fd leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vgpu import dmabuf_info
from vgpu.blob import allocators


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    before = fd_count()
    status = dmabuf_info.main(list(argv))
    assert fd_count() == before, "the tool leaked an fd"
    out = capsys.readouterr()
    return status, out.out, out.err


def text_rows(out: str) -> dict[str, str]:
    """The tool's text rows: a label column (labels may contain one space) and the value after two spaces."""
    rows = {}
    for line in out.splitlines():
        label, _, value = line.partition("  ")
        rows[label] = value.strip()
    return rows


def test_allocate_memfd_text(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--allocate", "memfd", "--size", "5000")
    assert status == 0
    lines = text_rows(out)
    assert lines["source"] == "--allocate memfd --size 5000"
    assert lines["exporter"] == "(none: not a dma-buf)"
    assert lines["size"] == "8192 bytes"
    assert lines["kernel"].startswith("DMA_BUF_IOCTL_INFO: ENOTTY")
    assert lines["resolved"] == "CACHED (map_info 1)"
    assert lines["provenance"] == "allocator"
    assert lines["drm driver"] == "-"


def test_allocate_memfd_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--allocate", "memfd", "--size", "1M", "--json")
    report = json.loads(out)
    assert status == 0
    assert report["size"] == 1 << 20 and report["exporter"] is None and report["fdinfo_size"] is None
    assert report["kernel"] == {
        "answer": "ENOTTY",
        "kind": "ENOTTY",
        "errno": 25,
        "value": None,
        "detail": report["kernel"]["detail"],
    }
    assert report["resolution"]["attr"] == "CACHED" and report["resolution"]["provenance"] == "allocator"
    assert report["resolution"]["map_info"] == 1 and report["unresolved"] is None


def test_auto_on_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--allocate", "auto", "--json")
    expected = next(n for n in allocators.AUTO_ORDER if allocators.ALLOCATORS[n].available())
    assert status == 0 and json.loads(out)["allocator"] == expected


def test_unavailable_allocator_exits_1_with_reason(capsys: pytest.CaptureFixture[str]) -> None:
    if allocators.UdmabufAllocator.available():
        pytest.skip(reason="udmabuf exists here, so its unavailable case cannot happen")
    status, out, err = run(capsys, "--allocate", "udmabuf")
    assert status == 1 and out == "" and "no /dev/udmabuf" in err


def test_size_over_cap_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "--allocate", "memfd", "--size", "2M", "--max-size", "1M")
    assert status == 1 and "over the cap" in err


def test_fd_path_of_a_memfd_is_unresolved(capsys: pytest.CaptureFixture[str]) -> None:
    fd = os.memfd_create("cli", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        status, out, _ = run(capsys, f"/proc/{os.getpid()}/fd/{fd}", "--json", "--legacy-heuristic")
    finally:
        os.close(fd)
    report = json.loads(out)
    assert status == 3 and report["allocator"] == "external" and report["size"] == 4096
    assert report["resolution"] is None and "only guesses for dma-bufs" in report["unresolved"]


def test_fd_path_text_unresolved(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('[exporters]\ndrm = "wc"\n')
    fd = os.memfd_create("cli", os.MFD_CLOEXEC)
    try:
        status, out, _ = run(capsys, f"/dev/fd/{fd}", "--rules", str(rules))
    finally:
        os.close(fd)
    assert status == 3
    resolved = next(line for line in out.splitlines() if line.startswith("resolved"))
    assert "UNRESOLVED" in resolved and f"no rule in {rules}" in resolved


def test_bad_rules_file_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('[exporters]\ndrm = "fast"\n')
    status, _, err = run(capsys, "--allocate", "memfd", "--rules", str(rules))
    assert status == 1 and "exporters.drm = 'fast' is not one of" in err


def test_missing_fd_path_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "/proc/self/fd/987654")
    assert status == 1 and "vgpu-dmabuf-info:" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--allocate", "ion"], ["--allocate", "memfd", "--size", "lots"], ["/x", "--allocate", "memfd"]):
        with pytest.raises(SystemExit) as exc:
            dmabuf_info.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_list_allocators(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--list-allocators", "--json")
    states = json.loads(out)
    assert status == 0 and list(states) == ["udmabuf", "dma-heap", "vgem", "memfd"]
    assert states["memfd"] == {"available": True, "reason": "memfd_create(2)"}
    status, out, _ = run(capsys, "--list-allocators")
    assert "memfd     available" in out


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("64K", 65536), ("16M", 16 << 20), ("1GiB", 1 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert dmabuf_info.parse_size(text) == value


def test_runs_as_a_module_and_reports_on_another_process() -> None:
    # A real second process: the tool takes the fd of its parent (this test) via pidfd_getfd.
    fd = os.memfd_create("peer", 0)  # inheritable is irrelevant: pidfd_getfd does not need it
    try:
        os.ftruncate(fd, 12288)
        proc = subprocess.run(
            [sys.executable, "-m", "vgpu.dmabuf_info", f"/proc/{os.getpid()}/fd/{fd}", "--json"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
    finally:
        os.close(fd)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["size"] == 12288
