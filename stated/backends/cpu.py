"""The CPU backend: kernels run with torch directly on the host pages and the shared-memory arenas.

Host pages are the kernels' own buffers, so a page needs no staging and its ticket is retired at once.
The algorithms' CPU updates use torch's fused CPU kernels, which reach the memory-bandwidth ceiling
(PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from stated.backends.base import Backend, GradientCheck
from stated_kernels.spec import Algorithm, Hyperparameters


def _overrides(algorithm: Algorithm, method: str) -> bool:
    return getattr(type(algorithm), method) is not getattr(Algorithm, method)


class CpuBackend(Backend):
    name = "cpu"

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
        for index in active:
            info = session.tensors[index].info
            hp = groups[info.group]
            algorithm.begin_step(info, session.small[index], hp)
            if prepass:
                algorithm.prepass(info, session.param_views[index].view(info.shape),
                                  session.grad_views[index].view(info.shape), session.small[index], hp)

    def run_page(self, session, page: int, groups: list[Hyperparameters], pass_index: int,
                 has_grad: bytes | None) -> tuple[None, float]:
        host, waited = session.pager.get(page)
        self.update(session, session.bind(session.table[page], host), groups, pass_index, has_grad)
        session.pager.done(page)
        return None, waited

    @staticmethod
    def update(session, binding, groups: list[Hyperparameters], pass_index: int, has_grad: bytes | None) -> None:
        """The algorithm's CPU update over one bound page, group by group."""
        for group, segments in binding.by_group.items():
            if has_grad is not None:
                segments = [s for s in segments if has_grad[s.tensor.index]]
                if not segments:
                    continue
            if session.master:  # Note [master weights]: fp32 gradients in, rounded parameters out
                segments = [dataclasses.replace(s, grad=s.grad.float()) for s in segments]
            session.algorithm.update(segments, groups[group], pass_index)
            if session.master:
                for s in segments:
                    session.arena_param(s).copy_(s.param)

    def end_step(self, session) -> None:
        pass
