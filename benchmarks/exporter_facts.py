"""What the kernel does when user space mmaps a dma-buf, per exporter: the truth column of the cache matrix.

Why a table: the exporters users meet (Intel, AMD, Qualcomm, Arm GPUs) cannot exist on this machine, yet the
benchmark must say what each strategy would answer for them and whether that is right. The truth is the pgprot the
exporter's mmap path installs; each row names the function and file, read in Debian's ``linux-source-6.12``
(6.12.x, ``/usr/src/linux-source-6.12.tar.xz`` on this machine kind; line numbers are from that tree). What was
*not* checked is said in ``verified``: nothing here ran on the hardware, and architecture details (x86 PAT vs
Arm MAIR) are not modelled — the attribute is the one the driver asks for.

``driver`` is the DRM driver name (``DRM_IOCTL_VERSION``), which is what virglrenderer's legacy guess keys on (the
gbm backend name); ``exp_name`` is what ``/proc/<pid>/fdinfo`` shows for the dma-buf (``drm`` for every export
through ``drm_gem_prime_export``, the module name for exporters with their own ``DEFINE_DMA_BUF_EXPORT_INFO``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vgpu.blob.types import CacheAttr

#: Where the facts were read (the file paths below are relative to its top directory).
KERNEL_SOURCE = "Debian linux-source-6.12 (6.12.x), read on this machine"
READ = "read in " + KERNEL_SOURCE + "; not run on the hardware"


@dataclass(frozen=True)
class ExporterFact:
    row: str
    driver: str  # DRM driver name, the legacy heuristic's key ("-" for non-DRM exporters)
    exp_name: str  # fdinfo exp_name
    truth: CacheAttr  # the attribute of the placement the buffer starts in
    fact: str  # what the mmap path does
    source: str  # file:line function
    verified: str  # how far this was checked
    #: The attribute of the other placement a TTM driver may move the buffer to while it is mapped (None: it does
    #: not move, or every placement it can take is mapped alike, so the truth is fixed).
    moves_to: CacheAttr | None = None
    #: CPU access through the mapping is coherent with the device only inside DMA_BUF_IOCTL_SYNC.
    needs_sync: bool = False

    @property
    def changes(self) -> bool:
        return self.moves_to is not None and self.moves_to is not self.truth

    @property
    def truth_name(self) -> str:
        """``WC``, ``WC|CACHED`` for a truth that changes over the buffer's life, ``SYNC`` for one that needs cache
        maintenance (:mod:`benchmarks.truths`)."""
        if self.needs_sync:
            return "SYNC"
        return f"{self.truth.name}|{self.moves_to.name}" if self.changes and self.moves_to else self.truth.name


#: Exporters that cannot exist here: described by the kernel fact.
DESCRIBED: tuple[ExporterFact, ...] = (
    ExporterFact(
        "i915 system memory (integrated GPU with LLC, no LMEM)", "i915", "i915", CacheAttr.CACHED,
        "i915_gem_dmabuf_mmap: without LMEM the dma-buf mmap is forwarded to the object's shmem file "
        "(call_mmap(obj->base.filp)): shmem pages with the VMA's default pgprot, write-back; the LLC is shared "
        "with the GPU, so the cached mapping is coherent",
        "drivers/gpu/drm/i915/gem/i915_gem_dmabuf.c:94 i915_gem_dmabuf_mmap", READ),
    ExporterFact(
        "i915 system memory on a non-LLC integrated GPU", "i915", "i915", CacheAttr.CACHED,
        "the same write-back shmem mapping, but the GPU does not snoop: i915_gem_begin_cpu_access moves the object "
        "to the CPU domain, which clflushes it (i915_gem_object_set_to_cpu_domain → i915_gem_clflush_object, "
        "skipped only for cache-coherent objects): coherent only inside DMA_BUF_IOCTL_SYNC",
        "drivers/gpu/drm/i915/gem/i915_gem_dmabuf.c:118 i915_gem_begin_cpu_access; i915_gem_domain.c:519-522; "
        "i915_gem_clflush.c:71", READ, needs_sync=True),
    ExporterFact(
        "i915 local memory (discrete GPU, LMEM placement)", "i915", "i915", CacheAttr.WC,
        "with LMEM the dma-buf mmap goes through drm_gem_prime_mmap to the TTM fault path; an object resident in "
        "device memory is iomem whose bus.caching is ttm_write_combined (i915_ttm_io_mem_reserve), and "
        "ttm_prot_from_caching turns that into pgprot_writecombine",
        "drivers/gpu/drm/i915/gem/i915_gem_ttm.c:657 i915_ttm_io_mem_reserve (l.681); "
        "drivers/gpu/drm/ttm/ttm_module.c:62 ttm_prot_from_caching", READ),
    ExporterFact(
        "i915 discrete, LMEM+SMEM object in system memory", "i915", "i915", CacheAttr.WC,
        "i915_ttm_select_tt_caching: objects with more than one placement get ttm_write_combined system pages "
        "('Other objects get WC mapping for now. Even if in system.'): it moves, but is WC in both places",
        "drivers/gpu/drm/i915/gem/i915_gem_ttm.c:112 i915_ttm_select_tt_caching (l.119-122)", READ,
        moves_to=CacheAttr.WC),
    ExporterFact(
        "i915 discrete, LMEM-only object evicted to system memory", "i915", "i915", CacheAttr.CACHED,
        "i915_ttm_select_tt_caching: n_placements <= 1 gets ttm_cached system pages ('Objects only allowed in "
        "system get cached cpu-mappings, or when evicting lmem-only buffers to system for swapping')",
        "drivers/gpu/drm/i915/gem/i915_gem_ttm.c:112 i915_ttm_select_tt_caching (l.114-120)", READ),
    ExporterFact(
        "i915 discrete, LMEM-only object over its life (LMEM, evicted, back)", "i915", "i915", CacheAttr.WC,
        "in LMEM: iomem with bus.caching ttm_write_combined (i915_ttm_io_mem_reserve); evicted to system memory: "
        "ttm_cached pages (i915_ttm_select_tt_caching, n_placements <= 1); TTM tears CPU mappings down on each "
        "move and the next fault takes the new pgprot (ttm_bo_vm_fault_reserved: ttm_io_prot per fault)",
        "drivers/gpu/drm/i915/gem/i915_gem_ttm.c:681, :119-120; drivers/gpu/drm/ttm/ttm_bo_vm.c:218",
        READ, moves_to=CacheAttr.CACHED),
    ExporterFact(
        "amdgpu VRAM (CPU-visible, PCIe-attached)", "amdgpu", "drm", CacheAttr.WC,
        "amdgpu_vram_mgr_new sets bus.caching = ttm_write_combined unless the GPU is XGMI-connected to the CPU "
        "(then ttm_cached); TTM's fault path maps iomem with ttm_prot_from_caching",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_vram_mgr.c:452 amdgpu_vram_mgr_new (l.614-617)", READ),
    ExporterFact(
        "amdgpu VRAM on an XGMI CPU-connected part", "amdgpu", "drm", CacheAttr.CACHED,
        "amdgpu_vram_mgr_new: adev->gmc.xgmi.connected_to_cpu → bus.caching = ttm_cached",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_vram_mgr.c:614-615", READ),
    ExporterFact(
        "amdgpu GTT with AMDGPU_GEM_CREATE_CPU_GTT_USWC, where USWC is supported", "amdgpu", "drm", CacheAttr.WC,
        "amdgpu_ttm_tt_create: CPU_GTT_USWC → ttm_write_combined system pages; the flag survives only where "
        "amdgpu_bo_support_uswc() is true (x86-64 with PAT, or drm_arch_can_wc_memory())",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_ttm.c:1132 amdgpu_ttm_tt_create (l.1150-1153); "
        "amdgpu_object.c:484 amdgpu_bo_support_uswc", READ),
    ExporterFact(
        "amdgpu GTT with CPU_GTT_USWC asked where USWC is unsupported", "amdgpu", "drm", CacheAttr.CACHED,
        "amdgpu_bo_create clears CPU_GTT_USWC when amdgpu_bo_support_uswc() is false (32-bit x86, x86 without "
        "PAT, architectures where drm_arch_can_wc_memory() is false), so amdgpu_ttm_tt_create picks ttm_cached",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_object.c:590-591 (amdgpu_bo_support_uswc l.484-515); "
        "amdgpu_ttm.c:1150-1153", READ),
    ExporterFact(
        "amdgpu GTT without USWC", "amdgpu", "drm", CacheAttr.CACHED,
        "amdgpu_ttm_tt_create: no CPU_GTT_USWC flag → ttm_cached; ttm_prot_from_caching leaves the pgprot alone",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_ttm.c:1150-1153; drivers/gpu/drm/ttm/ttm_module.c:62", READ),
    ExporterFact(
        "msm BO with MSM_BO_WC (e.g. dumb/scanout buffers)", "msm", "drm", CacheAttr.WC,
        "msm_gem_object_mmap: vm_page_prot = msm_gem_pgprot(), which is pgprot_writecombine for MSM_BO_WC; "
        "dumb buffers are created MSM_BO_SCANOUT | MSM_BO_WC",
        "drivers/gpu/drm/msm/msm_gem.c:1101 msm_gem_object_mmap, :315 msm_gem_pgprot, :706 dumb create", READ),
    ExporterFact(
        "msm BO with MSM_BO_CACHED_COHERENT", "msm", "drm", CacheAttr.CACHED,
        "msm_gem_pgprot returns the default (write-back) pgprot for anything but MSM_BO_WC",
        "drivers/gpu/drm/msm/msm_gem.c:315 msm_gem_pgprot", READ),
    ExporterFact(
        "panfrost BO, non-coherent Mali (the usual SoC)", "panfrost", "drm", CacheAttr.WC,
        "panfrost_gem_create_object: map_wc = !pfdev->coherent; drm_gem_shmem_mmap then applies "
        "pgprot_writecombine",
        "drivers/gpu/drm/panfrost/panfrost_gem.c:250 (l.262); drivers/gpu/drm/drm_gem_shmem_helper.c:594 "
        "drm_gem_shmem_mmap (l.628-629)", READ),
    ExporterFact(
        "panfrost BO, dma-coherent Mali", "panfrost", "drm", CacheAttr.CACHED,
        "map_wc = !pfdev->coherent = false → drm_gem_shmem_mmap keeps the default pgprot",
        "drivers/gpu/drm/panfrost/panfrost_gem.c:262", READ),
    ExporterFact(
        "panthor BO, non-coherent Mali CSF", "panthor", "drm", CacheAttr.WC,
        "panthor_gem_create_object: map_wc = !ptdev->coherent (GEM-shmem as panfrost)",
        "drivers/gpu/drm/panthor/panthor_gem.c:166 (l.176)", READ),
    ExporterFact(
        "v3d BO (Raspberry Pi 4/5)", "v3d", "drm", CacheAttr.WC,
        "v3d_create_object: map_wc = true (GEM-shmem)", "drivers/gpu/drm/v3d/v3d_bo.c:84 (l.98)", READ),
    ExporterFact(
        "lima BO (Mali Utgard)", "lima", "drm", CacheAttr.WC,
        "lima_gem_create_object: map_wc = true (GEM-shmem)", "drivers/gpu/drm/lima/lima_gem.c:235", READ),
    ExporterFact(
        "etnaviv BO with ETNA_BO_UNCACHED", "etnaviv", "drm", CacheAttr.UNCACHED,
        "etnaviv_gem_mmap_obj: ETNA_BO_WC → pgprot_writecombine, ETNA_BO_UNCACHED → pgprot_noncached, "
        "cached objects are handed to their shmem file",
        "drivers/gpu/drm/etnaviv/etnaviv_gem.c:127 etnaviv_gem_mmap_obj (l.136-139)", READ),
    ExporterFact(
        "xe BO with DRM_XE_GEM_CPU_CACHING_WB (system memory)", "xe", "drm", CacheAttr.CACHED,
        "xe_ttm_tt_create: cpu_caching WB → ttm_cached (WC → ttm_write_combined; VRAM iomem is WC)",
        "drivers/gpu/drm/xe/xe_bo.c:341 xe_ttm_tt_create (l.369-374)",
        READ + "; exp_name 'drm' assumed from xe exporting via drm_gem_prime_export (xe_dma_buf.c not read)"),
    ExporterFact(
        "xe BO in VRAM (discrete, x86)", "xe", "drm", CacheAttr.WC,
        "on x86 xe_ttm_io_mem_reserve leaves bus.caching at ttm_cached (ttm_resource_init), so ttm_io_prot keeps "
        "the cached pgprot (bus.caching = ttm_write_combined is set only #if !defined(CONFIG_X86)); the PTE is WC "
        "only because x86 PAT substitutes the memtype ioremap_wc reserved for the VRAM BAR: vmf_insert_pfn_prot "
        "calls track_pfn_insert, which replaces the cache bits with lookup_memtype() of the BAR address",
        "drivers/gpu/drm/xe/xe_bo.c:445 xe_ttm_io_mem_reserve (l.473-475); drivers/gpu/drm/xe/xe_vram.c:156 "
        "ioremap_wc; mm/memory.c:2423; arch/x86/mm/pat/memtype.c:1069 track_pfn_insert, :654 lookup_memtype",
        READ + "; exp_name as above"),
    ExporterFact(
        "xe BO with VRAM and system placements over its life (discrete, x86)", "xe", "drm", CacheAttr.WC,
        "in VRAM: WC by PAT substitution (row above); in system memory on a discrete GPU: always ttm_cached "
        "('DGFX system memory is always WB'); TTM re-faults CPU mappings after each move",
        "drivers/gpu/drm/xe/xe_bo.c:362-367 xe_ttm_tt_create; :473-475; drivers/gpu/drm/ttm/ttm_bo_vm.c:218",
        READ + "; exp_name as above", moves_to=CacheAttr.CACHED),
    ExporterFact(
        "amdgpu BO with VRAM and GTT domains, no USWC, over its life", "amdgpu", "drm", CacheAttr.WC,
        "in VRAM: bus.caching ttm_write_combined (amdgpu_vram_mgr_new, PCIe parts); in GTT without USWC: "
        "ttm_cached pages; TTM moves it between them under memory pressure and re-faults CPU mappings",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_vram_mgr.c:614-617; amdgpu_ttm.c:1150-1153; "
        "drivers/gpu/drm/ttm/ttm_bo_vm.c:218", READ, moves_to=CacheAttr.CACHED),
    ExporterFact(
        "amdgpu BO with VRAM and GTT domains, USWC, over its life", "amdgpu", "drm", CacheAttr.WC,
        "VRAM ttm_write_combined, GTT with USWC ttm_write_combined: it moves, but is WC in both places",
        "drivers/gpu/drm/amd/amdgpu/amdgpu_vram_mgr.c:617; amdgpu_ttm.c:1150-1151", READ, moves_to=CacheAttr.WC),
)

#: The kernel facts behind the exporters this project creates for real (their truth is read from page tables).
REAL_SOURCES: dict[str, str] = {
    "vgem-moving": "our patch's vgem test exporter (drivers/gpu/drm/vgem/vgem_test.c): moves between WC and WB pages "
                   "when test_move is written, as a TTM move does",
    "vgem-incoherent": "our patch's vgem test exporter: WB pages whose CPU access it declares to need "
                       "DMA_BUF_IOCTL_SYNC (its begin/end_cpu_access flush the CPU caches)",
    "memfd": "mm/shmem.c shmem_mmap/shmem_fault: page-cache pages, the VMA's default pgprot (not re-read here)",
    "udmabuf": "drivers/dma-buf/udmabuf.c:42 udmabuf_vm_fault: vmf_insert_pfn with the VMA's default pgprot",
    "system-heap": "drivers/dma-buf/heaps/system_heap.c:195 system_heap_mmap: remap_pfn_range(vma->vm_page_prot)",
    "vgem": "drivers/gpu/drm/vgem/vgem_drv.c:94 (map_wc = true, l.106) + drm_gem_shmem_helper.c:628",
    "virtio-gpu": "drivers/gpu/drm/virtio/virtgpu_object.c: GEM-shmem without map_wc (l.111 mmap helper)",
}
