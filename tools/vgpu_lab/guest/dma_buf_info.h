/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * DMA_BUF_IOCTL_INFO: ask a dma-buf's exporter how user space mappings of the buffer are cached.
 *
 * The proposed UAPI as vgpu uses it (posted upstream in 2022, never merged): a stock kernel answers ENOTTY,
 * an exporter without the hook ENOSYS, an unknown param EINVAL.  vgpu's construct layout of struct
 * dma_buf_info is checked against this header's DWARF by tools/layoutcheck.py.
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

/* How a CPU mapping (mmap of the dma-buf fd) is cached: one of DMA_BUF_VM_PROT_*. */
#define DMA_BUF_INFO_VM_PROT	1
#define DMA_BUF_VM_PROT_WC	0
#define DMA_BUF_VM_PROT_CACHED	1

#ifndef DMA_BUF_BASE
#define DMA_BUF_BASE		'b'
#endif
/* Same number as DMA_BUF_IOCTL_EXPORT_SYNC_FILE but a 16-byte argument, so a different command value. */
#define DMA_BUF_IOCTL_INFO	_IOWR(DMA_BUF_BASE, 2, struct dma_buf_info)

#endif /* VGPU_SPEC_DMA_BUF_INFO_H */
