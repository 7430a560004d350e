"""Runs the catalogue's checks against one back end and gathers one verdict per requirement.

Each check gets a new connection (a vhost-user back end starts every front end from scratch); after a failure,
or when the back end has exited (QEMU's C back end serves one front end per process), the next check gets a new
process, so one failure cannot poison the next.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..procfs import wait_until
from ..vhost_user.profiles import QEMU, Profile
from .catalogue import Catalogue, Requirement
from .context import CheckContext, Offer, probe, unasked
from .errors import CheckFailed, NotApplicable
from .process import BackendProcess
from .registry import all_checks

PASS: Final = "pass"
FAIL: Final = "fail"
NA: Final = "n/a"
OBSERVED_SHOWN: Final = 48


@dataclass
class CheckResult:
    name: str
    requirement: str
    status: str
    detail: str = ""
    observed: bytes | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail,
                "observed": self.observed.hex() if self.observed is not None else None,
                "seconds": round(self.seconds, 3)}


@dataclass
class RequirementResult:
    requirement: Requirement
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        states = {c.status for c in self.checks}
        if FAIL in states:
            return FAIL
        if PASS in states:
            return PASS
        return NA

    @property
    def detail(self) -> str:
        """The failures' messages, or the reason it does not apply, or the notes of passing checks."""
        pick = [c for c in self.checks if c.status == self.status and c.detail]
        return "; ".join(dict.fromkeys(f"{c.detail}" for c in pick))

    @property
    def observed(self) -> bytes | None:
        return next((c.observed for c in self.checks if c.status == FAIL and c.observed is not None), None)


@dataclass
class Run:
    backend: str
    offer: Offer
    results: list[RequirementResult]
    seconds: float
    starts: int
    # Requirements that timed out and were run again on a fresh process (see `retry_timeouts`).
    retried: list[str] = field(default_factory=list)
    # The VMM whose set-up sequence every session followed.
    profile: Profile = QEMU

    def verdicts(self) -> dict[str, str]:
        """Each requirement's status, by its id."""
        return {r.requirement.id: r.status for r in self.results}

    def counts(self) -> dict[str, int]:
        out = {PASS: 0, FAIL: 0, NA: 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "profile": self.profile.name,
            "offer": self.offer.describe(),
            "counts": self.counts(),
            "seconds": round(self.seconds, 2),
            "process_starts": self.starts,
            "retried_after_timeout": self.retried,
            "results": [{"id": r.requirement.id, "kind": r.requirement.kind, "status": r.status, "detail": r.detail,
                         "observed": r.observed.hex() if r.observed is not None else None,
                         "checks": [c.to_json() for c in r.checks]} for r in self.results],
        }


def hexdump(data: bytes | None, limit: int = OBSERVED_SHOWN) -> str:
    if data is None:
        return ""
    shown = data[:limit].hex(" ")
    return shown + (f" … ({len(data)} bytes)" if len(data) > limit else "")


def _run_check(name: str, backend: BackendProcess, offer: Offer, req: Requirement, profile: Profile) -> CheckResult:
    chk = all_checks()[name]
    result = CheckResult(name, req.id, PASS)
    ctx = CheckContext(backend, offer, profile)
    t0 = time.monotonic()
    pid = -1
    try:
        backend.ensure()
        pid = backend.pid
        note = chk.fn(ctx)
        result.detail = note or ""
    except NotApplicable as e:
        result.status, result.detail = NA, str(e)
    except CheckFailed as e:
        result.status, result.detail, result.observed = FAIL, e.message, e.observed
    except Exception as e:
        result.status, result.detail = FAIL, f"{type(e).__name__}: {e}"
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            result.detail += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
    finally:
        ctx.close()
    proc = backend.proc
    if proc is not None and result.status != NA and not ctx.stops_backend and proc.pid == pid:
        # A clean exit after the front end left is allowed (D77); dying any other way is a crash.
        if offer.exits_on_disconnect:
            wait_until(lambda: proc.poll() is not None, 2.0)
        rc = proc.poll()
        if rc is not None and rc != 0:
            result.status = FAIL
            result.detail = (result.detail + "; " if result.detail else "") + f"the back end exited with status {rc}"
    if result.status == FAIL or ctx.stops_backend or (proc is not None and proc.poll() is not None) or \
            offer.exits_on_disconnect:
        backend.stop()
    result.seconds = time.monotonic() - t0
    return result


def run(template: str, catalogue: Catalogue, only: Iterable[str] | None = None, workdir: Path | None = None,
        progress: Callable[[CheckResult], None] | None = None, profile: Profile = QEMU) -> Run:
    """Every check (or those of `only`) against the back end `template` starts, each session set up as `profile`'s
    VMM sets one up."""
    wanted = set(only or [])
    unknown = wanted - {r.id for r in catalogue.requirements}
    if unknown:
        raise ValueError(f"unknown requirement ids: {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vgpu-conformance-", dir=workdir) as tmp:
        backend = BackendProcess(template, Path(tmp))
        try:
            offer = probe(backend, profile)
            backend.stop()
            results: list[RequirementResult] = []
            for req in catalogue.requirements:
                if wanted and req.id not in wanted:
                    continue
                rr = RequirementResult(req)
                missing = offer.missing(req.feature) or unasked(profile, req.feature)
                for name in req.checks:
                    res = CheckResult(name, req.id, NA, missing) if missing else \
                        _run_check(name, backend, offer, req, profile)
                    rr.checks.append(res)
                    if progress is not None:
                        progress(res)
                results.append(rr)
        finally:
            backend.stop()
        return Run(template, offer, results, time.monotonic() - t0, backend.starts, profile=profile)


def retry_timeouts(result: Run, catalogue: Catalogue) -> Run:
    """Run once more, on a fresh process, the requirements that failed only by timing out; keep the second
    verdict and remember which were retried.  A back end that stalls now and then (as ours does, reported) is
    then judged on what it does, while one that always stalls still fails."""
    timed_out = [r.requirement.id for r in result.results
                 if r.status == FAIL and all("Timeout" in c.detail for c in r.checks if c.status == FAIL)]
    if not timed_out:
        return result
    again = {r.requirement.id: r for r in run(result.backend, catalogue, timed_out, profile=result.profile).results}
    result.results = [again.get(r.requirement.id, r) for r in result.results]
    result.retried = timed_out
    return result


def table(run: Run) -> str:
    """One row per requirement: id, kind, verdict and why (with the observed bytes of a failure)."""
    rows = [("requirement", "kind", "verdict", "detail")]
    for r in run.results:
        detail = r.detail
        if r.status == FAIL and r.observed is not None:
            detail += f" [observed: {hexdump(r.observed)}]"
        rows.append((r.requirement.id, r.requirement.kind, r.status, detail))
    w0 = max(len(a) for a, _, _, _ in rows)
    lines = []
    for rid, kind, verdict, detail in rows:
        lines.append(f"{rid:<{w0}}  {kind:<10}  {verdict:<7}  {detail}".rstrip())
    c = run.counts()
    lines.append("")
    lines.append(f"{c[PASS]} pass, {c[FAIL]} fail, {c[NA]} n/a — {len(run.results)} requirements in "
                 f"{run.seconds:.1f} s ({run.starts} back-end starts)")
    return "\n".join(lines)
