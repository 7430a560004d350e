"""What a check gets: the back end process, what it offers, and sessions that are closed for it afterwards."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from ..procfs import wait_until
from ..protocol import VIRTIO_GPU_MAX_SCANOUTS, Capset, CtrlType, GetCapsetInfo, GpuFeature, ShmId
from ..protocol import structs as s
from ..session import Session, hdr, make_display, rtype
from ..vhost_user.frontend import Frontend
from ..vhost_user.profiles import QEMU, Profile
from ..vhost_user.wire import ProtocolFeature, bit
from .errors import NotApplicable, no_display_socket
from .process import BackendProcess, without_socket

T = TypeVar("T")

#: How long the runner waits for an answer: a stalled back end fails its check rather than the run.
TIMEOUT: Final = 3.0
#: Every device feature bit a 2D device and its 3D/blob extensions define (EDID ... CONTEXT_INIT).
ALL_GPU_FEATURES: Final = 0x3F


def open_session(path: str, profile: Profile = QEMU, **kw: Any) -> Session:
    """The runner's guest, set up as `profile`'s VMM does: every feature offered, QEMU's display (where the profile
    has a display socket), 32 MiB of RAM, contiguous backing (so what a check observes does not depend on a
    shuffle of pages), the short timeout; a check overrides what it is about."""
    opts: dict[str, Any] = dict(features=ALL_GPU_FEATURES, display=make_display(), ram_size=32 << 20,
                                timeout=TIMEOUT, scatter=False, profile=profile)
    opts.update(kw)
    return Session.open(path, **opts)


@dataclass
class Offer:
    """What the back end advertises, probed once per run: every n/a verdict is decided from this."""

    features: int = 0
    protocol_features: int = 0
    config: bytes | None = None
    shm: dict[int, int] = field(default_factory=dict)
    capsets: dict[int, tuple[int, int]] = field(default_factory=dict)
    capabilities: list[str] | None = None
    exits_on_disconnect: bool = False

    @property
    def num_scanouts(self) -> int:
        return s.config.parse(self.config).num_scanouts if self.config else 0

    @property
    def scanouts(self) -> int:
        """Scanouts to test against: the config's count when it is a valid one, else the virtio maximum (QEMU's
        C back end leaves num_scanouts 0 for its front end to fill and keeps 16 scanouts internally)."""
        n = self.num_scanouts
        return n if 1 <= n <= VIRTIO_GPU_MAX_SCANOUTS else VIRTIO_GPU_MAX_SCANOUTS

    def has(self, token: str) -> bool:
        kind, _, name = token.partition(":")
        if kind == "virtio":
            return bool(self.features & GpuFeature[f"F_{name}"].mask)
        if kind == "proto":
            return bool(self.protocol_features & bit(ProtocolFeature[name]))
        if kind == "capset":
            return Capset[f"CAPSET_{name}"] in self.capsets
        if kind == "shm":
            return ShmId[f"SHM_ID_{name}"] in self.shm
        if kind == "scanouts":
            return self.scanouts >= int(name)
        if kind == "program":
            return name in (self.capabilities or [])
        raise ValueError(f"unknown feature token {token!r}")

    def missing(self, tokens: tuple[str, ...] | list[str]) -> str | None:
        """Why the tokens are not all offered (None when they are)."""
        absent = [t for t in tokens if not self.has(t)]
        return ", ".join(f"{t} not offered" for t in absent) or None

    def describe(self) -> dict[str, Any]:
        return {
            "features": [f.name for f in GpuFeature if self.features & f.mask],
            "protocol_features": [p.name for p in ProtocolFeature if self.protocol_features & bit(p)],
            "config": self.config.hex() if self.config else None,
            "shm": {str(k): v for k, v in self.shm.items()},
            "capsets": {Capset(k).name if k in Capset._value2member_map_ else str(k): list(v)
                        for k, v in self.capsets.items()},
            "capabilities": self.capabilities,
            "exits_on_disconnect": self.exits_on_disconnect,
        }


def unasked(profile: Profile, tokens: tuple[str, ...] | list[str]) -> str | None:
    """Why a requirement does not apply under `profile` although the back end may offer what it needs: protocol
    features that profile's VMM never asks for (None when it asks for all of them)."""
    absent = [t for t in tokens if t.startswith("proto:")
              and not profile.protocol_features & bit(ProtocolFeature[t.partition(":")[2]])]
    return ", ".join(f"{t} never asked by the {profile.name} front end" for t in absent) or None


def print_capabilities(backend: BackendProcess) -> list[str] | None:
    argv = [*without_socket(backend.argv_template), "--print-capabilities"]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        caps = json.loads(out.stdout)
        features = caps.get("features", []) if isinstance(caps, dict) else []
        return [str(f) for f in features] if isinstance(features, list) else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def probe(backend: BackendProcess, profile: Profile = QEMU) -> Offer:
    """Ask the back end what it offers (features, protocol features, config, shared memory, capsets), set up as
    `profile`'s VMM sets it up."""
    offer = Offer(capabilities=print_capabilities(backend))
    backend.ensure()
    sess = open_session(backend.socket_path, profile=profile)
    try:
        fe = sess.fe
        offer.features, offer.protocol_features = fe.backend_features, fe.backend_protocol_features
        if fe.has(ProtocolFeature.CONFIG):
            offer.config = fe.get_config(0, 16)
        if fe.has(ProtocolFeature.SHMEM):
            offer.shm = fe.shmem_config()
        num = s.config.parse(offer.config).num_capsets if offer.config else 0
        for i in range(min(num, 16)):
            resp = sess.cmd(GetCapsetInfo(hdr(CtrlType.CMD_GET_CAPSET_INFO), i), 40)
            if rtype(resp) == CtrlType.RESP_OK_CAPSET_INFO:
                info = s.resp_capset_info.parse(resp)
                offer.capsets[info.capset_id] = (info.capset_max_version, info.capset_max_size)
    finally:
        sess.close()
    if backend.proc is not None:
        try:
            offer.exits_on_disconnect = backend.proc.wait(1.0) == 0
        except subprocess.TimeoutExpired:
            offer.exits_on_disconnect = False
    return offer


class CheckContext:
    def __init__(self, backend: BackendProcess, offer: Offer, profile: Profile = QEMU) -> None:
        self.backend = backend
        self.offer = offer
        self.profile = profile
        # Set by a check that ends the process on purpose (so its exit is not taken for a crash).
        self.stops_backend = False
        self._sessions: list[Session] = []
        self._frontends: list[Frontend] = []

    def need(self, *tokens: str) -> None:
        why = self.offer.missing(tokens)
        if why:
            raise NotApplicable(why)

    def session(self, **kw: Any) -> Session:
        sess = self._connected(lambda: open_session(self.backend.socket_path, profile=self.profile, **kw))
        self._sessions.append(sess)
        return sess

    def need_display_socket(self) -> None:
        """For checks that hand the back end a display socket themselves."""
        if not self.profile.display_socket:
            raise no_display_socket(self.profile)

    def frontend(self) -> Frontend:
        """A bare connection: nothing negotiated, for checks of the vhost-user conversation itself."""
        fe = self._connected(lambda: Frontend.connect(self.backend.socket_path, timeout=TIMEOUT))
        self._frontends.append(fe)
        return fe

    def _connected(self, connect: Callable[[], T]) -> T:
        """`connect()` to the back end, started first if it is not running. The probe judges a back end that exits
        when its front end leaves (QEMU's) by waiting a second for it to exit; under load it may take longer, and
        then the next check finds it still running, about to exit, and is refused. Once it has exited, the offer
        is corrected for the rest of the run and a fresh process takes the connection."""
        self.backend.ensure()
        try:
            return connect()
        except (ConnectionRefusedError, FileNotFoundError):  # no listener, or its socket removed at exit
            if not wait_until(lambda: not self.backend.alive(), 2.0):
                raise
            self.offer.exits_on_disconnect = True
            self.backend.start()
            return connect()

    def drop(self, sess: Session) -> None:
        """Close a session before the check ends (a disconnect is part of what it tests)."""
        if sess in self._sessions:
            self._sessions.remove(sess)
        sess.close()

    def drop_frontend(self, fe: Frontend) -> None:
        if fe in self._frontends:
            self._frontends.remove(fe)
        fe.close()

    def settle_after_disconnect(self) -> None:
        """Before connecting again: a back end that exits when its front end leaves is given time to, and a new
        process is started for the next connection."""
        proc = self.backend.proc
        if self.offer.exits_on_disconnect and proc is not None:
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        self.backend.ensure()

    def fresh_backend(self) -> None:
        """A new process, for checks that look at it from the outside (fds, signals)."""
        self.close()
        self.backend.start()

    def close(self) -> None:
        for sess in self._sessions:
            sess.close()
        for fe in self._frontends:
            fe.close()
        self._sessions.clear()
        self._frontends.clear()
