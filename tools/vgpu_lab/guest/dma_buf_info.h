/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * DMA_BUF_IOCTL_INFO: ask a dma-buf's exporter how user space mappings of the buffer are cached, whether that
 * holds for the buffer's life, and whether CPU access needs cache maintenance.
 *
 * Revision 3 of the proposal, as vgpu uses it and our lab kernel patch implements it (none was merged: a stock
 * kernel answers ENOTTY, an exporter without the hook ENOSYS, an unknown param EINVAL). vgpu's construct layout
 * of struct dma_buf_info is checked against this header's DWARF by tools/layoutcheck.py. spec/dma-buf-info.md
 * says why the query lives on the dma-buf.
 *
 * Revisions, and why they can never be confused:
 *   v1 (2022-07-29)  param 1 (DMA_BUF_INFO_VM_PROT); value WC 0, CACHED 1.
 *   v2 (2022-08-15)  param 1; value INCOHERENT 0, COHERENT_WC 1, COHERENT_CACHED 2.
 *   3  (this file)   param 2 (DMA_BUF_INFO_MAP_ATTR); value tagged with DMA_BUF_MAP_REVISION in bits 63:56.
 * The same ioctl and struct serve all three, so v1 and v2 answers are indistinguishable bytes: v2's COHERENT_WC (1)
 * read as v1 is CACHED, the dangerous direction. Revision 3 therefore (a) asks with a param v1 and v2 kernels reject
 * (EINVAL: "the kernel did not say"), (b) does not answer param 1 itself, so no v1/v2 reader takes our kernel's
 * answer for its own, and (c) tags the answer, so even a kernel that ignored the param, or a later revision, is
 * never read as ours. A new ioctl number would have done (a) alone, at the price of a number in the 'b' space that
 * mainline allocates (2 and 3 went to the sync_file ioctls); a version field in the request would rely on v1/v2
 * kernels rejecting a non-zero pad, which nothing guarantees. A reader uses a value only if the tag is
 * DMA_BUF_MAP_REVISION, bits 55:16 are zero, the attribute is one below and no unknown flag is set; anything else
 * means "the kernel did not say".
 */
#ifndef VGPU_SPEC_DMA_BUF_INFO_H
#define VGPU_SPEC_DMA_BUF_INFO_H

#include <linux/ioctl.h>
#include <linux/types.h>

/**
 * struct dma_buf_info - query one property of a dma-buf
 * @param: which property (DMA_BUF_INFO_*)
 * @pad: must be zero
 * @value: the answer, written by the kernel
 */
struct dma_buf_info {
	__u32 param;
	__u32 pad;
	__u64 value;
};

/* How a CPU mapping (mmap of the dma-buf fd) is cached, whether that holds, whether it needs cache maintenance. */
#define DMA_BUF_INFO_MAP_ATTR	2

#define DMA_BUF_MAP_REVISION	3
#define DMA_BUF_MAP_REVISION_SHIFT	56
/* Bits 7:0, numbered as virtio-gpu's map_info (VIRTIO_GPU_MAP_CACHE_*). */
#define DMA_BUF_MAP_ATTR_MASK	0xffULL
#define  DMA_BUF_MAP_CACHED	1
#define  DMA_BUF_MAP_UNCACHED	2
#define  DMA_BUF_MAP_WC	3
/*
 * Bits 15:8. FIXED: the attribute holds for the buffer's life (pinned, or every placement mapped alike); without it
 * the attribute is only the current one, and the exporter may move the buffer, tearing CPU mappings down so that the
 * next access faults in another attribute. NEEDS_SYNC: CPU access is coherent with the buffer's devices only inside
 * DMA_BUF_IOCTL_SYNC. A VMM can neither follow a move in a guest's mapping nor bracket a guest's accesses.
 */
#define DMA_BUF_MAP_FIXED		(1ULL << 8)
#define DMA_BUF_MAP_NEEDS_SYNC		(1ULL << 9)
#define DMA_BUF_MAP_FLAGS	(DMA_BUF_MAP_FIXED | DMA_BUF_MAP_NEEDS_SYNC)

#ifndef DMA_BUF_BASE
#define DMA_BUF_BASE		'b'
#endif
/* Same number as DMA_BUF_IOCTL_EXPORT_SYNC_FILE but a 16-byte argument, so a different command value. */
#define DMA_BUF_IOCTL_INFO	_IOWR(DMA_BUF_BASE, 2, struct dma_buf_info)

#endif /* VGPU_SPEC_DMA_BUF_INFO_H */
