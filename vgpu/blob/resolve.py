"""Deciding the cache attribute a guest mapping of a host buffer must use, and saying why.

Why this order (strongest source first, each a different kind of evidence):

1. **the kernel** — ``DMA_BUF_IOCTL_INFO`` is the exporter itself describing the pgprot of its mmap; when it
   answers with a value we know, nothing else is consulted;
2. **an operator override** — ``[allocator_overrides]`` in the rules file: the operator may outrank our allocator
   table (never the kernel), e.g. to map memfd buffers WC on a platform we do not know;
3. **the allocator** — we made the buffer, and each allocator documents the kernel code path that fixes how its
   buffers are mapped (see :mod:`vgpu.blob.allocators`);
4. **an operator rule** — an explicit assertion in a TOML file, keyed by exporter or DRM driver name, for buffers
   no allocator of ours made;
5. **the legacy heuristic** — virglrenderer's "driver i915 is cached, everything else write-combined", only when
   the operator opted in, because it is a guess;
6. otherwise :class:`~vgpu.blob.types.Unresolved`: a buffer nobody can vouch for must not be mapped, since a
   guest mapping with the wrong attribute aliases host memory with a different cache type.

When the kernel does not answer (ENOTTY on every stock kernel, ENOSYS, EINVAL, an unknown value) the source that
does decide says, in its :attr:`Resolution.detail`, what the kernel said, so an operator can tell "the kernel was
asked and could not say" from "the kernel said so".
"""

from __future__ import annotations

from collections.abc import Callable

from .dmabuf import VmProtAnswer, query_vm_prot
from .rules import OperatorRules
from .types import CacheAttr, HostBuffer, Provenance, Resolution, Unresolved

#: How the resolver asks the kernel; replaceable only so tests can play kernels that do not exist here.
KernelQuery = Callable[[int], VmProtAnswer]

LEGACY_CACHED_DRIVER = "i915"


def legacy_heuristic(name: str) -> CacheAttr:
    """virglrenderer's guess (vrend_winsys_gbm.c, virgl_gbm_get_map_info): i915 is CACHED, anything else WC."""
    return CacheAttr.CACHED if name == LEGACY_CACHED_DRIVER else CacheAttr.WC


def describe_buffer(buffer: HostBuffer) -> str:
    exporter = f"exporter {buffer.exporter!r}" if buffer.exporter is not None else "not a dma-buf"
    driver = f", DRM driver {buffer.drm_driver!r}" if buffer.drm_driver is not None else ""
    return f"buffer fd {buffer.fd} ({buffer.allocator}, {exporter}{driver}, {buffer.size} bytes)"


def map_info(resolution: Resolution) -> int:
    """The value for RESP_OK_MAP_INFO: exactly 1, 2 or 3 (the Linux guest compares for equality)."""
    value = int(resolution.attr)
    if value not in (CacheAttr.CACHED, CacheAttr.UNCACHED, CacheAttr.WC):
        raise Unresolved(f"{resolution} is not a map_info value a guest accepts")
    return value


class Resolver:
    """The project's :class:`~vgpu.blob.types.CacheResolver`.

    ``rules`` are the operator's (None: no rules); ``legacy_heuristic`` enables the driver-name guess.
    """

    def __init__(
        self,
        *,
        rules: OperatorRules | None = None,
        legacy_heuristic: bool = False,
        kernel_query: KernelQuery = query_vm_prot,
    ) -> None:
        self.rules = rules
        self.legacy_heuristic = legacy_heuristic
        self._kernel_query = kernel_query

    def resolve(self, buffer: HostBuffer) -> Resolution:
        """Decide, record the decision on the buffer (``buffer.resolution``) and return it."""
        resolution = self._decide(buffer)
        buffer.resolution = resolution
        return resolution

    def _decide(self, buffer: HostBuffer) -> Resolution:
        if buffer.fd < 0:
            raise ValueError(f"{describe_buffer(buffer)} is closed")
        answer = self._kernel_query(buffer.fd)
        if answer.attr is not None:
            return Resolution(answer.attr, Provenance.KERNEL, answer.describe())
        kernel = f"kernel: {answer.describe()}"

        override = self.rules.override(buffer.allocator) if self.rules is not None else None
        if override is not None:
            knew = f", overriding the allocator's {buffer.allocator_attr.name}" if buffer.allocator_attr else ""
            return Resolution(override.attr, Provenance.OPERATOR, f"{override.describe()}{knew}; {kernel}")

        if buffer.allocator_attr is not None:
            reason = buffer.allocator_reason or "the allocator's documented mapping"
            return Resolution(buffer.allocator_attr, Provenance.ALLOCATOR, f"{buffer.allocator}: {reason}; {kernel}")

        rule = self.rules.match(buffer.exporter, buffer.drm_driver) if self.rules is not None else None
        if rule is not None:
            return Resolution(rule.attr, Provenance.OPERATOR, f"{rule.describe()}; {kernel}")

        name = buffer.drm_driver or buffer.exporter
        if self.legacy_heuristic and buffer.is_dmabuf and name is not None:
            attr = legacy_heuristic(name)
            guess = "is" if name == LEGACY_CACHED_DRIVER else "is not"
            detail = f"driver-name guess: {name!r} {guess} {LEGACY_CACHED_DRIVER!r} -> {attr.name}; {kernel}"
            return Resolution(attr, Provenance.HEURISTIC, detail)

        raise Unresolved(f"{describe_buffer(buffer)}: {self._why_not(buffer, answer)}")

    def _why_not(self, buffer: HostBuffer, answer: VmProtAnswer) -> str:
        reasons = [f"the kernel did not say ({answer.describe()})", f"allocator {buffer.allocator!r} knows nothing"]
        if self.rules is None:
            reasons.append("no operator rules are configured")
        else:
            names = [f"exporter {buffer.exporter!r}"] if buffer.exporter is not None else []
            if buffer.drm_driver is not None:
                names.append(f"DRM driver {buffer.drm_driver!r}")
            reasons.append(f"no rule in {self.rules.source} for {' or '.join(names) or 'a buffer without exporter'}")
        if not self.legacy_heuristic:
            reasons.append("the legacy heuristic is disabled")
        elif not buffer.is_dmabuf:
            reasons.append("the legacy heuristic only guesses for dma-bufs")
        return "; ".join(reasons)
