"""Data-driven checks: request bytes (after optional set-up commands) and the response types a conforming back
end may answer with.  Each case runs on a fresh connection and ends by confirming the device still serves."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..protocol import (
    BlobMem,
    CtrlFlag,
    CtrlHdr,
    CtrlType,
    CtxAttachResource,
    CtxDestroy,
    Format,
    GetDisplayInfo,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    SubmitCmd,
    TransferToHost2D,
    encode_command,
)
from ..protocol import structs as s
from ..session import DISPLAY_INFO_SIZE, PAGE, Session, hdr
from .context import CheckContext
from .errors import CheckFailed
from .registry import check

E = CtrlType
ERRORS: Final = tuple(t for t in CtrlType if t.is_error)
BAD_ID: Final = (E.RESP_ERR_INVALID_RESOURCE_ID,)
BAD_PARAM: Final = (E.RESP_ERR_INVALID_PARAMETER,)
BAD_CTX: Final = (E.RESP_ERR_INVALID_CONTEXT_ID,)
SHORT: Final = (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_UNSPEC)
XRGB = Format.FORMAT_B8G8R8X8_UNORM
FAR_AWAY: Final = 1 << 40  # a guest address no memory region covers

Step = bytes | Callable[[Session], bytes]


@dataclass(frozen=True)
class Case:
    name: str
    requirement: str
    request: Step
    expect: tuple[int, ...]
    setup: tuple[Step, ...] = ()
    resp_size: int = 24
    echo: bool = False  # the response header must echo fence, ctx_id and ring_idx


def _bytes(step: Step, sess: Session) -> bytes:
    return step if isinstance(step, bytes) else step(sess)


def create(rid: int, w: int = 64, h: int = 64, fmt: int = XRGB) -> bytes:
    return encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), rid, fmt, w, h))


def attach(rid: int, size: int = 64 * 64 * 4) -> Callable[[Session], bytes]:
    def build(sess: Session) -> bytes:
        return encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), rid,
                                                    sess.backing(size).entries))
    return build


def _attach_far(sess: Session) -> bytes:
    return encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 1,
                                                MemEntries.of([(FAR_AWAY, PAGE)])))


def _attach_overlong(sess: Session) -> bytes:
    # nr_entries says 1000, the request carries one entry.
    gpa = sess.backing(PAGE).gpa
    return struct.pack("<IIQIB3xII", E.CMD_RESOURCE_ATTACH_BACKING, 0, 0, 0, 0, 1, 1000) + struct.pack(
        "<QII", gpa, PAGE, 0)


def _guest_blob_short(sess: Session) -> bytes:
    gpa = sess.backing(PAGE).gpa
    return encode_command(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), 5, BlobMem.BLOB_MEM_GUEST, 0, 0,
                                             2 * PAGE, MemEntries.of([(gpa, PAGE)])))


def blob(rid: int, blob_mem: int) -> bytes:
    return encode_command(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), rid, blob_mem, 0, 0, PAGE,
                                             MemEntries.of([])))


def transfer(rid: int, r: Rect, offset: int = 0) -> bytes:
    return encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), r, offset, rid))


FENCE = int(CtrlFlag.FLAG_FENCE)
RING = int(CtrlFlag.FLAG_INFO_RING_IDX)

CASES: Final = (
    Case("short-create-2d", "GPU-HDR-SHORT",
         struct.pack("<IIQIB3x", E.CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0), SHORT),
    Case("tiny-request", "GPU-HDR-SHORT", b"\x01\x01", SHORT),
    Case("fenced-display-info", "GPU-FENCE-ECHO",
         encode_command(GetDisplayInfo(CtrlHdr(E.CMD_GET_DISPLAY_INFO, FENCE, 0xFEED_0000_0001))),
         (E.RESP_OK_DISPLAY_INFO,), resp_size=DISPLAY_INFO_SIZE, echo=True),
    Case("fenced-error", "GPU-FENCE-ECHO",
         encode_command(ResourceUnref(CtrlHdr(E.CMD_RESOURCE_UNREF, FENCE, 0xFEED_0000_0002), 77)), ERRORS,
         echo=True),
    Case("ctx-echo", "GPU-HDR-ECHO-CTX",
         encode_command(GetDisplayInfo(CtrlHdr(E.CMD_GET_DISPLAY_INFO, 0, 0, 7))), (E.RESP_OK_DISPLAY_INFO,),
         resp_size=DISPLAY_INFO_SIZE, echo=True),
    Case("ring-idx-64", "GPU-RING-IDX-RANGE",
         encode_command(GetDisplayInfo(CtrlHdr(E.CMD_GET_DISPLAY_INFO, FENCE | RING, 1, 0, 64))), BAD_PARAM,
         resp_size=DISPLAY_INFO_SIZE),
    Case("create-2d-id-0", "GPU-2D-CREATE-ID0", create(0), BAD_ID),
    Case("create-2d-duplicate", "GPU-2D-CREATE-DUP", create(1), BAD_ID, setup=(create(1),)),
    Case("create-2d-format-999", "GPU-2D-CREATE-FORMAT", create(1, fmt=999), BAD_PARAM),
    Case("create-2d-width-0", "GPU-2D-CREATE-SIZE", create(1, 0, 64),
         (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_OUT_OF_MEMORY)),
    Case("create-2d-height-0", "GPU-2D-CREATE-SIZE", create(1, 64, 0),
         (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_OUT_OF_MEMORY)),
    Case("create-2d-64k-square", "GPU-2D-CREATE-SIZE", create(1, 65536, 65536),
         (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_OUT_OF_MEMORY)),
    Case("unref-unknown", "GPU-2D-UNREF",
         encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 77)), BAD_ID),
    Case("attach-unknown", "GPU-2D-ATTACH-UNKNOWN", attach(77), BAD_ID),
    Case("attach-outside-memory", "GPU-2D-ATTACH-OUTSIDE", _attach_far, ERRORS, setup=(create(1),)),
    Case("attach-entries-past-request", "GPU-2D-ATTACH-OUTSIDE", _attach_overlong, ERRORS, setup=(create(1),)),
    Case("attach-twice", "GPU-2D-ATTACH-TWICE", attach(1), ERRORS, setup=(create(1), attach(1))),
    Case("detach-unknown", "GPU-2D-DETACH",
         encode_command(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 77)), BAD_ID),
    Case("transfer-past-right-edge", "GPU-2D-TRANSFER-RECT", transfer(1, Rect(32, 0, 64, 64)), BAD_PARAM,
         setup=(create(1), attach(1))),
    Case("transfer-u32-overflow", "GPU-2D-TRANSFER-RECT", transfer(1, Rect(0xFFFFFFF0, 0, 0x20, 1)), BAD_PARAM,
         setup=(create(1), attach(1))),
    Case("scanout-unknown-resource", "GPU-SCANOUT-UNKNOWN-RES",
         encode_command(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 64, 64), 0, 77)), BAD_ID),
    Case("scanout-rect-beyond-resource", "GPU-SCANOUT-RECT",
         encode_command(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 128, 64), 0, 1)), BAD_PARAM,
         setup=(create(1), attach(1))),
    Case("flush-unknown", "GPU-FLUSH",
         encode_command(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 1, 1), 77)), BAD_ID),
    Case("blob-mem-0", "GPU-BLOB-MEM-INVALID", blob(5, 0), BAD_PARAM),
    Case("blob-mem-4", "GPU-BLOB-MEM-INVALID", blob(5, 4), BAD_PARAM),
    Case("guest-blob-entries-short", "GPU-BLOB-GUEST-SHORT", _guest_blob_short, BAD_PARAM),
    Case("ctx-destroy-unknown", "GPU-CTX-UNKNOWN", encode_command(CtxDestroy(hdr(E.CMD_CTX_DESTROY, ctx_id=99))),
         BAD_CTX),
    Case("submit-unknown-ctx", "GPU-CTX-UNKNOWN", encode_command(SubmitCmd(hdr(E.CMD_SUBMIT_3D, ctx_id=99), b"")),
         BAD_CTX),
    Case("ctx-attach-unknown-ctx", "GPU-CTX-UNKNOWN",
         encode_command(CtxAttachResource(hdr(E.CMD_CTX_ATTACH_RESOURCE, ctx_id=99), 1)), BAD_CTX,
         setup=(create(1),)),
)


def _check_echo(req: bytes, resp: bytes) -> None:
    q = s.ctrl_hdr.parse(req[:24])
    a = s.ctrl_hdr.parse(resp[:24])
    if q.flags & FENCE and (not a.flags & FENCE or a.fence_id != q.fence_id):
        raise CheckFailed(f"fenced request (fence_id {q.fence_id:#x}) answered with flags {a.flags:#x} "
                          f"fence_id {a.fence_id:#x}", resp[:24])
    if a.ctx_id != q.ctx_id:
        raise CheckFailed(f"ctx_id {q.ctx_id} answered with ctx_id {a.ctx_id}", resp[:24])
    if q.flags & RING and (not a.flags & RING or a.ring_idx != q.ring_idx):
        raise CheckFailed(f"ring_idx {q.ring_idx} answered with flags {a.flags:#x} ring_idx {a.ring_idx}",
                          resp[:24])


def _runner(case: Case) -> Callable[[CheckContext], str | None]:
    def run(ctx: CheckContext) -> str | None:
        sess = ctx.session()
        for i, step in enumerate(case.setup):
            sess.ok(_bytes(step, sess), f"set-up step {i + 1}")
        req = _bytes(case.request, sess)
        resp = sess.expect(req, case.expect, case.name, case.resp_size)
        if case.echo:
            _check_echo(req, resp)
        sess.serving(f"after {case.name}")
        return None

    run.__doc__ = f"Data-driven: {case.name}."
    return run


for _case in CASES:
    check(_case.requirement, f"case:{_case.name}")(_runner(_case))
