"""The end-to-end lab: a real QEMU booting a real Linux guest against a vhost-user GPU back end.

Nothing here is assumed to be installed by hand. :mod:`vgpu_lab.provision` installs QEMU 10 from
bookworm-backports, busybox-static and a C toolchain through apt and fetches the 6.12 guest kernel into a
project-owned cache; :mod:`vgpu_lab.guest` builds the static guest test programs; :mod:`vgpu_lab.initramfs`
packs them with the kernel modules into an initramfs; :mod:`vgpu_lab.qemu` boots it against any back end and
returns the serial log; :mod:`vgpu_lab.patterns` reproduces in numpy the pixels the guest programs draw, so a
test can compare what a back end received pixel for pixel.
"""
