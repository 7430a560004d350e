/*
 * kms_pattern: the smallest complete KMS client, run inside the lab guest to make the virtio-gpu driver send
 * every 2D command a scanout needs (resource create, attach backing, set scanout, transfer, flush) and the
 * cursor queue its update/move commands — so a back end can be checked on exactly what a real driver does.
 *
 * Steps: open /dev/dri/card0, find the connected connector and its preferred mode, create a 32 bpp dumb buffer
 * of that size, draw the frame pattern, ADDFB, SETCRTC, DIRTYFB over the whole frame, then a 64x64 cursor from a
 * second dumb buffer (CURSOR with CURSOR_BO), moved to (CURSOR_X, CURSOR_Y). Each step prints one line
 *   VGPU-GUEST <step> ok <details>
 * on stdout; the first failure prints "VGPU-GUEST <step> fail errno=<n> <strerror>" and exits 1.
 *
 * The pixel formulas are mirrored exactly by vgpu/lab/patterns.py (keep both in step). Pixels are 32-bit words
 * stored little endian (XRGB8888 / ARGB8888):
 *   frame  (x, y): 0xFF000000 | (x & 0xFF) << 16 | (y & 0xFF) << 8 | ((x >> 8) & 0xF) << 4 | ((y >> 8) & 0xF)
 *                  -- every pixel of a frame up to 4096x4096 is distinct, so any offset/stride error shows.
 *   cursor (x, y): 0xFF000000 | (4 * x) << 16 | (4 * y) << 8 | ((4 * (x ^ y)) & 0xFF)   for 0 <= x, y < 64
 *
 * Usage: kms_pattern [hold_ms]   (how long to keep the picture up before cleaning up; default 500)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "drm_uapi.h"

#define CURSOR_SIZE 64
#define CURSOR_X 100
#define CURSOR_Y 80
#define MAX_OBJECTS 32
#define MAX_MODES 64

static uint32_t frame_pixel(uint32_t x, uint32_t y)
{
    return 0xFF000000u | (x & 0xFFu) << 16 | (y & 0xFFu) << 8 | ((x >> 8) & 0xFu) << 4 | ((y >> 8) & 0xFu);
}

static uint32_t cursor_pixel(uint32_t x, uint32_t y)
{
    return 0xFF000000u | (4u * x) << 16 | (4u * y) << 8 | ((4u * (x ^ y)) & 0xFFu);
}

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

/* ioctl that retries on EINTR/EAGAIN, as libdrm's drmIoctl does. */
static int xioctl(int fd, unsigned long request, void *arg)
{
    int ret;
    do {
        ret = ioctl(fd, request, arg);
    } while (ret == -1 && (errno == EINTR || errno == EAGAIN));
    return ret;
}

struct dumb {
    uint32_t handle;
    uint32_t pitch;
    uint64_t size;
    uint32_t *map;
};

static int dumb_create(int fd, uint32_t width, uint32_t height, struct dumb *out)
{
    struct drm_mode_create_dumb create = {.height = height, .width = width, .bpp = 32};
    if (xioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, &create) != 0)
        return -1;
    out->handle = create.handle;
    out->pitch = create.pitch;
    out->size = create.size;
    struct drm_mode_map_dumb map = {.handle = create.handle};
    if (xioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, &map) != 0)
        return -1;
    void *ptr = mmap(NULL, (size_t)create.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)map.offset);
    if (ptr == MAP_FAILED)
        return -1;
    out->map = ptr;
    return 0;
}

static void dumb_destroy(int fd, struct dumb *d)
{
    if (d->map != NULL)
        munmap(d->map, (size_t)d->size);
    if (d->handle != 0) {
        struct drm_mode_destroy_dumb destroy = {.handle = d->handle};
        xioctl(fd, DRM_IOCTL_MODE_DESTROY_DUMB, &destroy);
    }
    d->map = NULL;
    d->handle = 0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

int main(int argc, char **argv)
{
    long hold_ms = argc > 1 ? strtol(argv[1], NULL, 10) : 500;
    setvbuf(stdout, NULL, _IOLBF, 0);

    int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail("open");
    char name[64] = {0};
    struct drm_version version = {.name_len = sizeof(name) - 1, .name = name};
    if (xioctl(fd, DRM_IOCTL_VERSION, &version) != 0)
        return fail("open");
    printf("VGPU-GUEST open ok driver=%s\n", name);

    uint32_t crtcs[MAX_OBJECTS], connectors[MAX_OBJECTS], encoders[MAX_OBJECTS];
    struct drm_mode_card_res res = {0};
    if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res) != 0)
        return fail("resources");
    if (res.count_crtcs > MAX_OBJECTS || res.count_connectors > MAX_OBJECTS || res.count_encoders > MAX_OBJECTS)
        return fail_msg("resources", "too many objects");
    res.count_fbs = 0;
    res.fb_id_ptr = 0;
    res.crtc_id_ptr = (uintptr_t)crtcs;
    res.connector_id_ptr = (uintptr_t)connectors;
    res.encoder_id_ptr = (uintptr_t)encoders;
    if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res) != 0)
        return fail("resources");
    printf("VGPU-GUEST resources ok crtcs=%u connectors=%u encoders=%u\n", res.count_crtcs,
           res.count_connectors, res.count_encoders);

    /* The first connected connector; the first GETCONNECTOR with count_modes=0 makes the driver probe. */
    struct drm_mode_modeinfo modes[MAX_MODES];
    uint32_t conn_encoders[MAX_OBJECTS];
    struct drm_mode_get_connector conn = {0};
    struct drm_mode_modeinfo mode;
    int found = 0;
    for (uint32_t i = 0; i < res.count_connectors && !found; i++) {
        memset(&conn, 0, sizeof(conn));
        conn.connector_id = connectors[i];
        if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &conn) != 0)
            return fail("connector");
        if (conn.connection != DRM_MODE_CONNECTED || conn.count_modes == 0)
            continue;
        if (conn.count_modes > MAX_MODES)
            conn.count_modes = MAX_MODES;
        if (conn.count_encoders > MAX_OBJECTS)
            conn.count_encoders = MAX_OBJECTS;
        conn.modes_ptr = (uintptr_t)modes;
        conn.encoders_ptr = (uintptr_t)conn_encoders;
        conn.count_props = 0;
        conn.props_ptr = 0;
        conn.prop_values_ptr = 0;
        if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &conn) != 0)
            return fail("connector");
        uint32_t pick = 0;
        for (uint32_t m = 0; m < conn.count_modes && m < MAX_MODES; m++) {
            if (modes[m].type & DRM_MODE_TYPE_PREFERRED) {
                pick = m;
                break;
            }
            if (modes[m].hdisplay == 1280 && modes[m].vdisplay == 800)
                pick = m;
        }
        mode = modes[pick];
        found = 1;
    }
    if (!found)
        return fail_msg("connector", "no connected connector with modes");
    uint32_t width = mode.hdisplay, height = mode.vdisplay;
    printf("VGPU-GUEST connector ok id=%u modes=%u mode=%ux%u@%u\n", conn.connector_id, conn.count_modes, width,
           height, mode.vrefresh);

    /* The CRTC: the one the current encoder drives, else the first the connector's encoder can drive. */
    uint32_t crtc_id = 0;
    uint32_t encoder_id = conn.encoder_id != 0 ? conn.encoder_id : (conn.count_encoders ? conn_encoders[0] : 0);
    if (encoder_id != 0) {
        struct drm_mode_get_encoder enc = {.encoder_id = encoder_id};
        if (xioctl(fd, DRM_IOCTL_MODE_GETENCODER, &enc) != 0)
            return fail("crtc");
        crtc_id = enc.crtc_id;
        for (uint32_t c = 0; crtc_id == 0 && c < res.count_crtcs; c++)
            if (enc.possible_crtcs & (1u << c))
                crtc_id = crtcs[c];
    }
    if (crtc_id == 0)
        return fail_msg("crtc", "no usable crtc");
    printf("VGPU-GUEST crtc ok id=%u encoder=%u\n", crtc_id, encoder_id);

    struct dumb frame = {0}, cursor = {0};
    if (dumb_create(fd, width, height, &frame) != 0)
        return fail("dumb");
    for (uint32_t y = 0; y < height; y++) {
        uint32_t *row = (uint32_t *)((char *)frame.map + (size_t)y * frame.pitch);
        for (uint32_t x = 0; x < width; x++)
            row[x] = frame_pixel(x, y);
    }
    printf("VGPU-GUEST dumb ok handle=%u pitch=%u size=%llu\n", frame.handle, frame.pitch,
           (unsigned long long)frame.size);

    struct drm_mode_fb_cmd fb = {
        .width = width, .height = height, .pitch = frame.pitch, .bpp = 32, .depth = 24, .handle = frame.handle};
    if (xioctl(fd, DRM_IOCTL_MODE_ADDFB, &fb) != 0)
        return fail("addfb");
    printf("VGPU-GUEST addfb ok fb=%u\n", fb.fb_id);

    uint32_t conn_id = conn.connector_id;
    struct drm_mode_crtc set = {
        .set_connectors_ptr = (uintptr_t)&conn_id,
        .count_connectors = 1,
        .crtc_id = crtc_id,
        .fb_id = fb.fb_id,
        .mode_valid = 1,
        .mode = mode,
    };
    if (xioctl(fd, DRM_IOCTL_MODE_SETCRTC, &set) != 0)
        return fail("modeset");
    printf("VGPU-GUEST modeset ok %ux%u\n", width, height);

    struct drm_clip_rect clip = {.x1 = 0, .y1 = 0, .x2 = (unsigned short)width, .y2 = (unsigned short)height};
    struct drm_mode_fb_dirty_cmd dirty = {.fb_id = fb.fb_id, .num_clips = 1, .clips_ptr = (uintptr_t)&clip};
    if (xioctl(fd, DRM_IOCTL_MODE_DIRTYFB, &dirty) != 0)
        return fail("dirtyfb");
    printf("VGPU-GUEST dirtyfb ok 0,0-%ux%u\n", width, height);

    if (dumb_create(fd, CURSOR_SIZE, CURSOR_SIZE, &cursor) != 0)
        return fail("cursor");
    for (uint32_t y = 0; y < CURSOR_SIZE; y++) {
        uint32_t *row = (uint32_t *)((char *)cursor.map + (size_t)y * cursor.pitch);
        for (uint32_t x = 0; x < CURSOR_SIZE; x++)
            row[x] = cursor_pixel(x, y);
    }
    struct drm_mode_cursor cur = {
        .flags = DRM_MODE_CURSOR_BO, .crtc_id = crtc_id, .width = CURSOR_SIZE, .height = CURSOR_SIZE,
        .handle = cursor.handle};
    if (xioctl(fd, DRM_IOCTL_MODE_CURSOR, &cur) != 0)
        return fail("cursor");
    printf("VGPU-GUEST cursor ok %ux%u\n", CURSOR_SIZE, CURSOR_SIZE);

    struct drm_mode_cursor move = {.flags = DRM_MODE_CURSOR_MOVE, .crtc_id = crtc_id, .x = CURSOR_X, .y = CURSOR_Y};
    if (xioctl(fd, DRM_IOCTL_MODE_CURSOR, &move) != 0)
        return fail("cursor-move");
    printf("VGPU-GUEST cursor-move ok %d,%d\n", CURSOR_X, CURSOR_Y);

    sleep_ms(hold_ms);

    /* Clean up in reverse; a failure here is reported too, since a back end must survive teardown. */
    struct drm_mode_cursor hide = {.flags = DRM_MODE_CURSOR_BO, .crtc_id = crtc_id};
    if (xioctl(fd, DRM_IOCTL_MODE_CURSOR, &hide) != 0)
        return fail("cleanup");
    uint32_t fb_id = fb.fb_id;
    if (xioctl(fd, DRM_IOCTL_MODE_RMFB, &fb_id) != 0)
        return fail("cleanup");
    dumb_destroy(fd, &cursor);
    dumb_destroy(fd, &frame);
    close(fd);
    printf("VGPU-GUEST done ok\n");
    return 0;
}
