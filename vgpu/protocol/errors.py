"""The one exception the protocol layer raises for bad guest input."""

from __future__ import annotations

from .constants import CtrlType


class CommandError(Exception):
    """A request the device must answer with an error response instead of executing.

    It carries the RESP_ERR_* code and a message, nothing else: the conversion to a response happens in exactly
    one place (the device's command boundary), which holds the request's header and echoes its fence, context
    and ring, so no layer below has to carry the header around just to fail.
    """

    def __init__(self, response_type: CtrlType, message: str) -> None:
        if not response_type.is_error:
            raise ValueError(f"{response_type!r} is not a RESP_ERR_* code")
        super().__init__(message)
        self.response_type = response_type
        self.message = message

    def __repr__(self) -> str:
        return f"CommandError({self.response_type.name}, {self.message!r})"
