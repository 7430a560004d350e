"""The one exception the protocol layer raises for bad guest input."""

from __future__ import annotations

from .constants import CtrlType
from .records import CtrlHdr


class CommandError(Exception):
    """A request the device must answer with an error response instead of executing.

    It carries the RESP_ERR_* code so the conversion to a response happens in exactly one place (the device's
    command boundary), and the request header when it could be decoded so that error response still echoes
    the fence, context and ring of the request.
    """

    def __init__(self, response_type: CtrlType, message: str, hdr: CtrlHdr | None = None) -> None:
        if not response_type.is_error:
            raise ValueError(f"{response_type!r} is not a RESP_ERR_* code")
        super().__init__(message)
        self.response_type = response_type
        self.message = message
        self.hdr = hdr

    def __repr__(self) -> str:
        return f"CommandError({self.response_type.name}, {self.message!r})"
