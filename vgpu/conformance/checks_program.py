"""Checks of the back-end program conventions (vhost-user "Backend program conventions"): how the binary behaves
when a management tool runs it, rather than what it says on the socket."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
from typing import Final

from ..procfs import wait_until
from ..vhost_user.frontend import Frontend
from ..vhost_user.wire import FrontendRequest
from .context import CheckContext
from .errors import CheckFailed, NotApplicable, expect
from .process import socket_option, without_socket
from .registry import check

GPU_CAPABILITIES: Final = frozenset({"render-node", "virgl"})
PROMPT: Final = 5.0


def _run(argv: list[str], timeout: float = 20.0, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload, no-any-return]


@check("PROG-CAPABILITIES", "print-capabilities")
def print_capabilities(ctx: CheckContext) -> str | None:
    """--print-capabilities prints {"type": "gpu", "features": [...]} (features from render-node, virgl) and
    exits 0 without serving."""
    out = _run([*without_socket(ctx.backend.argv_template), "--print-capabilities"])
    expect(out.returncode == 0, f"exit status {out.returncode}", out.stderr[-64:])
    try:
        caps = json.loads(out.stdout)
    except ValueError:
        caps = None
    expect(isinstance(caps, dict) and caps.get("type") == "gpu", "not a gpu capabilities object", out.stdout[:64])
    assert isinstance(caps, dict)
    feats = caps.get("features")
    expect(isinstance(feats, list) and set(feats) <= GPU_CAPABILITIES, f"features {feats!r}", out.stdout[:64])
    return f"features {feats}"


@check("PROG-SOCKET-FD-EXCLUSIVE", "socket-and-fd-refused")
def socket_and_fd_refused(ctx: CheckContext) -> str | None:
    """--socket-path together with --fd is refused at startup with a non-zero status."""
    a, b = socket.socketpair()
    path = str(ctx.backend.socket_dir / "both.sock")
    try:
        argv = [*without_socket(ctx.backend.argv_template), *socket_option(ctx.backend.argv_template, path),
                f"--fd={b.fileno()}"]
        try:
            out = _run(argv, timeout=PROMPT, pass_fds=(b.fileno(),))
        except subprocess.TimeoutExpired:
            raise CheckFailed("with both --socket-path and --fd the program kept running") from None
        expect(out.returncode != 0, "with both --socket-path and --fd the program exited 0")
    finally:
        a.close()
        b.close()
        if os.path.exists(path):
            os.unlink(path)
    return None


@check("PROG-SIGTERM", "sigterm")
def sigterm(ctx: CheckContext) -> str | None:
    """SIGTERM with a front end connected makes the program exit promptly and cleanly."""
    ctx.fresh_backend()
    ctx.session()
    ctx.stops_backend = True
    proc = ctx.backend.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    exited = wait_until(lambda: proc.poll() is not None, PROMPT)
    expect(exited, f"still running {PROMPT:.0f} s after SIGTERM")
    expect(proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"exit status {proc.returncode}")
    ctx.close()
    return f"exit status {proc.returncode}"


@check("PROG-FD", "inherited-fd")
def inherited_fd(ctx: CheckContext) -> str | None:
    """--fd=N serves an already-connected socket and exits when the front end closes it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [*without_socket(ctx.backend.argv_template), f"--fd={theirs.fileno()}"]
    log = open(ctx.backend.workdir / "fd-mode.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    theirs.close()
    fe = Frontend(ours, timeout=5.0)
    closed = False
    try:
        features = fe.u64(FrontendRequest.GET_FEATURES)
        expect(features != 0, "GET_FEATURES over the inherited socket answered 0")
        fe.close()
        closed = True
        exited = wait_until(lambda: proc.poll() is not None, PROMPT)
        expect(exited, f"still running {PROMPT:.0f} s after its socket closed")
        expect(proc.returncode == 0, f"exit status {proc.returncode}")
    finally:
        if not closed:
            fe.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    return None


@check("PROG-VIRGL-UNAVAILABLE", "virgl-unavailable")
def virgl_unavailable(ctx: CheckContext) -> str | None:
    """Asked for virgl on a host without a render node, the program fails at startup with a non-zero status."""
    if glob.glob("/dev/dri/renderD*"):
        raise NotApplicable("this host has a render node, so virgl may be available")
    path = str(ctx.backend.socket_dir / "virgl.sock")
    argv = [*without_socket(ctx.backend.argv_template), *socket_option(ctx.backend.argv_template, path), "--virgl"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until(lambda: proc.poll() is not None, PROMPT):
            # Some back ends only find out when a front end connects: give them one.
            if os.path.exists(path):
                try:
                    fe = Frontend.connect(path, timeout=2.0, retry_for=1.0)
                    try:
                        fe.negotiate()
                    except Exception:
                        pass
                    fe.close()
                except OSError:
                    pass
            exited = wait_until(lambda: proc.poll() is not None, 1.0)
            expect(exited, "with --virgl and no render node the program kept running")
            expect(proc.returncode != 0, f"exit status {proc.returncode} only after a front end connected")
            return None
        expect(proc.returncode != 0, "with --virgl and no render node the program exited 0")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if os.path.exists(path):
            os.unlink(path)
    return None


def _socket_inode(path: str) -> str | None:
    with open("/proc/net/unix") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[-1] == path:
                return parts[6]
    return None


@check("PROG-NO-DAEMON", "no-daemon")
def no_daemon(ctx: CheckContext) -> str | None:
    """The process that was started is the one listening on the socket (it did not fork into the background)."""
    ctx.fresh_backend()
    inode = _socket_inode(ctx.backend.socket_path)
    expect(inode is not None, "no listening socket at the path")
    held = [t for t in os.listdir(f"/proc/{ctx.backend.pid}/fd")
            if _readlink(f"/proc/{ctx.backend.pid}/fd/{t}") == f"socket:[{inode}]"]
    expect(bool(held), "the started process does not hold the listening socket")
    return None


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
