"""Displays of our own: where scanouts go when the VMM does not show them (QEMU 11.1's generic device carries no
display socket; crosvm leaves the display to its GPU back end).

`sink` is the interface the GPU device's output talks to; `wayland` presents scanouts as windows on the host's
Wayland compositor. Nothing here knows of virtio-gpu, resources or guest memory: a sink is handed pixels, sizes and
dma-bufs, and the device decides what they are.
"""
