"""The virtio-gpu device: commands in, responses out, state kept per front-end connection."""
