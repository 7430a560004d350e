"""Host buffers for blobs: allocators, dma-buf fds, and the cache attribute a guest mapping must use.

This layer knows buffers and the kernel; it knows nothing of virtqueues or virtio-gpu commands.
"""
