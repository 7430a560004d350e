/*
 * blob_map: a cross-domain client, as minigbm is one, that maps a host buffer into its own address space through
 * the host-visible window — the path whose cache attribute vgpu exists to get right.
 *
 * Steps (each prints "VGPU-GUEST <step> ok <details>", the first failure "VGPU-GUEST <step> fail ..." and exit 1):
 *   params    the driver offers blobs, host-visible memory, context init and capset 5 (cross-domain)
 *   context   CONTEXT_INIT with capset 5 and one ring
 *   ring      a 4 KiB GUEST blob as the query ring, mapped
 *   init      cross-domain INIT naming the ring
 *   reqs      GET_IMAGE_REQUIREMENTS for WIDTHxHEIGHT XRGB8888 (waits for the ring) -> stride, size, blob_id,
 *             map_info as the host reported it
 *   blob      RESOURCE_CREATE_BLOB(HOST3D, MAPPABLE|SHAREABLE, blob_id) -- the driver maps it at once
 *   mmap      DRM_IOCTL_VIRTGPU_MAP + mmap of the whole blob
 *   pat       (x86) the PAT entries covering this mapping, from /sys/kernel/debug/x86/pat_memtype_list (the
 *             cache type the guest kernel really used), printed as "pat <start>-<end> <type>"; every entry
 *             when the mapping's physical address is unknown (pagemap does not walk PFN mappings)
 *   pte       (arm64) the page-table entry of the mapping's first page and the memory type its AttrIndx selects
 *             in MAIR_EL1, from the lab's vgpu_pte module (/sys/kernel/debug/vgpu_pte):
 *             "pte ok va=... level=3 entry=... attrindx=N mair=0xNN type=Normal-NC"
 *   write     the guest pattern written into the first half: word i = GUEST_MAGIC ^ (i * 2654435761)
 *   host      waits (up to HOST_WAIT_S) for the host to write HOST_MAGIC ^ (i * 40503) into the second half
 *   unaligned a plain memcpy of 64 bytes to offset 1 of the mapping, in a child process: "signal=0" when it
 *             worked, "signal=7" when the CPU raised an alignment fault (SIGBUS), as arm64 does for Device memory
 *   done      unmapped and closed
 *
 * Usage: blob_map [width height [host_wait_s [device]]]   (defaults 256 256 20 /dev/dri/card0; host_wait_s 0
 * skips the host step)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "virtgpu_uapi.h"

#define GUEST_MAGIC 0x56475055u /* "VGPU" */
#define HOST_MAGIC 0x484f5354u  /* "HOST" */
#define XRGB8888 0x34325258u

static int fail(const char *step)
{
    int err = errno;
    printf("VGPU-GUEST %s fail errno=%d %s\n", step, err, strerror(err));
    fflush(stdout);
    return 1;
}

static int fail_msg(const char *step, const char *msg)
{
    printf("VGPU-GUEST %s fail %s\n", step, msg);
    fflush(stdout);
    return 1;
}

static void ok(const char *step, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ok(const char *step, const char *fmt, ...)
{
    va_list ap;
    printf("VGPU-GUEST %s ok ", step);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static int getparam(int fd, uint64_t param, int *value)
{
    struct drm_virtgpu_getparam gp = {.param = param, .value = (uint64_t)(uintptr_t)value};
    return ioctl(fd, DRM_IOCTL_VIRTGPU_GETPARAM, &gp);
}

static int submit(int fd, const void *cmd, uint32_t size, uint32_t ring_bo)
{
    struct drm_virtgpu_execbuffer eb;
    memset(&eb, 0, sizeof(eb));
    eb.flags = VIRTGPU_EXECBUF_RING_IDX;
    eb.size = size;
    eb.command = (uint64_t)(uintptr_t)cmd;
    eb.bo_handles = (uint64_t)(uintptr_t)&ring_bo;
    eb.num_bo_handles = 1;
    eb.fence_fd = -1;
    eb.ring_idx = 0;
    if (ioctl(fd, DRM_IOCTL_VIRTGPU_EXECBUFFER, &eb))
        return -1;
    struct drm_virtgpu_3d_wait w = {.handle = ring_bo, .flags = 0};
    return ioctl(fd, DRM_IOCTL_VIRTGPU_WAIT, &w);
}

static void *map_bo(int fd, uint32_t handle, size_t size)
{
    struct drm_virtgpu_map m = {.handle = handle};
    if (ioctl(fd, DRM_IOCTL_VIRTGPU_MAP, &m))
        return MAP_FAILED;
    return mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)m.offset);
}

/* Physical address of a page of our own mapping (needs root: /proc/self/pagemap shows PFNs only to root). */
static uint64_t phys_of(const void *addr)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    uint64_t entry = 0;
    off_t off = (off_t)((uintptr_t)addr / 4096) * 8;
    ssize_t n = pread(fd, &entry, sizeof(entry), off);
    close(fd);
    if (n != (ssize_t)sizeof(entry) || !(entry & (1ull << 63)))
        return 0;
    return (entry & ((1ull << 55) - 1)) * 4096;
}

/* Print every PAT entry that covers [start, end). */
static int print_pat(uint64_t start, uint64_t end)
{
    FILE *f = fopen("/sys/kernel/debug/x86/pat_memtype_list", "r");
    if (!f)
        return -1;
    char line[256];
    int found = 0;
    while (fgets(line, sizeof(line), f)) {
        uint64_t a, b;
        char type[64];
        if (sscanf(line, "PAT: [mem 0x%" SCNx64 "-0x%" SCNx64 "] %63s", &a, &b, type) != 3)
            continue;
        if (a < end && start < b) {
            printf("VGPU-GUEST pat 0x%" PRIx64 "-0x%" PRIx64 " %s\n", a, b, type);
            found++;
        }
    }
    fclose(f);
    fflush(stdout);
    return found;
}

/* The memory type the kernel used for the page at addr, as the vgpu_pte module reads it from our page table. */
static int print_pte(const volatile void *addr)
{
    int fd = open("/sys/kernel/debug/vgpu_pte", O_RDWR);
    if (fd < 0)
        return fail("pte");
    char line[256];
    int n = snprintf(line, sizeof(line), "%" PRIxPTR, (uintptr_t)addr);
    if (write(fd, line, (size_t)n) != n || lseek(fd, 0, SEEK_SET) != 0)
        return fail("pte");
    ssize_t got = read(fd, line, sizeof(line) - 1);
    close(fd);
    if (got <= 0)
        return fail("pte");
    line[got] = 0;
    line[strcspn(line, "\n")] = 0;
    if (strstr(line, "error="))
        return fail_msg("pte", line);
    ok("pte", "%s", line);
    return 0;
}

/* What a client's ordinary copy does to this memory: memcpy to an odd address, in a child so a SIGBUS is seen,
   not suffered. */
static void probe_unaligned(volatile uint32_t *buf)
{
    pid_t child = fork();
    if (child == 0) {
        char src[64];
        for (size_t i = 0; i < sizeof(src); i++)
            src[i] = (char)i;
        memcpy((char *)buf + 1, src, sizeof(src));
        _exit(0);
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) != child) {
        fail("unaligned");
        return;
    }
    ok("unaligned", "signal=%d", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

int main(int argc, char **argv)
{
    uint32_t width = argc > 2 ? (uint32_t)atoi(argv[1]) : 256;
    uint32_t height = argc > 2 ? (uint32_t)atoi(argv[2]) : 256;
    int host_wait_s = argc > 3 ? atoi(argv[3]) : 20;
    const char *device = argc > 4 ? argv[4] : "/dev/dri/card0";

    int fd = open(device, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail("open");

    int blob = 0, host_visible = 0, ctx_init = 0, capsets = 0;
    if (getparam(fd, VIRTGPU_PARAM_RESOURCE_BLOB, &blob) || getparam(fd, VIRTGPU_PARAM_HOST_VISIBLE, &host_visible)
        || getparam(fd, VIRTGPU_PARAM_CONTEXT_INIT, &ctx_init)
        || getparam(fd, VIRTGPU_PARAM_SUPPORTED_CAPSET_IDS, &capsets))
        return fail("params");
    if (!blob || !host_visible || !ctx_init || !(capsets & (1 << CROSS_DOMAIN_CAPSET))) {
        printf("VGPU-GUEST params fail blob=%d host_visible=%d context_init=%d capsets=%#x\n", blob, host_visible,
               ctx_init, capsets);
        return 1;
    }
    ok("params", "blob=%d host_visible=%d context_init=%d capsets=%#x", blob, host_visible, ctx_init, capsets);

    struct drm_virtgpu_context_set_param params[2] = {
        {.param = VIRTGPU_CONTEXT_PARAM_CAPSET_ID, .value = CROSS_DOMAIN_CAPSET},
        {.param = VIRTGPU_CONTEXT_PARAM_NUM_RINGS, .value = 1},
    };
    struct drm_virtgpu_context_init ci = {.num_params = 2, .ctx_set_params = (uint64_t)(uintptr_t)params};
    if (ioctl(fd, DRM_IOCTL_VIRTGPU_CONTEXT_INIT, &ci))
        return fail("context");
    ok("context", "capset=%d", CROSS_DOMAIN_CAPSET);

    struct drm_virtgpu_resource_create_blob ring = {
        .blob_mem = VIRTGPU_BLOB_MEM_GUEST, .blob_flags = VIRTGPU_BLOB_FLAG_USE_MAPPABLE, .size = 4096};
    if (ioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB, &ring))
        return fail("ring");
    volatile uint32_t *ring_map = map_bo(fd, ring.bo_handle, 4096);
    if (ring_map == MAP_FAILED)
        return fail("ring");
    ok("ring", "res=%u", ring.res_handle);

    struct cross_domain_init_v1 init = {
        .hdr = {.cmd = CROSS_DOMAIN_CMD_INIT, .cmd_size = sizeof(init)}, .query_ring_id = ring.res_handle};
    if (submit(fd, &init, sizeof(init), ring.bo_handle))
        return fail("init");
    ok("init", "query_ring=%u", ring.res_handle);

    struct cross_domain_get_image_requirements gir = {
        .hdr = {.cmd = CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS, .cmd_size = sizeof(gir)},
        .width = width, .height = height, .drm_format = XRGB8888, .flags = 0x11 /* LINEAR | SCANOUT */};
    if (submit(fd, &gir, sizeof(gir), ring.bo_handle))
        return fail("reqs");
    struct cross_domain_image_requirements reqs;
    memcpy(&reqs, (const void *)ring_map, sizeof(reqs));
    if (!reqs.blob_id || !reqs.size)
        return fail_msg("reqs", "host wrote no requirements");
    ok("reqs", "stride=%u size=%" PRIu64 " blob_id=%u map_info=%u", reqs.strides[0], reqs.size, reqs.blob_id,
       reqs.map_info);

    struct drm_virtgpu_resource_create_blob hb = {
        .blob_mem = VIRTGPU_BLOB_MEM_HOST3D,
        .blob_flags = VIRTGPU_BLOB_FLAG_USE_MAPPABLE | VIRTGPU_BLOB_FLAG_USE_SHAREABLE,
        .size = reqs.size, .blob_id = reqs.blob_id};
    if (ioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB, &hb))
        return fail("blob");
    ok("blob", "res=%u", hb.res_handle);

    size_t size = (size_t)reqs.size;
    volatile uint32_t *buf = map_bo(fd, hb.bo_handle, size);
    if (buf == MAP_FAILED)
        return fail("mmap");
    buf[0] = buf[0]; /* fault the first page in so the page tables (and PAT) hold it */
    uint64_t phys = phys_of((const void *)buf);
    ok("mmap", "size=%zu phys=0x%" PRIx64, size, phys);
#if defined(__aarch64__)
    (void)print_pat;
    if (print_pte(buf))
        return 1;
#else
    (void)print_pte;
    /* pagemap skips VM_PFNMAP mappings (phys 0): then list every entry and let the host pick ours out, from the
       window base in dmesg and the offset the device mapped the blob at. */
    int n = phys ? print_pat(phys, phys + size) : print_pat(0, UINT64_MAX);
    if (n < 0)
        return fail_msg("pat", "no /sys/kernel/debug/x86/pat_memtype_list");
    ok("pat", "entries=%d", n);
#endif

    size_t words = size / 4, half = words / 2;
    for (size_t i = 0; i < half; i++)
        buf[i] = GUEST_MAGIC ^ (uint32_t)(i * 2654435761u);
    ok("write", "words=%zu", half);

    if (host_wait_s > 0) {
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (buf[words - 1] == (HOST_MAGIC ^ (uint32_t)((words - 1 - half) * 40503u))) {
                size_t bad = 0;
                for (size_t i = half; i < words; i++)
                    bad += buf[i] != (HOST_MAGIC ^ (uint32_t)((i - half) * 40503u));
                if (bad) {
                    printf("VGPU-GUEST host fail %zu of %zu words differ\n", bad, words - half);
                    return 1;
                }
                ok("host", "words=%zu", words - half);
                break;
            }
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - t0.tv_sec > host_wait_s)
                return fail_msg("host", "timed out waiting for the host pattern");
            usleep(20000);
        }
    }

    probe_unaligned(buf);

    munmap((void *)buf, size);
    munmap((void *)ring_map, 4096);
    struct drm_gem_close c1 = {.handle = hb.bo_handle}, c2 = {.handle = ring.bo_handle};
    if (ioctl(fd, DRM_IOCTL_GEM_CLOSE, &c1) || ioctl(fd, DRM_IOCTL_GEM_CLOSE, &c2))
        return fail("done");
    close(fd);
    ok("done", "%s", "closed");
    return 0;
}
