"""``python -m vgpu`` and the ``vhost-user-vgpu`` command: the back end."""

import os
import sys


def one_blas_thread() -> None:
    """Before numpy is imported: the back end does no linear algebra, and OpenBLAS's thread pool would cost every
    start about 0.1 s of CPU (its threads spin up) and a thread per core for nothing. An operator's own setting is
    kept."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")


one_blas_thread()

from .cli import main  # noqa: E402 - after the thread settings above


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
