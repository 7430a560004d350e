/*
 * dmabuf_info: ask real exporters DMA_BUF_IOCTL_INFO(DMA_BUF_INFO_MAP_ATTR), and read the truth from the page tables.
 *
 * For each buffer -- a udmabuf over a sealed memfd, a system dma-heap buffer, a vgem dumb buffer exported with
 * PRIME, a virtio-gpu dumb buffer exported with PRIME, a plain memfd (not a dma-buf) and, where vgem has our
 * patch's test exporters (/sys/module/vgem/parameters/test_exporter), a "moving" and an "incoherent" vgem test
 * buffer -- it prints one line:
 *
 *   VGPU-GUEST dmabuf name=<buffer> fd=<n> exp_name=<exporter|-> info=<answer> v1=<answer> param99=<answer>
 *       pad1=<answer> pte=<WB|WC|UC-|UC|WP|WT|-> pte_bits=<PWT,PCD,PAT|none|-> addr=<0x...> mmap=<ok|errno>
 *
 * where an answer is the attribute with its flags as vgpu's Python layer writes them (WC+fixed, CACHED for an
 * attribute that may change, CACHED+fixed+sync), value=<0x...> (a value revision 3 does not define, or one without
 * its tag) or the errno name (ENOTTY, ENOSYS, EINVAL, ...). info asks DMA_BUF_INFO_MAP_ATTR as specified; v1 asks
 * param 1, the param of the earlier revisions, which ours must refuse; param99 asks an unknown param; pad1 asks
 * DMA_BUF_INFO_MAP_ATTR with a non-zero pad. exp_name comes from /proc/self/fdinfo/<fd> (a dma-buf has one).
 *
 * Then the moving buffer is moved twice (writing /sys/module/vgem/parameters/test_move); after each move every page
 * is written again (faulting in the new PTEs) and one line says what the kernel answers now and what the PTE is:
 *
 *   VGPU-GUEST dmabuf-move step=<1|2> info=<answer> pte=<type> pte_bits=<bits> same=<yes|no>
 *
 * (same: the bytes written before the moves are still there).
 *
 * Ground truth: every buffer is mmap()ed MAP_SHARED and each page written, then the program finds its own mapping
 * in /sys/kernel/debug/page_tables/current_kernel (PTDUMP_DEBUGFS; without page-table isolation the kernel's pgd
 * of the current process maps its user space too) and decodes the PTE's PWT/PCD/PAT bits through the PAT table
 * Linux programs on x86 (index = PAT<<2 | PCD<<1 | PWT: WB, WC, UC-, UC, WB, WP, UC-, WT). pte=- means no
 * mapping (mmap refused) or no page-table dump (a kernel without PTDUMP_DEBUGFS, e.g. Debian's).
 *
 * A buffer that cannot be made prints "VGPU-GUEST dmabuf name=<buffer> fail step=<step> errno=<name>".
 * The last line is "VGPU-GUEST dmabuf-done ok made=<n> failed=<n>".
 *
 * Usage: dmabuf_info [--exec PROGRAM ARGS...]
 *   --exec runs PROGRAM (execvp) after the report with the buffers' fds still open (inherited, not close-on-exec)
 *   and VGPU_DMABUF_FDS=<name>=<fd>,... in its environment: the Python layer then asks about the same buffers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/dma-heap.h>
#include <linux/udmabuf.h>

#include "dma-buf-info.h" /* spec/: the proposed UAPI, the one copy */
#include "drm_uapi.h"

/* drm/drm.h: PRIME export of a GEM handle (absent from this host's linux-libc-dev, like the rest of drm_uapi.h). */
struct drm_prime_handle {
    __u32 handle;
    __u32 flags;
    __s32 fd;
};
_Static_assert(sizeof(struct drm_prime_handle) == 12, "drm_prime_handle");
#define DRM_IOCTL_PRIME_HANDLE_TO_FD DRM_IOWR(0x2d, struct drm_prime_handle)
#define DRM_RDWR O_RDWR

_Static_assert(sizeof(struct dma_buf_info) == 16, "dma_buf_info");
_Static_assert(DMA_BUF_IOCTL_INFO == 0xc0106202u, "DMA_BUF_IOCTL_INFO");

#define BUF_SIZE (64 * 1024)
#define DUMB_WIDTH 64
#define DUMB_HEIGHT 64
#define PTDUMP "/sys/kernel/debug/page_tables/current_kernel"
#define MAX_BUFFERS 10

struct buffer {
    const char *name;
    int fd;
    void *map;
    int map_errno;
    size_t size;
};

static struct buffer buffers[MAX_BUFFERS];
static int n_buffers;
static int n_failed;

static const char *errno_name(int err)
{
    static char other[32];
    switch (err) {
    case ENOTTY: return "ENOTTY";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    case EIO: return "EIO";
    case ENODEV: return "ENODEV";
    case ENOENT: return "ENOENT";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EBADF: return "EBADF";
    case ENOMEM: return "ENOMEM";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default:
        snprintf(other, sizeof(other), "errno%d", err);
        return other;
    }
}

static void failed(const char *name, const char *step)
{
    printf("VGPU-GUEST dmabuf name=%s fail step=%s errno=%s\n", name, step, errno_name(errno));
    fflush(stdout);
    n_failed++;
}

/* One DMA_BUF_IOCTL_INFO call, its outcome written into out as CACHED, WC, value=<n> or an errno name. */
static void ask(int fd, __u32 param, __u32 pad, char *out, size_t len)
{
    static const char *const attrs[4] = {NULL, "CACHED", "UNCACHED", "WC"};
    struct dma_buf_info info = {.param = param, .pad = pad, .value = 0xdeadbeefu};
    if (ioctl(fd, DMA_BUF_IOCTL_INFO, &info) < 0) {
        snprintf(out, len, "%s", errno_name(errno));
        return;
    }
    uint64_t v = info.value, attr = v & DMA_BUF_MAP_ATTR_MASK;
    uint64_t defined = (0xffULL << DMA_BUF_MAP_REVISION_SHIFT) | DMA_BUF_MAP_ATTR_MASK | DMA_BUF_MAP_FLAGS;
    if (param == DMA_BUF_INFO_MAP_ATTR && v >> DMA_BUF_MAP_REVISION_SHIFT == DMA_BUF_MAP_REVISION &&
        !(v & ~defined) && attr >= 1 && attr <= 3) {
        snprintf(out, len, "%s%s%s", attrs[attr], (v & DMA_BUF_MAP_FIXED) ? "+fixed" : "",
                 (v & DMA_BUF_MAP_NEEDS_SYNC) ? "+sync" : "");
    } else {
        snprintf(out, len, "value=%#" PRIx64, v);
    }
}

static void exp_name(int fd, char *out, size_t len)
{
    char path[64], line[256];
    snprintf(out, len, "-");
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "exp_name:", 9) == 0) {
            char *v = line + 9;
            v += strspn(v, " \t");
            v[strcspn(v, "\n")] = 0;
            snprintf(out, len, "%s", *v ? v : "-");
            break;
        }
    }
    fclose(f);
}

static void add(const char *name, int fd, size_t size)
{
    buffers[n_buffers].name = name;
    buffers[n_buffers].fd = fd;
    buffers[n_buffers].size = size;
    buffers[n_buffers].map = MAP_FAILED;
    n_buffers++;
}

static void make_memfd(void)
{
    int fd = memfd_create("vgpu-memfd", MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, BUF_SIZE) < 0)
        return failed("memfd", "memfd_create");
    add("memfd", fd, BUF_SIZE);
}

static void make_udmabuf(void)
{
    int memfd = memfd_create("vgpu-udmabuf", MFD_ALLOW_SEALING);
    if (memfd < 0 || ftruncate(memfd, BUF_SIZE) < 0)
        return failed("udmabuf", "memfd_create");
    if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) < 0)
        return failed("udmabuf", "seal");
    int dev = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return failed("udmabuf", "open");
    struct udmabuf_create create = {.memfd = (__u32)memfd, .flags = 0, .offset = 0, .size = BUF_SIZE};
    int fd = ioctl(dev, UDMABUF_CREATE, &create);
    close(dev);
    close(memfd);
    if (fd < 0)
        return failed("udmabuf", "UDMABUF_CREATE");
    add("udmabuf", fd, BUF_SIZE);
}

static void make_heap(void)
{
    int heap = open("/dev/dma_heap/system", O_RDONLY | O_CLOEXEC);
    if (heap < 0)
        return failed("system-heap", "open");
    struct dma_heap_allocation_data alloc = {.len = BUF_SIZE, .fd_flags = O_RDWR};
    int rc = ioctl(heap, DMA_HEAP_IOCTL_ALLOC, &alloc);
    close(heap);
    if (rc < 0)
        return failed("system-heap", "DMA_HEAP_IOCTL_ALLOC");
    add("system-heap", (int)alloc.fd, BUF_SIZE);
}

/* The /dev/dri/cardN whose DRM driver is called `driver`, or -1. */
static int open_drm(const char *driver)
{
    for (int i = 0; i < 8; i++) {
        char path[32], name[64] = {0};
        snprintf(path, sizeof(path), "/dev/dri/card%d", i);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct drm_version v = {.name_len = sizeof(name) - 1, .name = name};
        if (ioctl(fd, DRM_IOCTL_VERSION, &v) == 0 && strcmp(name, driver) == 0)
            return fd;
        close(fd);
    }
    errno = ENODEV;
    return -1;
}

static void make_prime(const char *name, const char *driver)
{
    int card = open_drm(driver);
    if (card < 0)
        return failed(name, "open");
    struct drm_mode_create_dumb dumb = {.width = DUMB_WIDTH, .height = DUMB_HEIGHT, .bpp = 32};
    if (ioctl(card, DRM_IOCTL_MODE_CREATE_DUMB, &dumb) < 0) {
        failed(name, "CREATE_DUMB");
        close(card);
        return;
    }
    struct drm_prime_handle prime = {.handle = dumb.handle, .flags = DRM_RDWR, .fd = -1};
    int rc = ioctl(card, DRM_IOCTL_PRIME_HANDLE_TO_FD, &prime);
    /* The dma-buf holds its own reference to the GEM object: the card can go (the handle with it). */
    int err = errno;
    close(card);
    errno = err;
    if (rc < 0)
        return failed(name, "PRIME_HANDLE_TO_FD");
    add(name, prime.fd, (size_t)dumb.size);
}

/* Map the buffer and write every page, so each PTE exists when the page tables are dumped. */
static void map_and_touch(struct buffer *b)
{
    b->map = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_SHARED, b->fd, 0);
    if (b->map == MAP_FAILED) {
        b->map_errno = errno;
        return;
    }
    long page = sysconf(_SC_PAGESIZE);
    for (size_t off = 0; off < b->size; off += (size_t)page)
        ((volatile unsigned char *)b->map)[off] = (unsigned char)(off / (size_t)page);
}

static char *read_all(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf)
            break;
        if (len == cap) {
            char *bigger = realloc(buf, 2 * cap + 1);
            if (!bigger) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            buf[len] = 0;
            break;
        }
        len += (size_t)n;
    }
    close(fd);
    return buf;
}

/*
 * The PTE of the page at `addr` from a ptdump text: lines "0x<start>-0x<end>  <size> <flags> <level>", where flags
 * name the set bits (USR RW PWT PCD PSE PAT GLB NX). Writes the memory type and the caching bits found.
 */
static int pte_type(const char *dump, uintptr_t addr, char *type, size_t tlen, char *bits, size_t blen)
{
    static const char *const pat_table[8] = {"WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT"};
    const char *line = dump;
    while (line && *line) {
        const char *end = strchr(line, '\n');
        size_t n = end ? (size_t)(end - line) : strlen(line);
        unsigned long long start, stop;
        if (n < 512 && sscanf(line, "0x%llx-0x%llx", &start, &stop) == 2 && addr >= start && addr < stop) {
            char copy[512];
            memcpy(copy, line, n);
            copy[n] = 0;
            int pwt = strstr(copy, " PWT ") != NULL, pcd = strstr(copy, " PCD ") != NULL;
            int pat = strstr(copy, " PAT ") != NULL;
            if (!strstr(copy, " pte")) /* only 4K entries carry PAT in bit 7; ours are 4K */
                pat = 0;
            snprintf(type, tlen, "%s", pat_table[(pat << 2) | (pcd << 1) | pwt]);
            snprintf(bits, blen, "%s%s%s%s", pwt ? "PWT," : "", pcd ? "PCD," : "", pat ? "PAT," : "",
                     (pwt | pcd | pat) ? "" : "none");
            size_t bl = strlen(bits);
            if (bl && bits[bl - 1] == ',')
                bits[bl - 1] = 0;
            return 0;
        }
        line = end ? end + 1 : NULL;
    }
    return -1;
}

#define VGEM_PARAMS "/sys/module/vgem/parameters/"

/* Write a vgem module parameter (our patch's test exporters); 0 or -1 with errno. */
static int vgem_param(const char *param, const char *value)
{
    char path[128];
    snprintf(path, sizeof(path), VGEM_PARAMS "%s", param);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, value, strlen(value));
    int err = errno;
    close(fd);
    errno = err;
    return n < 0 ? -1 : 0;
}

/* A vgem test exporter's buffer: select the kind, make the dumb buffer and export it, select "off" again. */
static void make_test(const char *name, const char *kind)
{
    if (vgem_param("test_exporter", kind) < 0)
        return failed(name, "test_exporter");
    make_prime(name, "vgem");
    if (vgem_param("test_exporter", "off") < 0)
        failed(name, "test_exporter-off");
}

static struct buffer *find(const char *name)
{
    for (int i = 0; i < n_buffers; i++)
        if (strcmp(buffers[i].name, name) == 0)
            return &buffers[i];
    return NULL;
}

/* Move the moving test buffer twice; after each move, fault every page in again and report answer and PTE. */
static void moves(void)
{
    struct buffer *b = find("vgem-moving");
    if (!b || b->map == MAP_FAILED)
        return;
    long page = sysconf(_SC_PAGESIZE);
    volatile unsigned char *m = b->map;
    for (int step = 1; step <= 2; step++) {
        if (vgem_param("test_move", "1") < 0) {
            printf("VGPU-GUEST dmabuf-move step=%d fail errno=%s\n", step, errno_name(errno));
            return;
        }
        int same = 1;
        for (size_t off = 0; off < b->size; off += (size_t)page) {
            same &= m[off] == (unsigned char)(off / (size_t)page); /* the read faults the page in */
            m[off] = (unsigned char)(off / (size_t)page);
        }
        char info[32], type[8] = "-", bits[32] = "-";
        ask(b->fd, DMA_BUF_INFO_MAP_ATTR, 0, info, sizeof(info));
        char *dump = read_all(PTDUMP);
        if (dump)
            pte_type(dump, (uintptr_t)b->map, type, sizeof(type), bits, sizeof(bits));
        free(dump);
        printf("VGPU-GUEST dmabuf-move step=%d info=%s pte=%s pte_bits=%s same=%s\n", step, info, type, bits,
               same ? "yes" : "no");
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    make_udmabuf();
    make_heap();
    make_prime("vgem", "vgem");
    make_prime("virtio-gpu", "virtio_gpu");
    make_memfd();
    if (access(VGEM_PARAMS "test_exporter", W_OK) == 0) {
        make_test("vgem-moving", "moving");
        make_test("vgem-incoherent", "incoherent");
    }

    for (int i = 0; i < n_buffers; i++)
        map_and_touch(&buffers[i]);
    char *dump = read_all(PTDUMP);
    if (!dump)
        printf("VGPU-GUEST ptdump missing errno=%s\n", errno_name(errno));

    char env[512] = "";
    for (int i = 0; i < n_buffers; i++) {
        struct buffer *b = &buffers[i];
        char name[64], info[32], v1[32], param99[32], pad1[32], type[8] = "-", bits[32] = "-";
        exp_name(b->fd, name, sizeof(name));
        ask(b->fd, DMA_BUF_INFO_MAP_ATTR, 0, info, sizeof(info));
        ask(b->fd, 1, 0, v1, sizeof(v1));
        ask(b->fd, 99, 0, param99, sizeof(param99));
        ask(b->fd, DMA_BUF_INFO_MAP_ATTR, 1, pad1, sizeof(pad1));
        if (b->map != MAP_FAILED && dump)
            pte_type(dump, (uintptr_t)b->map, type, sizeof(type), bits, sizeof(bits));
        printf("VGPU-GUEST dmabuf name=%s fd=%d exp_name=%s info=%s v1=%s param99=%s pad1=%s pte=%s pte_bits=%s "
               "addr=%p mmap=%s\n",
               b->name, b->fd, name, info, v1, param99, pad1, type, bits, b->map == MAP_FAILED ? NULL : b->map,
               b->map == MAP_FAILED ? errno_name(b->map_errno) : "ok");
        size_t used = strlen(env);
        snprintf(env + used, sizeof(env) - used, "%s%s=%d", used ? "," : "", b->name, b->fd);
    }
    free(dump);
    moves();
    printf("VGPU-GUEST dmabuf-done ok made=%d failed=%d\n", n_buffers, n_failed);

    if (argc > 2 && strcmp(argv[1], "--exec") == 0) {
        setenv("VGPU_DMABUF_FDS", env, 1);
        fflush(stdout);
        execvp(argv[2], &argv[2]);
        printf("VGPU-GUEST exec fail errno=%s %s\n", errno_name(errno), argv[2]);
        return 1;
    }
    return n_failed ? 1 : 0;
}
