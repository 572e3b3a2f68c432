"""The gradient-check scenarios (Note [gradient checks] in stated.backends.base) that both the CPU tests
(tests/client/test_grad_checks.py) and the GPU tests (tests/gpu/test_gpu_grad_checks.py) run.

stated gets only `max_grad_norm=` and `scaler.step(opt)`: the daemon unscales, measures, clips and
skips. The reference gets torch's own recipe in the trainer: `scaler.unscale_(opt)`,
`torch.nn.utils.clip_grad_norm_(params, max_norm)`, `scaler.step(opt)`, `scaler.update()`. A scenario
steps both sides on the same batches and asserts what must agree at every step; the caller compares
the two runs at the end, at its own tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

INF_STEP = 7  # an overflow: both sides must skip it and halve the scale
INIT_SCALE = 2.0 ** 12


@dataclass
class Sides:
    """A stated optimizer and its torch reference, each over its own copy of the model, the batches
    (X[i], Y[i]) of every step, the scalers' device and how closely the gradient norms agree."""

    ours: Any
    ref: torch.optim.Optimizer
    m_ours: torch.nn.Module
    m_ref: torch.nn.Module
    X: torch.Tensor
    Y: torch.Tensor
    device: str
    rel: float

    def loss(self, model: torch.nn.Module, i: int, overflow: bool = True) -> torch.Tensor:
        """Step i's loss, large so that clipping bites; infinite at INF_STEP unless not `overflow`."""
        loss = 100 * torch.nn.functional.mse_loss(model(self.X[i]), self.Y[i])
        return loss * float("inf") if overflow and i == INF_STEP else loss

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device, init_scale=INIT_SCALE, growth_interval=5)


def scaled_step(opt, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
    """torch's GradScaler recipe without unscale_: scale, backward, scaler.step, scaler.update."""
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def clipped_step(opt, model: torch.nn.Module, loss: torch.Tensor, max_norm: float,
                 scaler: torch.amp.GradScaler | None = None) -> float:
    """torch's clipping recipe in the trainer (unscale_ first, with a scaler); the norm it measured."""
    opt.zero_grad()
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm))
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return norm


def max_grad_norm(s: Sides) -> None:
    """stated's max_grad_norm=0.5 against clip_grad_norm_ in the trainer."""
    clipped = 0
    for i in range(len(s.X)):
        s.ours.zero_grad()
        s.loss(s.m_ours, i, overflow=False).backward()
        s.ours.step()
        norm = clipped_step(s.ref, s.m_ref, s.loss(s.m_ref, i, overflow=False), max_norm=0.5)
        clipped += norm > 0.5
        assert s.ours.last_grad_norm == pytest.approx(norm, rel=s.rel), f"step {i}"
        assert not s.ours.last_step_skipped
    assert clipped > len(s.X) // 2, "the test must exercise clipping"


def grad_scaler(s: Sides) -> None:
    """scaler.step(opt) on both sides: the daemon unscales and skips the overflow."""
    s_ours, s_ref = s.scaler(), s.scaler()
    for i in range(len(s.X)):
        scaled_step(s.ours, s.loss(s.m_ours, i), s_ours)
        scaled_step(s.ref, s.loss(s.m_ref, i), s_ref)
        assert s.ours.last_step_skipped == (i == INF_STEP)
        assert s_ours.get_scale() == s_ref.get_scale(), f"step {i}: the scalers' scales diverged"
    assert s_ours.get_scale() != INIT_SCALE, "the scale must have moved (growth and the inf backoff)"
    assert float(s.ours.state_dict()["state"][0]["step"]) == len(s.X) - 1


def grad_scaler_and_max_grad_norm(s: Sides) -> None:
    """scaler.step(opt) with max_grad_norm=1.0: unscaling and clipping happen in the daemon."""
    s_ours, s_ref = s.scaler(), s.scaler()
    for i in range(len(s.X)):
        scaled_step(s.ours, s.loss(s.m_ours, i), s_ours)
        norm = clipped_step(s.ref, s.m_ref, s.loss(s.m_ref, i), max_norm=1.0, scaler=s_ref)
        if i != INF_STEP:
            assert s.ours.last_grad_norm == pytest.approx(norm, rel=s.rel), f"step {i}"
        assert s.ours.last_step_skipped == (i == INF_STEP)


def trainer_side_unscale(s: Sides) -> None:
    """The classic recipe (unscale_, clip in the trainer, scaler.step) on a stated optimizer too."""
    s_ours, s_ref = s.scaler(), s.scaler()
    for i in range(len(s.X)):
        clipped_step(s.ours, s.m_ours, s.loss(s.m_ours, i), max_norm=1.0, scaler=s_ours)
        clipped_step(s.ref, s.m_ref, s.loss(s.m_ref, i), max_norm=1.0, scaler=s_ref)
        assert s.ours.last_step_skipped == (i == INF_STEP)


# name: (what the stated optimizer is built with, the scenario)
SCENARIOS: dict[str, tuple[dict, Callable[[Sides], None]]] = {
    "max_grad_norm": ({"max_grad_norm": 0.5}, max_grad_norm),
    "grad_scaler": ({}, grad_scaler),
    "grad_scaler_and_max_grad_norm": ({"max_grad_norm": 1.0}, grad_scaler_and_max_grad_norm),
    "trainer_side_unscale": ({}, trainer_side_unscale),
}
