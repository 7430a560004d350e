"""The machine's apt sources, read at run time: which Debian mirror the lab may use (never written into the
project), from deb822 ``*.sources`` files or one-line ``sources.list`` files."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from vgpu_lab.shell import ProvisionError


@dataclasses.dataclass(frozen=True)
class AptSource:
    """One apt source entry, whichever of the two file formats it came from."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None
    enabled: bool
    origin: Path


def parse_deb822_sources(text: str, origin: Path) -> list[AptSource]:
    """Parse a deb822 ``.sources`` file (stanzas of ``Field: value`` separated by blank lines).

    Continuation lines (starting with white space) belong to the previous field: ``Signed-By`` may hold an
    inline armoured key that way, and it must not be mistaken for a new field.
    """
    sources: list[AptSource] = []
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last_key = {}, None
            continue
        if raw[0] in " \t":
            if last_key is not None:
                current[last_key] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last_key = key.strip().lower()
        current[last_key] = value.strip()
    if current:
        stanzas.append(current)
    for stanza in stanzas:
        sources.append(
            AptSource(
                types=tuple(stanza.get("types", "").split()),
                uris=tuple(stanza.get("uris", "").split()),
                suites=tuple(stanza.get("suites", "").split()),
                components=tuple(stanza.get("components", "").split()),
                signed_by=stanza.get("signed-by") or None,
                enabled=stanza.get("enabled", "yes").strip().lower() not in ("no", "false", "0"),
                origin=origin,
            )
        )
    return sources


_ONE_LINE_RE = re.compile(r"^(?P<type>deb(?:-src)?)\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<rest>.*)$")


def parse_one_line_sources(text: str, origin: Path) -> list[AptSource]:
    """Parse the one-line ``deb [options] URI suite component...`` format of ``sources.list``."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        match = _ONE_LINE_RE.match(line)
        if not match:
            continue
        fields = match.group("rest").split()
        if len(fields) < 2:
            continue
        options = dict(opt.split("=", 1) for opt in (match.group("opts") or "").split() if "=" in opt)
        sources.append(
            AptSource(
                types=(match.group("type"),),
                uris=(fields[0],),
                suites=(fields[1],),
                components=tuple(fields[2:]),
                signed_by=options.get("signed-by"),
                enabled=True,
                origin=origin,
            )
        )
    return sources


def source_files(etc_apt: Path) -> list[Path]:
    """The files apt itself reads: ``sources.list`` plus ``sources.list.d/*.list`` and ``*.sources``."""
    files = []
    main = etc_apt / "sources.list"
    if main.is_file():
        files.append(main)
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files.extend(sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources") and p.is_file()))
    return files


def read_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """All enabled entries apt would use."""
    sources: list[AptSource] = []
    for path in source_files(etc_apt):
        text = path.read_text(encoding="utf-8", errors="replace")
        parsed = parse_deb822_sources(text, path) if path.suffix == ".sources" else parse_one_line_sources(text, path)
        sources.extend(s for s in parsed if s.enabled)
    return sources


def os_codename(os_release: Path = Path("/etc/os-release")) -> str:
    """The Debian codename (``bookworm``) from os-release; the backports suite is derived from it."""
    try:
        for line in os_release.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError as exc:
        raise ProvisionError(f"apt sources: cannot read {os_release}: {exc}") from exc
    raise ProvisionError(f"apt sources: no VERSION_CODENAME in {os_release}")


def debian_mirror(sources: Sequence[AptSource], codename: str) -> AptSource:
    """The entry that serves the release's main archive (``<codename>`` suite, component main).

    The security archive is a different tree (``debian-security``) without backports, so an entry is only taken
    when it lists the plain codename suite.
    """
    for source in sources:
        if "deb" in source.types and codename in source.suites and "main" in source.components and source.uris:
            return source
    raise ProvisionError(
        f"apt sources: no enabled 'deb' entry for suite {codename!r} with component main in /etc/apt; "
        "cannot tell which Debian mirror to use"
    )


def debian_mirror_uri(etc_apt: Path = Path("/etc/apt"), codename: str | None = None) -> str:
    """The Debian mirror URI the machine's apt sources name for its release, read at run time."""
    return debian_mirror(read_apt_sources(etc_apt), codename or os_codename()).uris[0]
