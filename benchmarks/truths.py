"""What a row's truth can be, and how an answer is judged against it, for every column of the cache matrix.

Why a module: the x86 column (:mod:`benchmarks.cache_matrix`) and the arm64 column (:mod:`benchmarks.arm64_column`)
judge the same rows, and a truth is not always one attribute. A buffer a TTM driver moves has one per placement
(``WC|CACHED``): an answer is judged in every placement and the worst verdict counts, except that an answer that is
right in one placement and only slow in the other is right (it is the placement-safe answer: nothing better exists).
A buffer whose CPU access needs cache maintenance (``SYNC``) has no right attribute at all: a guest cannot issue
DMA_BUF_IOCTL_SYNC, so only refusing is correct; a cacheable answer is dangerous, any other one is wrong (other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: The truth of a buffer that needs DMA_BUF_IOCTL_SYNC: its CPU mapping is write-back, its device does not snoop.
SYNC = "SYNC"
#: What such a buffer's placement is mapped as (for the host side of a column).
SYNC_PLACEMENT = "CACHED"
#: What its device sees: memory it does not snoop, as if nothing cached it. A cacheable guest mapping against that
#: is the dangerous alias (guest cache lines the device never sees); a non-cacheable one is still not coherent with
#: the host's write-back alias without the maintenance, so it is wrong too (other).
SYNC_DEVICE_VIEW = "WC"


def placements(truth: str) -> list[str]:
    """The attributes a truth stands for: ``WC|CACHED`` → [WC, CACHED]; SYNC → its write-back placement."""
    return [SYNC_PLACEMENT] if truth == SYNC else truth.split("|")


def combine(verdicts: Iterable[str]) -> str:
    """One verdict from the verdicts of every placement (see the module's docstring)."""
    seen = set(verdicts)
    for worst in ("refused", "dangerous", "other"):
        if worst in seen:
            return worst
    return "right" if "right" in seen else "slow"


def judge(truth: str, answer: object, one: Callable[[object, str], str]) -> str:
    """The verdict of ``answer`` for ``truth``, ``one`` judging a single placement (e.g. ``verdict(answer, "WC")``)."""
    if truth == SYNC:
        seen = one(answer, SYNC_DEVICE_VIEW)
        return seen if seen in ("refused", "dangerous") else "other"
    return combine(one(answer, p) for p in placements(truth))
