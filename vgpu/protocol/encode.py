"""Typed command → bytes, the inverse of ``decode``, generated with it (``derive``).

The device never sends requests; this exists for the driver side: the project's front end, tests, benchmarks
and fuzzers build guest traffic with it, so they exercise the same layouts the decoder reads.
"""

from __future__ import annotations

import struct

from . import commands as c
from .derive import DERIVED


def encode_command(cmd: c.Command) -> bytes:
    """Serialise a request exactly as a guest driver would; the header is written as given (tests may
    deliberately send a header type that disagrees with the class)."""
    try:
        return DERIVED[type(cmd)].encode(cmd)
    except struct.error as e:
        raise ValueError(f"cannot encode {cmd!r}: {e}") from e
