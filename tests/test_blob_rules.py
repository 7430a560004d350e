"""Operator rules files: what parses, and that every mistake is refused with the file and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpu.blob.rules import Rule, RulesError, load_rules, parse_rules
from vgpu.blob.types import CacheAttr


def test_parse_full_file() -> None:
    rules = parse_rules(
        '# comment\n[exporters]\nudmabuf = "cached"\n"odd-name" = "Uncached"\n[drm_drivers]\nvgem = "wc"\n', "f.toml"
    )
    assert rules.exporters == {
        "udmabuf": Rule("exporters", "udmabuf", CacheAttr.CACHED, "f.toml"),
        "odd-name": Rule("exporters", "odd-name", CacheAttr.UNCACHED, "f.toml"),
    }
    assert rules.drm_drivers["vgem"].attr is CacheAttr.WC and len(rules) == 3
    assert rules.drm_drivers["vgem"].describe() == "rule drm_drivers.vgem = wc in f.toml"


def test_empty_file_has_no_rules() -> None:
    rules = parse_rules("", "empty.toml")
    assert len(rules) == 0 and rules.match("drm", "vgem") is None


def test_match_order() -> None:
    rules = parse_rules('[exporters]\ndrm = "wc"\n[drm_drivers]\ni915 = "cached"\n')
    assert rules.match("drm", "i915") is rules.drm_drivers["i915"]
    assert rules.match("drm", "vgem") is rules.exporters["drm"]
    assert rules.match(None, None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[exporters\n", "not valid TOML"),
        ('[exporter]\ndrm = "wc"\n', "unknown key(s) exporter"),
        ('cache = "wc"\n', "unknown key(s) cache"),
        ('exporters = "wc"\n', "[exporters] must be a table"),
        ("[exporters]\ndrm = 3\n", "exporters.drm must be a string"),
        ('[exporters]\ndrm = ["wc"]\n', "exporters.drm must be a string"),
        ('[drm_drivers]\nvgem = "write-combined"\n', "drm_drivers.vgem = 'write-combined' is not one of"),
        ('[exporters]\n"" = "wc"\n', "empty name"),
        ('[exporters.drm]\nx = "wc"\n', "exporters.drm must be a string"),
    ],
)
def test_rules_errors_name_file_and_key(text: str, message: str) -> None:
    with pytest.raises(RulesError) as exc:
        parse_rules(text, "/etc/vgpu/cache.toml")
    assert str(exc.value).startswith("/etc/vgpu/cache.toml: ") and message in str(exc.value)


def test_load_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(binary)


def test_allocator_override_outranks_the_allocator_but_not_the_kernel() -> None:
    from vgpu.blob.allocators import MemfdAllocator
    from vgpu.blob.dmabuf import KernelAnswer, decode_map_attr
    from vgpu.blob.resolve import Resolver
    from vgpu.blob.types import CacheAttr, Provenance

    rules = parse_rules('[allocator_overrides]\nmemfd = "wc"\n', "test.toml")
    with MemfdAllocator() as alloc:
        buf = alloc.allocate(4096)
        try:
            r = Resolver(rules=rules).resolve(buf)
            assert (r.attr, r.provenance) == (CacheAttr.WC, Provenance.OPERATOR)
            assert "allocator_overrides.memfd = wc" in r.detail and "overriding the allocator's CACHED" in r.detail

            def fake_kernel_says_cached(fd: int) -> KernelAnswer:
                return decode_map_attr((3 << 56) | 0x100 | 1)  # revision 3: CACHED, fixed

            buf.resolution = None
            k = Resolver(rules=rules, kernel_query=fake_kernel_says_cached).resolve(buf)
            assert (k.attr, k.provenance) == (CacheAttr.CACHED, Provenance.KERNEL)
        finally:
            buf.close()
