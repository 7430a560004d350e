"""End to end: clients nobody here wrote, in a real guest, on our back end and on QEMU's C one.

libdrm's ``modetest`` sets modes with its own test patterns, flips pages and moves the cursor; QEMU's console
(``screendump`` over QMP: what each back end sent over the display socket) must show the same pixels for both back
ends, and our own scanout pictures must hold those pixels too.  weston, with its DRM back end and pixman renderer,
runs a client on our device; its own screenshot must be what the console shows.  A short IGT selection (sid's
igt-gpu-tools-tests) must give the same verdict on both.  The whole selection, side by side, is
``python -m vgpu_lab.clients_report`` (spec/guest-clients.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import component, shown
from vgpu.gpu import png
from vgpu_lab import provision
from vgpu_lab.guest_clients import (
    MODETEST_PICTURES,
    igt_results,
    igt_script,
    modetest_report,
    modetest_script,
    provision_clients,
    provision_sid_clients,
    run_clients,
    weston_script,
)
from vgpu_lab.qemu import Backend, socket_dir

#: Programs whose every subtest runs in seconds under TCG: buffer objects, framebuffers, blobs.
IGT_SHORT = ("core_getversion", "kms_getfb", "kms_prop_blob", "kms_addfb_basic")
SIZES = {"smpte-1024x768": (768, 1024), "tiles-800x600": (600, 800), "plain-640x480": (480, 640)}


@pytest.fixture(scope="module")
def clients(request: pytest.FixtureRequest, provisioner: provision.Provisioner, lab: provision.Lab) -> Path:
    """modetest on the host (the guest runs it from the shared root), IGT in the sid chroot; the chroot's root."""
    with shown(request):
        component("modetest", lambda: provision_clients(provisioner))
        root: Path = component("IGT", lambda: provision_sid_clients(provisioner))
    return root


def _ours(pictures: Path | None = None) -> list[str]:
    extra = [f"--scanout-png={pictures}", "--png-history", "--png-rate=30"] if pictures else []
    return [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--log-level=info", *extra]


def test_modetest_shows_the_same_pixels_on_our_backend_as_on_qemus(
        lab: provision.Lab, clients: Path, tmp_path: Path) -> None:
    pics = tmp_path / "pictures"
    reports = {}
    for which, cmd in (("ours", _ours(pics)), ("qemu", [str(lab.qemu.vhost_user_gpu), "--socket-path={sock}"])):
        with socket_dir() as d, Backend(cmd, d / "gpu.sock") as proc:
            run = run_clients(lab, d / "gpu.sock", modetest_script(), tmp_path / which)
        context = f"{which}:\n{run.describe()}\n--- back end\n{proc.output}"
        assert run.guest.returncode == 0 and not run.guest.timed_out and not run.dump_errors, context
        reports[which] = (modetest_report(run), context)
    (ours, ours_ctx), (qemu, qemu_ctx) = reports["ours"], reports["qemu"]
    for report, context in ((ours, ours_ctx), (qemu, qemu_ctx)):
        assert report.listed and report.connectors == ["Virtual-1"], context
        assert {"1024x768", "800x600", "640x480"} <= set(report.modes), context
        assert report.exits == {name: 0 for name in [*SIZES, "flip", "cursor"]}, context
        assert report.flip_hz, f"modetest -v printed no flip rate\n{context}"
    history = [png.decode(p.read_bytes()) for p in sorted(pics.glob("scanout-0-*.png"))]
    for name, _ in MODETEST_PICTURES:
        mine, theirs = ours.pictures[name], qemu.pictures[name]
        assert mine.shape[:2] == SIZES[name], f"{name}: console {mine.shape}\n{ours_ctx}"
        assert np.array_equal(mine, theirs), f"{name}: {(mine != theirs).any(axis=2).sum()} pixels differ"
        # Our own picture of the scanout holds what QEMU showed (the console is RGB, so is the PNG).
        assert any(h.shape == mine.shape and np.array_equal(h, mine) for h in history), name


def test_igt_gives_the_same_verdicts_on_our_backend_as_on_qemus(
        lab: provision.Lab, clients: Path, tmp_path: Path) -> None:
    verdicts = {}
    for which, cmd in (("ours", _ours()), ("qemu", [str(lab.qemu.vhost_user_gpu), "--socket-path={sock}"])):
        with socket_dir() as d, Backend(cmd, d / "gpu.sock") as proc:
            run = run_clients(lab, d / "gpu.sock", igt_script(clients, IGT_SHORT), tmp_path / which, timeout=600)
        context = f"{which}:\n{run.describe()}\n--- back end\n{proc.output}"
        assert run.guest.returncode == 0 and not run.guest.timed_out, context
        verdicts[which] = igt_results(run)
        assert set(verdicts[which]) == set(IGT_SHORT), context
    ours, qemu = verdicts["ours"], verdicts["qemu"]
    differ = {f"{t}/{s}": (v, qemu[t].get(s)) for t in ours for s, v in ours[t].items() if qemu[t].get(s) != v}
    assert not differ, f"verdicts differ (ours, QEMU C): {differ}"
    assert sum(v == "SUCCESS" for t in ours.values() for v in t.values()) >= 20


def test_weston_drm_pixman_in_the_guest_shows_what_it_composited(
        lab: provision.Lab, clients: Path, tmp_path: Path) -> None:
    """weston (sid's, DRM back end, pixman renderer) with weston-flower on our device: weston's own screenshot of
    its output, QEMU's console and our scanout picture are the same pixels."""
    pics, outbox = tmp_path / "pictures", tmp_path / "outbox"
    with socket_dir() as d, Backend(_ours(pics), d / "gpu.sock") as proc:
        run = run_clients(lab, d / "gpu.sock", weston_script(clients), tmp_path / "guest", outbox=outbox)
    context = f"{run.describe()}\n--- back end\n{proc.output}"
    assert run.guest.returncode == 0 and not run.guest.timed_out and not run.dump_errors, context
    assert run.lines("VGPU-GUEST weston-shot rc=0"), context
    shot = np.asarray(Image.open(outbox / "weston-screenshot.png").convert("RGB"))
    console = run.dumps["weston"]
    assert shot.shape == console.shape and np.array_equal(shot, console), \
        f"weston's screenshot and the console differ in {(shot != console).any(axis=-1).sum()} pixels"
    # Not a black screen: the client's drawing is there (weston-flower fills a shape on black).
    assert (console.reshape(-1, 3) != 0).any(axis=1).sum() > 1000
    history = [png.decode(p.read_bytes()) for p in sorted(pics.glob("scanout-0-*.png"))]
    assert any(h.shape == console.shape and np.array_equal(h, console) for h in history)
