"""Adafactor against torch.optim.Adafactor (single-tensor path) running here: 100 steps of 1-D, 2-D,
3-D, 4-D and 0-D tensors."""

from __future__ import annotations

import functools

import pytest
import torch

import harness
import lockstep
from stated_kernels.adafactor import Adafactor, broadcast_index, expand_slice

SHAPES = [(37,), (24, 40), (3, 8, 20), (2, 3, 4, 5), ()]
CASES = {
    "defaults": ({}, {}),
    "decay_maximize": ({"lr": 3e-3, "weight_decay": 0.05, "maximize": True, "beta2_decay": -0.6, "d": 2.0},
                       {"lr": 3e-3, "weight_decay": 0.05, "maximize": True, "beta2_decay": -0.6, "d": 2.0}),
    "explicit_eps": ({"eps1": 1e-6, "eps2": 1e-2}, {"eps": (1e-6, 1e-2)}),
}
# Tolerances after 100 steps, as (rtol, atol); (0, 0) is identical bits.
TOLERANCES = {
    # Factored tensors (ndim >= 2): R, C, their normalizer and RMS(U) come from the prepass, with the
    # reference's own operations on the whole tensor; the per-element update repeats its
    # elementwise operations.
    "factored theta": (0.0, 0.0),
    "row_var, col_var": (0.0, 0.0),
    # 1-D and 0-D tensors: V depends on the gradient alone.
    "variance": (0.0, 0.0),
    # RMS(U) of a 1-D tensor needs the new paged V, so it is a float64 fold over the pages where
    # torch takes a float32 norm: the step size may differ in its last bit (6e-8 relative) in a
    # step, which moves theta by < lr * 6e-8 = 6e-10. Measured after 100 steps: 1.2e-7, one ulp of
    # |theta| <= 4; the bound is two ulps there.
    "1-D theta": (0.0, 1e-6),
}
_close = functools.partial(lockstep.assert_within, TOLERANCES)


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_adafactor(case):
    hp, kwargs = CASES[case]
    reference = functools.partial(torch.optim.Adafactor, foreach=False, **kwargs)
    driver, refs, opt = lockstep.run_both(Adafactor(), reference, hp, harness.split(SHAPES, 1), SHAPES)
    for i, p in enumerate(refs):
        mine, theirs = driver.export(i), opt.state[p]
        assert torch.equal(mine["step"], theirs["step"])
        if len(SHAPES[i]) >= 2:
            _close(driver.params[i], p.detach(), "factored theta")
            _close(mine["row_var"], theirs["row_var"], "row_var, col_var")
            _close(mine["col_var"], theirs["col_var"], "row_var, col_var")
        else:
            _close(driver.params[i], p.detach(), "1-D theta")
            _close(mine["variance"], theirs["variance"], "variance")


def test_segmentation_invariant():
    groups = [{"weight_decay": 0.01}, {"lr": 1e-3, "maximize": True}]
    harness.assert_segmentation_invariant(Adafactor(), SHAPES, groups, group_of=[0, 1, 0, 1, 0])


def test_state_is_the_factored_size():
    driver = harness.run(Adafactor(), harness.initial_params(SHAPES), [{}], harness.whole(SHAPES), steps=2)
    for i, shape in enumerate(SHAPES):
        if len(shape) >= 2:
            leading = torch.Size(shape[:-2]).numel()
            expected = 4 * leading * (shape[-2] + shape[-1])
        else:
            expected = 4 * torch.Size(shape).numel()
        assert driver.state_bytes(i) == expected + 4  # + the float32 step
        # Per-step scratch is per row and column too, never per element.
        assert driver.state_bytes(i, scratch=True) <= 3 * expected + 64


def test_state_dict_loads_into_torch_and_back():
    params = harness.initial_params(SHAPES)
    ours = harness.run(Adafactor(), params, [{}], harness.interleaved(SHAPES, 1), steps=7)
    refs = lockstep.parameters(ours.params)
    opt = torch.optim.Adafactor(refs, foreach=False)
    lockstep.export_into(opt, ours)
    back = harness.Driver(Adafactor(), ours.params, [{}], harness.whole(SHAPES))
    lockstep.import_from(back, opt)
    lockstep.step_both(opt, refs, back, range(8, 12))
    for i, p in enumerate(refs):
        _close(back.params[i], p.detach(), "1-D theta")
        assert torch.equal(back.export(i)["step"], opt.state[p]["step"])


def test_import_names_a_misshapen_factor():
    algo = Adafactor()
    driver = harness.Driver(algo, harness.initial_params([(4, 6)]), [{}], harness.whole([(4, 6)]))
    with pytest.raises(ValueError, match="'col_var' of tensor 0 has shape"):
        driver.load(0, {"step": torch.tensor(3.0), "row_var": torch.zeros(4, 1), "col_var": torch.zeros(6, 1)})


def test_expand_slice_matches_expand():
    cases = (((3, 5, 7), (3, 1, 7)), ((3, 5, 7), (1, 5, 1)), ((4, 6), (4, 1)), ((2, 3, 4, 5), (2, 1, 4, 1)))
    for shape, small_shape in cases:
        small = torch.arange(float(torch.Size(small_shape).numel())).view(small_shape)
        full = small.expand(shape).reshape(-1)
        numel = full.numel()
        for start, length in ((0, numel), (4, min(30, numel - 4)), (numel // 2 + 1, 1), (numel - 5, 5), (7, numel - 9)):
            piece = expand_slice(small, shape, start, length)
            assert torch.equal(piece, full[start: start + length])
            piece.add_(1)  # a new tensor: writing to it leaves the state alone
            assert torch.equal(small.expand(shape).reshape(-1), full)
            index = broadcast_index(shape, small_shape, start, length)
            assert torch.equal(small.reshape(-1)[index], full[start: start + length])


def test_rejects_bad_hyperparameters():
    algo = Adafactor()
    assert "beta2_decay must be <= 0" in algo.validate({"beta2_decay": 0.5})
    assert "d must be >= 1" in algo.validate({"d": 0.5})
