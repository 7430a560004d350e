"""vgpu: a virtio-gpu vhost-user back end whose blobs carry the cache attribute their exporter reports."""

__version__ = "0.1.0"
