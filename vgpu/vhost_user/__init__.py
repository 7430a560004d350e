"""A pure-Python vhost-user back end and front end (with the vhost-user-gpu display protocol).

Self-contained: it imports nothing else from vgpu, so it can be lifted out and reused by other Python device back
ends.  `backend` serves a `device.Device` to a VMM; `frontend` plays the VMM (and the guest) for tests, benchmarks
and conformance checks.
"""
