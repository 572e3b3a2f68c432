"""CAME against came-pytorch 0.1.3 running here: 100 steps of 1-D, 2-D, 3-D, 4-D and 0-D tensors."""

from __future__ import annotations

import functools

import pytest
import torch

import harness
import lockstep
from stated_kernels.came import CAME

SHAPES = [(37,), (24, 40), (3, 8, 20), (2, 3, 4, 5), ()]
CASES = {
    "readme": ({"lr": 2e-4, "weight_decay": 1e-2}, {"lr": 2e-4, "weight_decay": 1e-2}),
    "betas_clip": ({"lr": 1e-3, "beta1": 0.8, "beta2": 0.99, "beta3": 0.999, "clip_threshold": 0.5,
                    "eps1": 1e-20, "eps2": 1e-12},
                   {"lr": 1e-3, "betas": (0.8, 0.99, 0.999), "clip_threshold": 0.5, "eps": (1e-20, 1e-12)}),
}
# Tolerances after 100 steps, as (rtol, atol); (0, 0) is identical bits.
TOLERANCES = {
    # Computed from the gradient alone with the reference's operations: in the prepass over the
    # whole tensor (factored) or elementwise in the pages (1-D).
    "exp_avg_sq_row, exp_avg_sq_col, 1-D exp_avg_sq": (0.0, 0.0),
    # U and its clip come from the prepass with the reference's operations; M is elementwise.
    "factored exp_avg": (0.0, 0.0),
    # The means of res are float64 folds over the pages (what makes them independent of the
    # paging), rounded once, where the reference takes a float32 mean: each step's mean may differ
    # in its last bit, and the EMA keeps the difference at that scale. Measured: 1.3e-7 relative.
    "exp_avg_res_row, exp_avg_res_col": (1e-6, 0.0),
    # RMS(U) of a 1-D tensor is a float64 fold over the pages instead of a float32 norm, so U's clip
    # divisor may differ in its last bit. M crosses zero, so the bound is absolute: measured 1.2e-7,
    # an ulp of |M| ~ 1.
    "1-D exp_avg": (0.0, 5e-7),
    # Both differences above move theta by at most lr * 1e-7 per step. Measured 2.4e-7, half an ulp
    # of |theta| <= 4; the bound is two ulps there.
    "theta": (0.0, 1e-6),
}
_close = functools.partial(lockstep.assert_within, TOLERANCES)
_reference = functools.partial(lockstep.reference, "came_pytorch", "CAME")


@pytest.mark.parametrize("case", CASES)
def test_matches_came_pytorch(case):
    hp, kwargs = CASES[case]
    driver, refs, opt = lockstep.run_both(CAME(), lambda refs: _reference(refs, kwargs), hp, harness.split(SHAPES, 1),
                                          SHAPES)
    for i, p in enumerate(refs):
        mine, theirs = driver.export(i), opt.state[p]
        assert float(mine["step"]) == theirs["step"]
        _close(driver.params[i], p.detach(), "theta")
        if len(SHAPES[i]) >= 2:
            _close(mine["exp_avg"], theirs["exp_avg"], "factored exp_avg")
            for key in ("exp_avg_sq_row", "exp_avg_sq_col"):
                _close(mine[key], theirs[key], "exp_avg_sq_row, exp_avg_sq_col, 1-D exp_avg_sq")
            for key in ("exp_avg_res_row", "exp_avg_res_col"):
                _close(mine[key], theirs[key], "exp_avg_res_row, exp_avg_res_col")
        else:
            _close(mine["exp_avg_sq"], theirs["exp_avg_sq"], "exp_avg_sq_row, exp_avg_sq_col, 1-D exp_avg_sq")
            _close(mine["exp_avg"], theirs["exp_avg"], "1-D exp_avg")


def test_segmentation_invariant():
    groups = [{"lr": 2e-4, "weight_decay": 1e-2}, {"lr": 1e-3, "clip_threshold": 0.5}]
    harness.assert_segmentation_invariant(CAME(), SHAPES, groups, group_of=[0, 1, 0, 1, 0])


def test_state_layout():
    driver = harness.run(CAME(), harness.initial_params(SHAPES), [{"lr": 1e-3}], harness.whole(SHAPES), steps=2)
    for i, shape in enumerate(SHAPES):
        numel = torch.Size(shape).numel()
        if len(shape) >= 2:
            leading = torch.Size(shape[:-2]).numel()
            # exp_avg (4 B/param) plus row and column statistics of the second moment and of res.
            expected = 4 * numel + 2 * 4 * leading * (shape[-2] + shape[-1])
        else:
            expected = 8 * numel
        assert driver.state_bytes(i) == expected + 4


def test_state_dict_loads_into_came_pytorch_and_back():
    params = harness.initial_params(SHAPES)
    ours = harness.run(CAME(), params, [{"lr": 2e-4}], harness.interleaved(SHAPES, 1), steps=6)
    refs = lockstep.parameters(ours.params)
    opt = _reference(refs, {"lr": 2e-4})
    lockstep.export_into(opt, ours)
    back = harness.Driver(CAME(), ours.params, [{"lr": 2e-4}], harness.whole(SHAPES))
    lockstep.import_from(back, opt)
    lockstep.step_both(opt, refs, back, range(7, 11))
    for i, p in enumerate(refs):
        _close(back.params[i], p.detach(), "theta")


def test_lr_is_required():
    came = CAME()
    assert came.validate({}) == "lr is required for came"
    assert "lr must be > 0" in came.validate({"lr": 0.0})
    assert came.validate({"lr": 1e-4}) is None
