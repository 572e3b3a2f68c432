"""The loop that applies one step: pre-pass over gradients, then pipelined passes over pages.

DESIGN.md "One step", Note [step order] in stated_kernels.spec for the calls an algorithm gets, and
stated.backends.base for the calls a backend gets. The engine only asks: the session which pages hold
tensors with gradients, the backend to check gradients, run the pre-pass and run each page (which
brings it in through the pager), and when to retire pages in flight. It never depends on CPU or CUDA.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from stated.session import Session
from stated_kernels.spec import Hyperparameters


@dataclasses.dataclass
class StepResult:
    seconds: float
    stall_seconds: float
    page_faults: int
    tensors_updated: int
    grad_norm: float = 0.0
    found_inf: bool = False


class Engine:
    def step(self, session: Session, groups: list[Hyperparameters], has_grad: bytes,
             grad_scale: float = 0.0, max_grad_norm: float = 0.0) -> StepResult:
        """Applies one step. The store has validated everything: `groups` are complete, `has_grad`
        has one byte per tensor, `grad_scale` and `max_grad_norm` are finite and >= 0 (0: unused).
        A step whose gradients hold inf or nan changes nothing and is not counted."""
        start = time.perf_counter()
        backend = session.backend
        everyone = has_grad.count(0) == 0
        active = [t.info.index for t in session.tensors if has_grad[t.info.index]]

        check = backend.check_gradients(session, active, grad_scale, max_grad_norm)
        if check.found_inf:  # skipped: the call is counted, no tensor's state or step count changes
            session.steps += 1
            return StepResult(time.perf_counter() - start, 0.0, 0, 0, check.norm, True)
        backend.begin_step(session, groups, active)

        stall = 0.0
        faults_before = session.pager.faults
        mask = None if everyone else has_grad
        order = [e.page.index for e in session.table
                 if everyone or any(has_grad[s.tensor] for s in e.page.segments)]
        for pass_index in range(session.algorithm.passes):
            session.pager.begin_pass(backend.host_pages(session, order))
            in_flight: collections.deque = collections.deque()
            try:
                for page in order:
                    ticket, waited = backend.run_page(session, page, groups, pass_index, mask)
                    stall += waited
                    in_flight.append(ticket)
                    if len(in_flight) >= backend.depth:
                        backend.retire(in_flight.popleft())
                while in_flight:
                    backend.retire(in_flight.popleft())
            except BaseException:
                _drain(backend, in_flight)
                raise
            stall += session.pager.end_pass()
            if pass_index + 1 < session.algorithm.passes:
                backend.between_passes(session, groups, active, pass_index)
        backend.end_step(session)
        session.steps += 1
        seconds = time.perf_counter() - start
        session.step_seconds += seconds
        session.stall_seconds += stall
        return StepResult(seconds, stall, session.pager.faults - faults_before, len(active), check.norm)


def _drain(backend, in_flight: collections.deque) -> None:
    """After a failed page: waits for the pages still in flight, so that no kernel or copy goes on
    writing into the session's memory after the step has reported its error."""
    while in_flight:
        try:
            backend.retire(in_flight.popleft())
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass
