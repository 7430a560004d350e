/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The vhost-user memory region description once VHOST_USER_PROTOCOL_F_XEN_MMAP (17) is negotiated, written out
 * in C from QEMU's docs/interop/vhost-user.rst ("Memory region description"): the 32-byte region every front end
 * sends, then two 32-bit fields.  No kernel or QEMU release has this struct in a header, so vgpu's construct
 * layout (vgpu/vhost_user/wire.py: XenMemoryRegion) is checked against this one by tools/layoutcheck.py.
 */
#ifndef VGPU_SPEC_VHOST_USER_XEN_REGION_H
#define VGPU_SPEC_VHOST_USER_XEN_REGION_H

#include <linux/types.h>
#include <linux/vhost_types.h>

/* Bit 0: Xen foreign memory; bit 1: Xen grant memory; bit 8: the region cannot be mapped in advance. */
#define VHOST_USER_XEN_MMAP_FLAG_FOREIGN	(1U << 0)
#define VHOST_USER_XEN_MMAP_FLAG_GRANT		(1U << 1)
#define VHOST_USER_XEN_MMAP_FLAG_MAP_ON_DEMAND	(1U << 8)

struct vhost_user_memory_region_xen {
	/* guest address, size, user address, mmap offset (the kernel's flags_padding) */
	struct vhost_memory_region region;
	__u32 xen_mmap_flags;
	__u32 domid;
};

#endif
