"""The loop that applies one step: pre-pass over gradients, then pipelined passes over pages.

DESIGN.md "One step", and Note [step order] in stated_kernels.spec for the calls an algorithm gets.
The engine only asks: the pager where a page is (and to bring it in), the backend to stage it and run
the kernel, the session which segments a page holds. It never depends on CPU or CUDA.
"""

from __future__ import annotations

import dataclasses
import time

from stated.backends.base import Backend
from stated.session import Session
from stated_kernels.spec import Algorithm, Hyperparameters


@dataclasses.dataclass
class StepResult:
    seconds: float
    stall_seconds: float
    page_faults: int
    tensors_updated: int


def _overrides(algorithm: Algorithm, method: str) -> bool:
    return getattr(type(algorithm), method) is not getattr(Algorithm, method)


class Engine:
    def __init__(self, backend: Backend):
        self.backend = backend

    def step(self, session: Session, groups: list[Hyperparameters], has_grad: bytes) -> StepResult:
        """Applies one step. The store has validated everything: `groups` are complete and `has_grad`
        has one byte per tensor."""
        start = time.perf_counter()
        algorithm = session.algorithm
        everyone = has_grad.count(0) == 0
        active = [t for t in session.tensors if has_grad[t.info.index]]

        # Pre-pass over gradients only: the step counters, and reductions over whole tensors.
        prepass = _overrides(algorithm, "prepass")
        for place in active:
            index = place.info.index
            hp = groups[place.info.group]
            algorithm.begin_step(place.info, session.small[index], hp)
            if prepass:
                algorithm.prepass(place.info, session.param_views[index].view(place.info.shape),
                                  session.grad_views[index].view(place.info.shape), session.small[index], hp)

        stall = 0.0
        faults_before = session.pager.faults
        order = [e.page.index for e in session.table
                 if everyone or any(has_grad[s.tensor] for s in e.page.segments)]
        for pass_index in range(algorithm.passes):
            session.pager.begin_pass(order)
            for page in order:
                host, waited = session.pager.get(page)
                stall += waited
                staged = self.backend.stage_in(page, host)
                binding = session.bind(session.table[page], staged)
                for group, segments in binding.by_group.items():
                    if not everyone:
                        segments = [s for s in segments if has_grad[s.tensor.index]]
                        if not segments:
                            continue
                    if session.master:  # Note [master weights]: fp32 gradients in, rounded parameters out
                        segments = [dataclasses.replace(s, grad=s.grad.float()) for s in segments]
                    self.backend.launch(algorithm, segments, groups[group], pass_index)
                    if session.master:
                        for s in segments:
                            session.arena_param(s).copy_(s.param)
                self.backend.stage_out(page, staged, host)
                session.pager.done(page)
            stall += session.pager.end_pass()
            if pass_index + 1 < algorithm.passes:
                self.backend.synchronize()
                for place in active:
                    algorithm.between_passes(place.info, session.small[place.info.index],
                                             groups[place.info.group], pass_index)
        self.backend.synchronize()
        session.steps += 1
        seconds = time.perf_counter() - start
        session.step_seconds += seconds
        session.stall_seconds += stall
        return StepResult(seconds, stall, session.pager.faults - faults_before, len(active))
