"""Deciding the cache attribute a guest mapping of a host buffer must use, and saying why.

Why this order (strongest source first, each a different kind of evidence):

1. **the kernel** — ``DMA_BUF_IOCTL_INFO`` is the exporter itself describing the pgprot of its mmap; when it
   answers with a value we know, nothing else is consulted. An answer that holds for the buffer's life is used
   as it is. An answer that is only the current one (the exporter may move the buffer, as TTM drivers do between
   VRAM and system memory) is refused, unless the operator opted in (``map_changing``), and then the buffer is
   mapped :data:`PLACEMENT_SAFE` whatever it is now. An answer that says CPU access needs cache maintenance
   (``DMA_BUF_IOCTL_SYNC``, which nothing can issue for a guest's accesses) is always refused. Neither refusal
   falls through to the sources below: the exporter has spoken, and no rule or allocator table outranks it;
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

The resolver asks at every call — a MAP_BLOB never reuses an earlier answer, since the buffer may have moved.
When the kernel does not answer (ENOTTY on every stock kernel, ENOSYS, EINVAL, a value of another revision or one
we do not know) the source that does decide says, in its :attr:`Resolution.detail`, what the kernel said, so an
operator can tell "the kernel was asked and could not say" from "the kernel said so".
"""

from __future__ import annotations

from collections.abc import Callable

from .dmabuf import KernelAnswer, query_map_attr
from .rules import OperatorRules
from .types import CacheAttr, HostBuffer, Provenance, Resolution, Unresolved

#: How the resolver asks the kernel; replaceable only so tests can play kernels that do not exist here.
KernelQuery = Callable[[int], KernelAnswer]

LEGACY_CACHED_DRIVER = "i915"

#: What a buffer whose attribute may change is mapped as, when the operator opted in: write-combined, i.e.
#: non-cacheable in the guest on every architecture we know (x86 PAT WC; arm64 Normal-NC). Its placements are
#: write-back (memory the device snoops) or write-combined (memory it does not). In a WC placement WC is exact.
#: In a WB one it is a non-cacheable alias of cacheable memory: x86 keeps that coherent (the CPU snoops its caches
#: on WC accesses; KVM honours a guest's PAT only on CPUs that self-snoop), and on arm64 the guest never holds a
#: cache line of the buffer, so it cannot write stale lines back over the device's data. CACHED would be the
#: dangerous alias in every WC placement, and UNCACHED is Device memory on arm64 (unaligned accesses fault).
#: spec/dma-buf-info.md has the full argument, including what stays open on arm64.
PLACEMENT_SAFE = CacheAttr.WC
MAP_CHANGING_OPTION = "--map-changing-placement"


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

    ``rules`` are the operator's (None: no rules); ``legacy_heuristic`` enables the driver-name guess;
    ``map_changing`` maps buffers whose exporter says the attribute may change as :data:`PLACEMENT_SAFE`.
    """

    def __init__(
        self,
        *,
        rules: OperatorRules | None = None,
        legacy_heuristic: bool = False,
        map_changing: bool = False,
        kernel_query: KernelQuery = query_map_attr,
    ) -> None:
        self.rules = rules
        self.legacy_heuristic = legacy_heuristic
        self.map_changing = map_changing
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
            return self._kernel_said(buffer, answer)
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

    def _kernel_said(self, buffer: HostBuffer, answer: KernelAnswer) -> Resolution:
        """The exporter answered: use it, refuse, or (opted in) map a changing buffer as PLACEMENT_SAFE."""
        attr = answer.attr
        assert attr is not None
        if answer.needs_sync:
            raise Unresolved(f"{describe_buffer(buffer)}: the exporter says CPU access needs cache maintenance "
                             f"(DMA_BUF_IOCTL_SYNC), which a guest's mapping cannot do ({answer.describe()})")
        if answer.fixed:
            return Resolution(attr, Provenance.KERNEL, answer.describe())
        if not self.map_changing:
            raise Unresolved(f"{describe_buffer(buffer)}: the exporter says its attribute may change while the "
                             f"buffer is mapped, and a guest's mapping cannot follow a move ({answer.describe()}); "
                             f"{MAP_CHANGING_OPTION} maps such buffers {PLACEMENT_SAFE.name}")
        return Resolution(PLACEMENT_SAFE, Provenance.OPERATOR,
                          f"{MAP_CHANGING_OPTION}: mapped {PLACEMENT_SAFE.name}, non-cacheable in the guest whatever "
                          f"the placement; kernel: {answer.describe()}")

    def _why_not(self, buffer: HostBuffer, answer: KernelAnswer) -> str:
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
