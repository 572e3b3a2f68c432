"""A session whose state a failed step (or a failed load_state_dict) left half-applied, and the sentences
that say so and how to get back.

Note [half-applied steps]
-------------------------
A step updates pages in place, one after another, and so do the parameters in the arena; there is no
undo log (it would double the memory traffic of every step for a failure that should be rare). A step
that fails after it began (a page that fails its checksum, an I/O error, a failed kernel) therefore
leaves some pages at the new step and others at the old one. Rather than hand that mixture on, the
store marks the session *inconsistent* (`Session.inconsistent`): every later step is refused with
FAILED_PRECONDITION naming the failed step, the page and the way back, and so is state_dict(), because
an exported half-applied state would be a checkpoint of a step that never happened. So a retry can never
apply a page twice. Step counters are put back to their values before the failed step (stated.engine),
no page slot stays taken (stated.paging.disk_pager), and a load_state_dict that succeeds replaces the
whole state and makes the session consistent again. A step refused before anything was touched
(validation, a step skipped for inf or nan gradients) leaves the session as it was.
"""

from __future__ import annotations

import dataclasses

from stated.errors import FailedPrecondition, ServiceError


@dataclasses.dataclass(frozen=True)
class Inconsistency:
    """What left a session's state half-applied."""

    what: str  # "step 5", or "load_state_dict"
    step: int  # the first step whose state is in doubt: the failed step, or the one after a failed load
    page: int | None  # the page in hand when it failed; None when no page was (e.g. writing pages back)
    status: str  # the failure's status name (stated.errors)
    error: str  # its sentence

    @classmethod
    def of(cls, what: str, step: int, page: int | None, exc: BaseException) -> Inconsistency:
        status = exc.status if isinstance(exc, ServiceError) else "INTERNAL"
        return cls(what, step, page, status, f"{type(exc).__name__}: {exc}" if status == "INTERNAL" else str(exc))

    def describe(self) -> str:
        """The failure in one clause: "step 5 failed at page 3 (DATA_LOSS: ...)"."""
        where = f" at page {self.page}" if self.page is not None else ""
        return f"{self.what} failed{where} ({self.status}: {self.error})"

    def refusal(self, session, action: str, checkpoint_step: int | None = None) -> FailedPrecondition:
        """The error that refuses `action` ("step 6", "state_dict()") on the session."""
        return FailedPrecondition(
            f"{action} refused: the state of job {session.job!r} rank {session.rank} (session {session.id}) is "
            f"half-applied, so it takes no steps and is not exported: {self.describe()}. "
            f"{ways_back(self.step, checkpoint_step)}")


def ways_back(failed_step: int, checkpoint_step: int | None = None) -> str:
    """How a user gets an inconsistent session going again. `checkpoint_step`: the step of the session's
    last durable checkpoint, when there is one."""
    restore = (f"To go on, restore a state saved before step {failed_step}: the model's parameters with "
               f"model.load_state_dict() and the optimizer with opt.load_state_dict()")
    if checkpoint_step is None:
        return restore + "."
    return (f"{restore}, or continue from the daemon's checkpoint at step {checkpoint_step}: opt.close(keep=True), "
            f"then a new optimizer with resume=True.")
