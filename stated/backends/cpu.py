"""The CPU backend: kernels run with torch directly on the host pages and the shared-memory arenas.

Host pages are the kernels' own buffers, so a page needs no staging. The algorithms' CPU updates use
torch's fused CPU kernels, which reach the memory-bandwidth ceiling (PERFORMANCE.md). With worker
threads (stated.backends.cpu_workers), a page of an algorithm whose segments can be cut is handed to
them in pieces and its ticket is retired once they have all run; two pages are in flight, so the
threads never wait for the engine between pages. Other pages run at once on the step's thread, with
torch's own OpenMP threads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from stated.backends.base import Backend, GradientCheck
from stated.backends.cpu_workers import CpuWorkers, Ticket, cut
from stated.session import Binding
from stated_kernels.spec import Algorithm, Hyperparameters, Segment

# Pages of fewer elements than two of the largest pieces run on the step's thread when they have at
# most this many segments to update (CpuBackend._tasks).
INLINE_SEGMENTS = 4


def _overrides(algorithm: Algorithm, method: str) -> bool:
    return getattr(type(algorithm), method) is not getattr(Algorithm, method)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, workers: CpuWorkers | None = None):
        self.workers = workers
        self.depth = 2 if workers is not None else 1

    def check_gradients(self, session, active: Sequence[int], grad_scale: float,
                        max_grad_norm: float) -> GradientCheck:
        if not (grad_scale or max_grad_norm) or not active:
            return GradientCheck(0.0, False)
        grads = [session.grad_views[i] for i in active]
        # Per-tensor norms in fp32, then the norm of norms, as torch.nn.utils.clip_grad_norm_ does; an
        # inf or nan anywhere makes the total non-finite, which is the found-inf check.
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = float(torch.linalg.vector_norm(torch.stack(norms), 2.0))
        if not math.isfinite(total):
            return GradientCheck(total, True)
        norm = total / grad_scale if grad_scale else total
        factor = GradientCheck.multiplier(norm, grad_scale, max_grad_norm)
        if factor != 1.0:
            # In place in the grad arena: the trainer's gradients are views of it and torch's own
            # unscale_ and clip_grad_norm_ leave them scaled the same way.
            torch._foreach_mul_(grads, factor)
        return GradientCheck(norm, False)

    def begin_step(self, session, groups: list[Hyperparameters], active: Sequence[int]) -> None:
        algorithm = session.algorithm
        prepass = _overrides(algorithm, "prepass")
        if not _overrides(algorithm, "begin_step") and not prepass:  # only the step counters to advance
            counters = session.step_counters()
            if len(active) == len(counters):
                counters.add_(1.0)
            else:
                counters.index_add_(0, torch.tensor(active, dtype=torch.long), torch.ones(len(active)))
            return
        for index in active:
            info = session.tensors[index].info
            hp = groups[info.group]
            algorithm.begin_step(info, session.small[index], hp)
            if prepass:
                algorithm.prepass(info, session.param_views[index].view(info.shape),
                                  session.grad_views[index].view(info.shape), session.small[index], hp)

    def run_page(self, session, page: int, bound: Binding, groups: list[Hyperparameters], pass_index: int,
                 has_grad: bytes | None) -> Ticket | None:
        """The page's pieces handed to the workers (their ticket), or its update run here (None)."""
        if self.workers is not None and session.algorithm.independent_segments:
            tasks = self._tasks(session, bound, groups, pass_index, has_grad)
            if tasks is not None:
                return self.workers.submit(tasks)
        self.update(session, bound, groups, pass_index, has_grad)
        return None

    def retire(self, ticket: Ticket) -> bool:
        ticket.wait()
        return True

    def _tasks(self, session, binding, groups: list[Hyperparameters], pass_index: int, has_grad: bytes | None):
        """The page's update as pieces for the workers, or None when it is too small to share out: a page
        with under two of the largest pieces of work in a few tensors runs on the step's thread, as
        handing it over would cost more (thread wake-ups) than an uneven split of so little work. Many
        small tensors always go to the workers: on the step's thread each would be a parallel region of
        its own, and the daemon's idle OpenMP threads sleep between regions (Note [idle OpenMP threads]
        in stated.cli), so each would wait for a wake-up: 11.7 ms added to a 1M-parameter step in 300
        tensors, against 1.1 ms in pieces."""
        pieces = binding.pieces
        if not pieces:  # cut once per binding: the views stay valid while the page keeps its buffer
            block, workers = session.algorithm.block_elements, self.workers
            pieces.update((group, cut(segments, block, workers.largest, workers.smallest))
                          for group, segments in binding.by_group.items())
        work = []  # (hyperparameters, piece) of the pieces with gradients
        for group, group_pieces in pieces.items():
            for piece in group_pieces:
                if has_grad is not None:
                    piece = [s for s in piece if has_grad[s.tensor.index]]
                if piece:
                    work.append((groups[group], piece))
        segments = sum(len(piece) for _, piece in work)
        if segments <= INLINE_SEGMENTS and sum(s.length for _, piece in work for s in piece) < 2 * self.workers.largest:
            return None
        return [functools.partial(self.update_segments, session, piece, hp, pass_index) for hp, piece in work]

    @staticmethod
    def update(session, binding, groups: list[Hyperparameters], pass_index: int, has_grad: bytes | None) -> None:
        """The algorithm's CPU update over one bound page, group by group."""
        for group, segments in binding.by_group.items():
            if has_grad is not None:
                segments = [s for s in segments if has_grad[s.tensor.index]]
                if not segments:
                    continue
            CpuBackend.update_segments(session, segments, groups[group], pass_index)

    @staticmethod
    def update_segments(session, segments: list[Segment], hp: Hyperparameters, pass_index: int) -> None:
        if session.master:  # Note [master weights]: fp32 gradients in, rounded parameters out
            segments = [dataclasses.replace(s, grad=s.grad.float()) for s in segments]
        session.algorithm.update(segments, hp, pass_index)
        if session.master:
            for s in segments:
                session.arena_param(s).copy_(s.param)

    def end_step(self, session) -> None:
        pass
