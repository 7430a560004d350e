"""The two places the lab works with, both given explicitly rather than derived from where this package lives.

- The **checkout** (``$VGPU_ROOT``): the tree whose ``vgpu`` package a guest runs from the host root over 9p.
- The **cache** (``$VGPU_LAB_CACHE``, default ``<checkout>/.cache/lab``): downloads and builds, hundreds of MB.

The entry points set them: ``tools/test`` and ``tools/demo`` export both, the test suite's ``conftest.py`` and the
benchmarks set the checkout they belong to; a command line may pass ``--cache``.  A lab run with neither says so
instead of writing into whatever directory the code happens to sit in.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "VGPU_ROOT"
ENV_CACHE = "VGPU_LAB_CACHE"


class LabPathError(RuntimeError):
    """Neither the checkout nor the cache was named."""


def project_root() -> Path:
    """The checkout the lab serves (``$VGPU_ROOT``)."""
    env = os.environ.get(ENV_ROOT)
    if not env:
        raise LabPathError(f"the lab needs the checkout it serves: set ${ENV_ROOT} (tools/test and tools/demo do)")
    return Path(env).resolve()


def cache_dir() -> Path:
    """``$VGPU_LAB_CACHE``, or ``<checkout>/.cache/lab``: big downloads stay with the project, not in /tmp."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).resolve()
    try:
        return project_root() / ".cache" / "lab"
    except LabPathError as exc:
        raise LabPathError(f"no lab cache: set ${ENV_CACHE}, pass --cache, or set ${ENV_ROOT}") from exc


def use_checkout(root: Path) -> None:
    """Name ``root`` as the checkout for this process and its children, unless the environment already names one."""
    os.environ.setdefault(ENV_ROOT, str(root.resolve()))
