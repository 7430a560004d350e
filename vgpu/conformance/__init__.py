"""Spec conformance for vhost-user virtio-gpu back ends: a requirement catalogue (`spec/requirements.toml`), checks
that test each requirement through our front end, and a runner that puts any back end — ours or QEMU's C
`vhost-user-gpu` — through them, so that claims of conformance are measured the same way for every peer."""
