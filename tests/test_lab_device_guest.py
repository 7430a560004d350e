"""The readers of the in-guest device rounds (:mod:`vgpu_lab.device_guest`), without a guest: the page-table dump
decoder that gives the ground truth, and the pattern of the back end's map line the rounds report."""

from __future__ import annotations

from vgpu_lab.device_guest import MAP_LOG, pte_of


def test_pte_decoding() -> None:
    """The guest's ground-truth reader: PWT alone is WC, no bits is WB, bit 7 counts as PAT only at pte level."""
    dump = "\n".join([
        "---[ User Space ]---",
        "0x00007f0000000000-0x00007f0000200000           2M     USR RW         PSE PAT         NX pmd",
        "0x00007f1000000000-0x00007f1000040000         256K     USR RW PWT                     NX pte",
        "0x00007f2000000000-0x00007f2000040000         256K     USR RW                         NX pte",
        "0x00007f3000000000-0x00007f3000001000           4K     USR RW     PCD     PAT         NX pte",
    ])
    assert pte_of(dump, 0x7F1000001000) == ("WC", "PWT")
    assert pte_of(dump, 0x7F2000000000) == ("WB", "none")
    assert pte_of(dump, 0x7F0000100000) == ("WB", "none")  # a pmd's bit 7 is PSE, not PAT
    assert pte_of(dump, 0x7F3000000000) == ("UC-", "PCD,PAT")
    assert pte_of(dump, 0x7F2000040000) is None


def test_map_log_pattern() -> None:
    """The back end's map line as vgpu/gpu/blobs.py writes it, with a provenance that has a space in it."""
    line = ("2026-11-22 04:31:00,211 vgpu.gpu.blobs INFO map blob 12 at 0x200000 +0x40000: map_info WC "
            "(operator rule: rule exporters.drm = wc in /etc/vgpu/cache.toml; kernel: DMA_BUF_IOCTL_INFO: ENOTTY)")
    m = MAP_LOG.search(line)
    assert m is not None
    assert m.groups() == ("12", "0x200000", "0x40000", "WC", "operator rule",
                          "rule exporters.drm = wc in /etc/vgpu/cache.toml; kernel: DMA_BUF_IOCTL_INFO: ENOTTY")
    assert MAP_LOG.search(line.replace("operator rule", "a guess")) is None
