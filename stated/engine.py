"""The loop that applies one step: pre-pass over gradients, then pipelined passes over pages.

DESIGN.md "One step", Note [step order] in stated_kernels.spec for the calls an algorithm gets, and
stated.backends.base for the calls a backend gets. The engine is the only caller of a session's pager
(stated.paging.pager): per pass it tells the pager the pages the backend needs in the host tier, gets
each one, hands the backend the page bound to its host buffer (a `Binding`), retires it once `depth`
pages are in flight, and gives it back to the pager. It never depends on CPU or CUDA.

Note [host pages lent to a backend]
-----------------------------------
A backend with pages of its own (the GPU cache) needs host buffers outside the engine's order: to
write an evicted page back, or to flush before an export. It borrows them from the session's
`HostPages`, which the engine hands it before each step and each flush: a desk over the pager that binds
the page, counts what is out, and gives back whatever a failed step left out.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable

from stated.inconsistency import Inconsistency
from stated.session import Binding, Session
from stated_kernels.spec import Hyperparameters


@dataclasses.dataclass
class StepResult:
    seconds: float
    stall_seconds: float
    page_faults: int
    tensors_updated: int
    grad_norm: float = 0.0
    found_inf: bool = False


class HostPages:
    """Host pages a backend borrows beyond the page it runs (Note [host pages lent to a backend])."""

    def __init__(self, session: Session):
        self.session = session
        self.out: collections.Counter[int] = collections.Counter()

    def borrow(self, page: int) -> Binding:
        """The page bound to its host buffer, which stays put until `give_back(page)`."""
        buffer, _waited = self.session.pager.get(page)
        self.out[page] += 1
        return self.session.bind(self.session.table[page], buffer)

    def give_back(self, page: int, dirty: bool) -> None:
        self.out[page] -= 1
        if not self.out[page]:
            del self.out[page]
        self.session.pager.done(page, dirty)

    def give_back_all(self) -> None:
        """After a failed step: every page still out goes back, as the failure left it."""
        for page, count in list(self.out.items()):
            for _ in range(count):
                self.give_back(page, True)


@dataclasses.dataclass
class Cursor:
    """Where a step is: the page in hand, for the error of a step that fails (None: no page is)."""

    page: int | None = None


class Engine:
    def step(self, session: Session, groups: list[Hyperparameters], has_grad: bytes,
             grad_scale: float = 0.0, max_grad_norm: float = 0.0) -> StepResult:
        """Applies one step. The store has validated everything: `groups` are complete, `has_grad`
        has one byte per tensor, `grad_scale` and `max_grad_norm` are finite and >= 0 (0: unused).
        A step whose gradients hold inf or nan changes nothing and is not counted. A step that fails
        once it began marks the session inconsistent (Note [half-applied steps] in
        stated.inconsistency), with its step counters as they were before it, and raises its error."""
        start = time.perf_counter()
        backend = session.backend
        host = HostPages(session)
        backend.lend_host_pages(session, host)
        active = [t.info.index for t in session.tensors if has_grad[t.info.index]]

        check = backend.check_gradients(session, active, grad_scale, max_grad_norm)
        if check.found_inf:  # skipped: the call is counted, no tensor's state or step count changes
            session.steps += 1
            return StepResult(time.perf_counter() - start, 0.0, 0, 0, check.norm, True)
        counters, cursor = session.step_counters().clone(), Cursor()
        try:
            stall, faults = self._apply(session, groups, has_grad, active, host, cursor)
        except BaseException as exc:
            host.give_back_all()
            session.pager.abort_pass()
            session.restore_step_counters(counters)
            session.inconsistent = Inconsistency.of(f"step {session.steps + 1}", session.steps + 1,
                                                    cursor.page, exc)
            raise
        session.steps += 1
        seconds = time.perf_counter() - start
        session.step_seconds += seconds
        session.stall_seconds += stall
        return StepResult(seconds, stall, faults, len(active), check.norm)

    def _apply(self, session: Session, groups: list[Hyperparameters], has_grad: bytes, active: list[int],
               host: HostPages, cursor: Cursor) -> tuple[float, int]:
        """The step's changes, Note [step order]: returns the seconds stalled and the page faults."""
        backend, pager = session.backend, session.pager
        backend.begin_step(session, groups, active)
        everyone = has_grad.count(0) == 0
        stall = 0.0
        faults_before = pager.faults
        mask = None if everyone else has_grad
        order = [e.page.index for e in session.table
                 if everyone or any(has_grad[s.tensor] for s in e.page.segments)]
        session.changed_pages.update(order)  # for the next checkpoint (stated.durability.checkpoint)
        for pass_index in range(session.algorithm.passes):
            stall += self._pass(session, order, groups, pass_index, mask, host, cursor)
            if pass_index + 1 < session.algorithm.passes:
                backend.between_passes(session, groups, active, pass_index)
        backend.end_step(session)
        return stall, pager.faults - faults_before

    @staticmethod
    def _pass(session: Session, order: list[int], groups: list[Hyperparameters], pass_index: int,
              mask: bytes | None, host: HostPages, cursor: Cursor) -> float:
        """One pass over `order` with up to `backend.depth` pages in flight; returns the seconds stalled.
        Every page got from the pager is given back exactly once, after the backend retired it."""
        backend, pager, table, bind = session.backend, session.pager, session.table, session.bind
        wanted = backend.host_pages(session, order)
        needs_host = None if wanted is order else set(wanted)  # None: every page of the pass
        pager.begin_pass(wanted)
        stall = 0.0
        in_flight: collections.deque = collections.deque()  # (page got from the pager or None, ticket, page)
        taken = None  # a page got from the pager and not yet in flight or given back
        try:
            for page in order:
                cursor.page = page
                bound = None
                if needs_host is None or page in needs_host:
                    buffer, waited = pager.get(page)
                    taken = page
                    stall += waited
                    bound = bind(table[page], buffer)
                ticket = backend.run_page(session, page, bound, groups, pass_index, mask)
                if ticket is None:  # finished already: nothing to retire
                    if taken is not None:
                        taken = None
                        pager.done(page)
                    continue
                in_flight.append((taken, ticket, page))
                taken = None
                if len(in_flight) >= backend.depth:
                    _retire(session, in_flight, cursor)
            while in_flight:
                _retire(session, in_flight, cursor)
        except BaseException:
            if taken is not None:
                in_flight.append((taken, None, taken))
            _drain(session, in_flight)
            raise
        cursor.page = None  # the pass's write-backs: no one page in hand
        return stall + pager.end_pass()

    @staticmethod
    def visit_pages(session: Session, pages: Iterable[int], visit: Callable[[Binding], None],
                    dirty: bool) -> None:
        """Calls `visit` with each page bound to its host buffer, between steps (state_dict export and
        import); `dirty` when `visit` writes the page."""
        pager = session.pager
        for page in pages:
            if dirty:
                session.changed_pages.add(page)
            buffer, _waited = pager.get(page)
            try:
                visit(session.bind(session.table[page], buffer))
            finally:
                pager.done(page, dirty)

    @staticmethod
    def read_all_pages(session: Session, visit: Callable[[Binding], None], order: list[int]) -> None:
        """Calls `visit` with each page of `order`, between steps, for reading only (a checkpoint); a
        paged session's pages are read ahead as in a step's pass."""
        pager = session.pager
        pager.begin_pass(order)
        try:
            for page in order:
                buffer, _waited = pager.get(page)
                try:
                    visit(session.bind(session.table[page], buffer))
                finally:
                    pager.done(page, dirty=False)
        except BaseException:
            pager.abort_pass()
            raise
        pager.end_pass()

    @staticmethod
    def can_freeze(session: Session) -> bool:
        """Whether a checkpoint can freeze the session's state file rather than copy its pages."""
        return session.pager.can_freeze

    @staticmethod
    def freeze_pages(session: Session, pages: list[int], link: str,
                     check: Callable[[], None]) -> tuple[dict[int, list[int]], int]:
        """A checkpoint's `pages` without copying those on disk (Note [frozen state files] in
        stated.paging.state_file): those the state file does not hold as they are (resident pages
        changed since they were last written, mostly) are written to it, and it is frozen as `link`.
        Returns {page: [checksum, offset in `link`]} and how many pages were written; `check()` runs
        before each page written and before the freeze, to give up."""
        pager = session.pager
        placed, others = pager.placed_in_file(pages)

        def write(bound: Binding) -> None:
            check()
            placed[bound.page] = pager.write_now(bound.page, bound.buffer)

        Engine.read_all_pages(session, write, others)
        check()
        pager.freeze(link)
        return placed, len(others)

    @staticmethod
    def flush(session: Session) -> None:
        """Before an export: state the backend holds on a device comes back to the host tier."""
        host = HostPages(session)
        session.backend.lend_host_pages(session, host)
        session.backend.flush(session)

    @staticmethod
    def reset_pages(session: Session) -> None:
        """Every page back to fresh (zero) state, as before the first step."""
        for entry in session.table:
            session.pager.reset(entry.page.index)
            session.changed_pages.add(entry.page.index)


def _retire(session: Session, in_flight: collections.deque, cursor: Cursor) -> None:
    """Retires the oldest page in flight and gives it back (it stays in flight if retiring fails)."""
    page, ticket, cursor.page = in_flight[0]
    dirty = session.backend.retire(ticket)
    in_flight.popleft()
    if page is not None:
        session.pager.done(page, dirty)


def _drain(session: Session, in_flight: collections.deque) -> None:
    """After a failed page: waits for the pages still in flight, so that no kernel or copy goes on
    writing into the session's memory after the step has reported its error, then gives its pages
    back to the pager (the first error is the one reported; Engine.step gives back what a backend
    borrowed and lets the pager drop what the pass had under way)."""
    backend = session.backend
    taken = []
    while in_flight:
        page, ticket, _ = in_flight.popleft()
        try:
            if ticket is not None:
                backend.retire(ticket)
        except Exception:  # noqa: BLE001
            pass
        if page is not None:
            taken.append(page)
    try:
        backend.end_step(session)
    except Exception:  # noqa: BLE001
        pass
    for page in taken:
        session.pager.done(page, True)
