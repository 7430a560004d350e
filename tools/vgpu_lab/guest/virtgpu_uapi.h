/*
 * The virtio-gpu DRM driver's user ABI (blob, context-init and execbuffer ioctls), written out here because
 * Debian 12's libdrm and linux-libc-dev headers predate blob resources.  Sizes are pinned below.
 */
#ifndef VGPU_LAB_VIRTGPU_UAPI_H
#define VGPU_LAB_VIRTGPU_UAPI_H

#include <stdint.h>
#include <sys/ioctl.h>

#define DRM_COMMAND_BASE 0x40
#define VIRTGPU_IOWR(nr, type) _IOWR('d', DRM_COMMAND_BASE + (nr), type)

#define VIRTGPU_PARAM_3D_FEATURES 1
#define VIRTGPU_PARAM_RESOURCE_BLOB 3
#define VIRTGPU_PARAM_HOST_VISIBLE 4
#define VIRTGPU_PARAM_CONTEXT_INIT 6
#define VIRTGPU_PARAM_SUPPORTED_CAPSET_IDS 7

struct drm_virtgpu_getparam {
    uint64_t param;
    uint64_t value; /* user pointer to an int */
};

struct drm_virtgpu_map {
    uint64_t offset; /* out: fake offset for mmap */
    uint32_t handle;
    uint32_t pad;
};

#define VIRTGPU_EXECBUF_RING_IDX 0x04
struct drm_virtgpu_execbuffer {
    uint32_t flags;
    uint32_t size;
    uint64_t command;
    uint64_t bo_handles;
    uint32_t num_bo_handles;
    int32_t fence_fd;
    uint32_t ring_idx;
    uint32_t syncobj_stride;
    uint32_t num_in_syncobjs;
    uint32_t num_out_syncobjs;
    uint64_t in_syncobjs;
    uint64_t out_syncobjs;
};

struct drm_virtgpu_3d_wait {
    uint32_t handle;
    uint32_t flags;
};

#define VIRTGPU_BLOB_MEM_GUEST 0x0001
#define VIRTGPU_BLOB_MEM_HOST3D 0x0002
#define VIRTGPU_BLOB_FLAG_USE_MAPPABLE 0x0001
#define VIRTGPU_BLOB_FLAG_USE_SHAREABLE 0x0002
struct drm_virtgpu_resource_create_blob {
    uint32_t blob_mem;
    uint32_t blob_flags;
    uint32_t bo_handle;  /* out */
    uint32_t res_handle; /* out */
    uint64_t size;
    uint32_t pad;
    uint32_t cmd_size;
    uint64_t cmd;
    uint64_t blob_id;
};

#define VIRTGPU_CONTEXT_PARAM_CAPSET_ID 0x0001
#define VIRTGPU_CONTEXT_PARAM_NUM_RINGS 0x0002
struct drm_virtgpu_context_set_param {
    uint64_t param;
    uint64_t value;
};
struct drm_virtgpu_context_init {
    uint32_t num_params;
    uint32_t pad;
    uint64_t ctx_set_params;
};

struct drm_gem_close {
    uint32_t handle;
    uint32_t pad;
};

_Static_assert(sizeof(struct drm_virtgpu_getparam) == 16, "getparam");
_Static_assert(sizeof(struct drm_virtgpu_map) == 16, "map");
_Static_assert(sizeof(struct drm_virtgpu_execbuffer) == 64, "execbuffer");
_Static_assert(sizeof(struct drm_virtgpu_resource_create_blob) == 48, "create_blob");
_Static_assert(sizeof(struct drm_virtgpu_context_init) == 16, "context_init");

#define DRM_IOCTL_GEM_CLOSE _IOW('d', 0x09, struct drm_gem_close)
#define DRM_IOCTL_VIRTGPU_MAP VIRTGPU_IOWR(0x01, struct drm_virtgpu_map)
#define DRM_IOCTL_VIRTGPU_EXECBUFFER VIRTGPU_IOWR(0x02, struct drm_virtgpu_execbuffer)
#define DRM_IOCTL_VIRTGPU_GETPARAM VIRTGPU_IOWR(0x03, struct drm_virtgpu_getparam)
#define DRM_IOCTL_VIRTGPU_WAIT VIRTGPU_IOWR(0x08, struct drm_virtgpu_3d_wait)
#define DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB VIRTGPU_IOWR(0x0a, struct drm_virtgpu_resource_create_blob)
#define DRM_IOCTL_VIRTGPU_CONTEXT_INIT VIRTGPU_IOWR(0x0b, struct drm_virtgpu_context_init)

/* Cross-domain (capset 5) commands, as minigbm sends them. */
#define CROSS_DOMAIN_CAPSET 5
#define CROSS_DOMAIN_CMD_INIT 1
#define CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS 2
struct cross_domain_header {
    uint8_t cmd;
    uint8_t ring_idx;
    uint16_t cmd_size;
    uint32_t pad;
};
struct cross_domain_init_v1 {
    struct cross_domain_header hdr;
    uint32_t query_ring_id;
    uint32_t channel_ring_id;
    uint32_t channel_type;
};
struct cross_domain_get_image_requirements {
    struct cross_domain_header hdr;
    uint32_t width;
    uint32_t height;
    uint32_t drm_format;
    uint32_t flags;
};
struct cross_domain_image_requirements {
    uint32_t strides[4];
    uint32_t offsets[4];
    uint64_t modifier;
    uint64_t size;
    uint32_t blob_id;
    uint32_t map_info;
    int32_t memory_idx;
    int32_t physical_device_idx;
};
_Static_assert(sizeof(struct cross_domain_init_v1) == 20, "init v1");
_Static_assert(sizeof(struct cross_domain_get_image_requirements) == 24, "get image requirements");
_Static_assert(sizeof(struct cross_domain_image_requirements) == 64, "image requirements");

#endif
