"""The arm64 guest: Debian's arm64 6.12 kernel under QEMU 11.1's ``qemu-system-aarch64`` (TCG, ``-M virt -cpu max``),
our back end on this x86 host serving it through the generic vhost-user device, and the memory type the guest's
kernel used for each user mapping of a host blob, read from the guest's own page table.

Why arm64 at all: there the cache attribute matters most.  KVM on arm64 combines the guest's stage-1 attributes
with its own stage 2, and an arm64 guest turns each map_info into a different kind of memory than an x86 guest
does (UNCACHED becomes Device memory).  Nothing short of the guest's page table shows what it did.

- :mod:`.packages`: the arm64 ``.deb`` files (kernel, its headers, busybox) through an apt state of our own in
  the cache — the host's dpkg never learns of a foreign architecture — plus the amd64 ``linux-kbuild`` whose
  host tools build modules against those headers;
- :mod:`.build`: the cross-built guest program (``blob_map``) and ``vgpu_pte.ko``, the module that walks the
  calling process's page table and decodes AttrIndx through MAIR_EL1 (stock Debian kernel, no rebuild);
- :mod:`.lab`: provisioning all of it, idempotently;
- :mod:`.boot`: one boot with several of our back ends, one per GPU on the guest's PCI bus.
"""
