"""vgpu as installed, but asking a fake kernel whose answer changes at every question.

Why a fake: no kernel on this host answers DMA_BUF_IOCTL_INFO (and the real moving exporter lives in the patched
guest: tests/test_e2e_changing_placement.py). This program proves a property of the device alone — it asks at every
MAP_BLOB and never reuses an earlier answer — so the kernel is played: each question gets the next answer of
``--answers`` (revision-3 values, cycled), and each is logged as ``fake kernel answer N: CODE``.

``python -m tests.fake_kernel_vgpu --answers=WC+fixed,CACHED+fixed -- VGPU-OPTIONS...``
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys

import vgpu.cli
from vgpu.blob import uapi
from vgpu.blob.dmabuf import KernelAnswer, decode_map_attr
from vgpu.blob.resolve import Resolver

ATTRS = {"CACHED": uapi.DMA_BUF_MAP_CACHED, "UNCACHED": uapi.DMA_BUF_MAP_UNCACHED, "WC": uapi.DMA_BUF_MAP_WC}
FLAGS = {"fixed": uapi.DMA_BUF_MAP_FIXED, "sync": uapi.DMA_BUF_MAP_NEEDS_SYNC}


def value_of(code: str) -> int:
    """``WC+fixed`` as the revision-3 value a kernel would write."""
    attr, *flags = code.split("+")
    value = uapi.DMA_BUF_MAP_REVISION << uapi.DMA_BUF_MAP_REVISION_SHIFT | ATTRS[attr]
    for flag in flags:
        value |= FLAGS[flag]
    return value


def main(argv: list[str]) -> int:
    if not argv or not argv[0].startswith("--answers=") or argv[1:2] != ["--"]:
        sys.exit(__doc__)
    answers = itertools.cycle([decode_map_attr(value_of(c)) for c in argv[0].split("=", 1)[1].split(",")])
    counter = itertools.count(1)
    log = logging.getLogger("vgpu.fake_kernel")

    def kernel(fd: int) -> KernelAnswer:
        answer = next(answers)
        log.info("fake kernel answer %d: %s", next(counter), answer.code)
        return answer

    # The CLI builds its resolver from the name it imported: give it one that asks the played kernel.
    vgpu.cli.Resolver = functools.partial(Resolver, kernel_query=kernel)  # type: ignore[attr-defined,assignment]
    return vgpu.cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
