"""Guest side of the kernel-query check: our Python dma-buf layer asks about buffers a C program made.

Why a separate program: the static ``dmabuf_info`` guest program creates the buffers (udmabuf, system heap, vgem
and virtio-gpu PRIME exports, a memfd), reads the page-table truth, and then ``exec``s this module inside a chroot
of the host's root (shared read-only over virtio-9p), handing over the very same fds in ``VGPU_DMABUF_FDS``
(``name=fd,...``). So the answers printed here come from :func:`vgpu.blob.dmabuf.query_map_attr` and the
:class:`~vgpu.blob.resolve.Resolver` running on the real kernel, about buffers whose truth is already known.

One line per buffer, for the test to parse::

    VGPU-GUEST py name=<buffer> fd=<n> exporter=<exp_name|-> answer=<code> kind=<KernelAnswerKind>
        param99=<code> resolved=<CACHED|WC|...|-> provenance=<kernel|...|->

then one ``VGPU-GUEST py-fallback <json>`` line per buffer and fallback mode, and ``VGPU-GUEST py-done ok
count=<n>`` at the end (``py-done fail`` with the reason if the fds are missing).

The fallback lines exist for the exporters the kernel cannot speak for (a virtio-gpu PRIME export answers
``ENOSYS`` on the patched kernel, everything answers ``ENOTTY`` on a stock one): the same real fd goes through
the resolver three more times — with an operator rule for the ``virtio_gpu`` exporter (:data:`FALLBACK_RULES`),
with only the legacy heuristic enabled, and with neither — so the test sees which fallback decided, with which
provenance, and that the kernel's own answer is named in the detail (or in the refusal)::

    VGPU-GUEST py-fallback {"name": ..., "mode": "rule"|"heuristic"|"none", "answer": ...,
                            "resolved": <attr|null>, "provenance": <value|null>, "detail": <text>}
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from vgpu.blob.dmabuf import query_info, query_map_attr, read_fdinfo
from vgpu.blob.resolve import Resolver
from vgpu.blob.rules import parse_rules
from vgpu.blob.types import HostBuffer, Unresolved

ENV_FDS = "VGPU_DMABUF_FDS"
UNKNOWN_PARAM = 99
FALLBACK_PREFIX = "VGPU-GUEST py-fallback "
#: The operator's assertion for virtio-gpu's PRIME exports (the exporter without a DMA_BUF_IOCTL_INFO hook).
FALLBACK_RULES = '[exporters]\nvirtio_gpu = "wc"\n'
FALLBACK_RULES_SOURCE = "probe-rules.toml"


def parse_fds(text: str) -> list[tuple[str, int]]:
    """``udmabuf=3,vgem=5`` as ``[("udmabuf", 3), ("vgem", 5)]``."""
    pairs = []
    for item in filter(None, text.split(",")):
        name, sep, fd = item.partition("=")
        if not sep or not fd.isdigit():
            raise ValueError(f"bad {ENV_FDS} item {item!r}")
        pairs.append((name, int(fd)))
    return pairs


def probe(name: str, fd: int) -> str:
    """The report line for one borrowed fd (it is never closed here: the C program owns it)."""
    exporter = read_fdinfo(fd).exporter
    answer = query_map_attr(fd)
    unknown = query_info(fd, UNKNOWN_PARAM)
    buffer = HostBuffer(fd=fd, size=os.fstat(fd).st_size, allocator="external", exporter=exporter)
    try:
        resolution = Resolver().resolve(buffer)
        resolved, provenance = resolution.attr.name, resolution.provenance.value.replace(" ", "-")
    except Unresolved:
        resolved, provenance = "-", "-"
    return (
        f"VGPU-GUEST py name={name} fd={fd} exporter={exporter or '-'} answer={answer.code} "
        f"kind={answer.kind.name} param99={unknown.code} resolved={resolved} provenance={provenance}"
    )


def fallbacks(name: str, fd: int) -> list[str]:
    """The fallback report lines for one borrowed fd: the resolver with a rule, with the heuristic, with neither.

    Why a fresh :class:`HostBuffer` per mode: the resolver records its decision on the buffer, and each mode
    must decide from nothing but the fd (allocator ``external``: no allocator knowledge to fall back on).
    """
    exporter = read_fdinfo(fd).exporter
    answer = query_map_attr(fd)
    modes = (
        ("rule", Resolver(rules=parse_rules(FALLBACK_RULES, FALLBACK_RULES_SOURCE))),
        ("heuristic", Resolver(legacy_heuristic=True)),
        ("none", Resolver()),
    )
    lines = []
    for mode, resolver in modes:
        buffer = HostBuffer(fd=fd, size=os.fstat(fd).st_size, allocator="external", exporter=exporter)
        record: dict[str, str | None] = {"name": name, "mode": mode, "exporter": exporter, "answer": answer.code}
        try:
            resolution = resolver.resolve(buffer)
            record.update(resolved=resolution.attr.name, provenance=resolution.provenance.value,
                          detail=resolution.detail)
        except Unresolved as exc:
            record.update(resolved=None, provenance=None, detail=str(exc))
        lines.append(FALLBACK_PREFIX + json.dumps(record, sort_keys=True))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Report on every fd named in ``$VGPU_DMABUF_FDS``."""
    del argv  # no options: everything comes from the environment the C program set
    try:
        pairs = parse_fds(os.environ.get(ENV_FDS, ""))
    except ValueError as exc:
        print(f"VGPU-GUEST py-done fail {exc}", flush=True)
        return 1
    if not pairs:
        print(f"VGPU-GUEST py-done fail no {ENV_FDS} in the environment", flush=True)
        return 1
    for name, fd in pairs:
        print(probe(name, fd), flush=True)
    for name, fd in pairs:
        for line in fallbacks(name, fd):
            print(line, flush=True)
    print(f"VGPU-GUEST py-done ok count={len(pairs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
