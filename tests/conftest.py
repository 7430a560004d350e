"""Shared fixtures and helpers: real back-end processes on real Unix sockets (the conformance runner's
:class:`~vgpu.conformance.process.BackendProcess`), guest sessions on them (:mod:`vgpu.session`), and the rule for
missing lab components (fail in CI, skip elsewhere).

A module says how its back end is started with a marker instead of a fixture of its own::

    pytestmark = pytest.mark.vgpu("--scanouts=2", display=True)

``vgpu`` is then ``python -m vgpu`` with those options (``{tmp}`` in one stands for the test's temporary
directory), ``gpu`` a session on it (with a display when ``display=True``), and ``client`` a cross-domain guest
on it that has started its context.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from vgpu.__main__ import one_blas_thread
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import open_fds
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, make_display
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend
from vgpu_lab import paths

REPO = Path(__file__).resolve().parent.parent
paths.use_checkout(REPO)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
QEMU_GPU_BACKEND = "/usr/lib/qemu/vhost-user-gpu"
VGPU = [sys.executable, "-m", "vgpu"]
#: The host-visible window the cross-domain back ends offer (small: tests map a few blobs).
WINDOW = 64 << 20

# Bytecode: this machine kind sets PYTHONDONTWRITEBYTECODE, so each of the hundreds of back-end processes the tests
# start would compile the package from source again (0.38 s to import vgpu.cli instead of 0.20 s); an installed back
# end has its bytecode from pip. It is cached outside the tree, for this process and every child.
if not os.environ.get("PYTHONPYCACHEPREFIX"):
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / f"vgpu-pycache-{os.getuid()}")
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
sys.dont_write_bytecode = False
# The back end's thread settings, for every process the tests start (xdist's workers, benchmark and fuzz runs too).
one_blas_thread()

# Hypothesis keeps its storage (the failing examples it replays first, a constants cache) in .hypothesis/ under the
# current directory unless told otherwise; tests write only to temporary directories, so it lives there.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"vgpu-hypothesis-{os.getuid()}")


def require(path_or_cmd: str, what: str) -> str:
    """The component's path; in CI a missing component fails the test, elsewhere it skips with the reason."""
    found = path_or_cmd if os.path.exists(path_or_cmd) else shutil.which(path_or_cmd)
    if found:
        return found
    unavailable(f"{what} ({path_or_cmd}) is not installed; the README's test command provisions it")


def unavailable(message: str) -> NoReturn:
    """A component a test needs is missing: in CI that is a failure; elsewhere the test skips, saying which."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(reason=f"not in CI, and missing: {message}")


def start_backend(cmd: list[str], workdir: Path, name: str = "backend") -> BackendProcess:
    """``cmd --socket-path=<workdir>/<name>.sock``, started and listening with its fds settled."""
    # Generous: under load on two cores a back end can take seconds; a passing run waits only as long as start-up.
    return BackendProcess([*cmd, "--socket-path={sock}"], workdir, name, start_timeout=90, cwd=REPO).start()


def host_blob_options(**extra: str) -> list[str]:
    """Options of our back end offering cross-domain host blobs from memfds in a small window, with tight limits."""
    args = {"--context-types": "cross-domain", "--allocator": "memfd", "--host-visible-size": str(WINDOW),
            "--max-host-memory": "32M", "--map-timeout": "1", "--log-level": "info", **extra}
    return [f"{k}={v}" for k, v in args.items()]


def raw(b: BackendProcess) -> socket.socket:
    """A bare connection to a back end, for bytes no front end would send."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b.socket_path)
    s.settimeout(5)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the back end closes the connection (what it sends first is read and dropped) within its timeout."""
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_serving(b: BackendProcess) -> None:
    """A new front end is served by the echo back end: set-up, then a chain echoed."""
    fe = Frontend.connect(b.socket_path)
    ram = GuestRam(1 << 20)
    try:
        fe.negotiate()
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
        assert fe.submit(0, b"alive", 8) == b"alive"
    finally:
        fe.close()
        ram.close()


def assert_no_leak(b: BackendProcess, baseline: int) -> None:
    """The back end is alive and back to its idle fds."""
    assert b.alive(), b.log()
    assert b.settle_fds(baseline) == baseline, open_fds(b.pid)


def backend_buffer_with(pid: int, needle: bytes) -> bytes | None:
    """The contents of the back end's memfd that holds `needle` (reading its fds through /proc, as root)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "memfd:" not in os.readlink(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if needle in data:
            return data
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vgpu(*options, display=False): how the module's `vgpu` back end starts")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Two workers per core: a test mostly waits on the back end it started (a socket, a timeout), so two cores
    keep four modules going."""
    return 2 * (os.cpu_count() or 1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups; after tests/e2e's own (registered later)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test without a worker group runs on the worker of its module, so module fixtures start once."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture
def vgpu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendProcess]:
    """``python -m vgpu`` with the options of the closest ``vgpu`` marker."""
    marker = request.node.get_closest_marker("vgpu")
    options = [str(o).replace("{tmp}", str(tmp_path)) for o in (marker.args if marker else ())]
    b = start_backend([*VGPU, *options], tmp_path, "vgpu")
    yield b
    b.stop()


@pytest.fixture
def gpu(request: pytest.FixtureRequest, vgpu: BackendProcess) -> Iterator[Session]:
    """A guest session on `vgpu`, with a display when the marker says ``display=True``."""
    marker = request.node.get_closest_marker("vgpu")
    display = make_display() if marker is not None and marker.kwargs.get("display") else None
    g = Session.open(vgpu.socket_path, display=display)
    yield g
    g.close()


@pytest.fixture
def client(vgpu: BackendProcess) -> Iterator[CrossDomainGuest]:
    """A cross-domain guest on `vgpu` (started with :func:`host_blob_options`): context, query ring and INIT done."""
    g = Session.open(vgpu.socket_path, features=CROSS_DOMAIN_FEATURES, shm=True)
    c = CrossDomainGuest(g)
    c.start()
    yield c
    g.close()


@pytest.fixture
def echo_backend(tmp_path: Path) -> Iterator[BackendProcess]:
    b = start_backend([sys.executable, "-m", "vgpu.vhost_user.examples.echo", "--log-level=info",
                       "--shm-size=16777216", "--map-timeout=1"], tmp_path, "echo")
    yield b
    b.stop()


@pytest.fixture
def qemu_gpu_backend(tmp_path: Path) -> Iterator[BackendProcess]:
    exe = require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (Debian qemu-system-gui)")
    b = start_backend([exe], tmp_path, "qemu-vhost-user-gpu")
    yield b
    b.stop()
