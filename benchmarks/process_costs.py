"""What a back-end process costs before it does anything: start-up time and idle memory, ours vs QEMU's C back end.

* start-up: from the fork (Popen) to the socket being in the LISTEN state (/proc/net/unix, polled every
  millisecond) — what a VMM waits for before it can connect;
* idle RSS after start-up: VmRSS (and its anonymous part) 0.2 s after the socket listens;
* idle RSS after one session: a front end connects, negotiates, shares 64 MiB of guest RAM, sets up both queues and
  the display socket, runs GET_DISPLAY_INFO, 64 CREATE_2D/UNREF, twenty 2D mixes and five 1920x1080 frames, frees
  everything, and is idle for 0.2 s (connection still open: QEMU's back end exits when its front end leaves).  The
  guest-RAM pages a back end touched count in its RSS (shared memfd pages); both touch the same ones.

Our back end starts as an installed one does, from bytecode: pip compiles a wheel's modules when it installs them, so
the runs get a private bytecode cache (``PYTHONPYCACHEPREFIX`` in a temporary directory, written by one untimed
warm-up start) even where the environment says ``PYTHONDONTWRITEBYTECODE`` — otherwise every start would compile
some fifty modules from source, a cost no deployed back end pays.

Runs alternate ours / C (several of each, medians).  Writes benchmarks/results/process_costs.json.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import sides as sd
from benchmarks.commands import display, mix_requests
from benchmarks.common import REPO
from benchmarks.transfers import SinkDisplay, scattered
from vgpu.protocol import (
    CtrlType,
    Format,
    GetDisplayInfo,
    GpuFeature,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    TransferToHost2D,
    encode_command,
)
from vgpu.session import Session, hdr

E = CtrlType
X = Format.FORMAT_B8G8R8X8_UNORM
ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: the socket listens


def listening(path: str) -> bool:
    with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & ACCEPTCON:
                return True
    return False


def memory(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


def session(sock: str) -> Session:
    """One session of ordinary 2D work; everything freed at the end, the connection left open."""
    g = Session.open(sock, features=GpuFeature.F_EDID.mask, ram_size=64 << 20,
                    display=SinkDisplay(display().display_info, lambda scanout: b""))
    ok = E.RESP_OK_NODATA

    def run(reqs: list[bytes], want: int = ok, size: int = 24) -> None:
        for r in g.fe.submit_batch(0, reqs, size):
            if int.from_bytes(r[:4], "little") != want:
                raise RuntimeError(f"session: answered {int.from_bytes(r[:4], 'little'):#x}")

    run([encode_command(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)))], E.RESP_OK_DISPLAY_INFO, 408)
    run([encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 100 + i, X, 64, 64)) for i in range(64)])
    run([encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 100 + i)) for i in range(64)])
    mix = mix_requests(g)
    for _ in range(20):
        for r in mix:
            run([r])
    full = Rect(0, 0, 1920, 1080)
    b = scattered(g, 1920 * 1080 * 4)
    run([encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 2, X, 1920, 1080))])
    run([encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 2, b.entries))])
    run([encode_command(SetScanout(hdr(E.CMD_SET_SCANOUT), full, 0, 2))])
    for _ in range(5):
        run([encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), full, 0, 2)),
             encode_command(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), full, 2))])
    run([encode_command(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 0, 0), 0, 0))])
    run([encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 2))])
    return g


def one_run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "b.sock")
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, f"--socket-path={path}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=REPO, env=env)
        try:
            deadline = t0 + 20
            while not (os.path.exists(path) and listening(path)):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start")
                time.sleep(0.001)
            startup = time.perf_counter() - t0
            time.sleep(0.2)
            idle = memory(proc.pid)
            g = session(path)
            try:
                time.sleep(0.2)
                after = memory(proc.pid)
            finally:
                g.close()
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"startup_s": startup, "idle_rss": idle["VmRSS"], "idle_anon": idle.get("RssAnon", 0),
            "session_rss": after["VmRSS"], "session_anon": after.get("RssAnon", 0)}


def main(argv: list[str] | None = None) -> int:
    settings = sd.parse(__doc__ or "", argv, ["process_costs"], rounds=5)
    cmds = {"ours": [sys.executable, "-m", "vgpu", "--log-level=error"]}
    if sd.have_qemu():
        cmds["qemu"] = [sd.QEMU_BACKEND]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
    with tempfile.TemporaryDirectory(prefix="vgpu-bytecode-") as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        envs = {"ours": env, "qemu": None}
        one_run(cmds["ours"], env)  # untimed: writes the bytecode an installed back end would have
        for r in range(settings.rounds):
            for k in (list(cmds) if r % 2 == 0 else list(reversed(cmds))):
                runs[k].append(one_run(cmds[k], envs[k]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    print(f"--- back-end process costs, median of {settings.rounds} runs each")
    print(f"{'back end':<26} {'start-up s':>10} {'idle RSS MB':>12} {'(anon)':>8} {'after session MB':>17} "
          f"{'(anon)':>8}")
    for k, m in med.items():
        print(f"{k:<26} {m['startup_s']:>10.3f} {m['idle_rss'] / 1e6:>12.1f} {m['idle_anon'] / 1e6:>8.1f} "
              f"{m['session_rss'] / 1e6:>17.1f} {m['session_anon'] / 1e6:>8.1f}")
    ratios = {}
    if "qemu" in med:
        ratios = {"startup ours / qemu": med["ours"]["startup_s"] / med["qemu"]["startup_s"],
                  "idle RSS ours / qemu": med["ours"]["idle_rss"] / med["qemu"]["idle_rss"],
                  "session RSS ours / qemu": med["ours"]["session_rss"] / med["qemu"]["session_rss"]}
        sd.print_ratios(ratios)
    sd.save(settings, "process_costs", {"title": "start-up time and idle RSS", "runs": runs, "median": med,
                                        "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
