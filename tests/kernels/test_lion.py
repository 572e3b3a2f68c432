"""Lion against lion-pytorch 0.2.5 running here: 100 steps of 1-D, 2-D, 3-D, 4-D and 0-D tensors."""

from __future__ import annotations

import functools

import pytest
import torch

import harness
import lockstep
from stated_kernels.lion import Lion

# Tolerances after 100 steps, as (rtol, atol); (0, 0) is identical bits.
TOLERANCES = {
    # Every operation is elementwise and runs in the reference's order with the same torch kernels
    # (multiply, add with alpha, sgn); there is no reduction anywhere.
    "theta": (0.0, 0.0),
    "exp_avg": (0.0, 0.0),
}

SHAPES = [(37,), (24, 40), (3, 8, 20), (2, 3, 4, 5), ()]
CASES = {
    "defaults": ({}, {}),
    "decay": ({"lr": 3e-4, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.1},
              {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.1}),
    "decoupled": ({"lr": 2e-4, "weight_decay": 1e-3, "decoupled_weight_decay": True, "init_lr": 5e-4},
                  {"lr": 5e-4, "weight_decay": 1e-3, "decoupled_weight_decay": True}),
}
_reference = functools.partial(lockstep.reference, "lion_pytorch", "Lion")


def _reference_stepping_at(hp, kwargs):
    """Builds the reference from `kwargs`, then steps it at hp's lr: with "decoupled" the reference
    divides by the lr it was built with, then steps with a smaller one."""
    def build(refs):
        opt = _reference(refs, kwargs)
        for group in opt.param_groups:
            group["lr"] = hp.get("lr", group["lr"])
        return opt
    return build


@pytest.mark.parametrize("case", CASES)
def test_matches_lion_pytorch(case):
    hp, kwargs = CASES[case]
    driver, refs, opt = lockstep.run_both(Lion(), _reference_stepping_at(hp, kwargs), hp, harness.whole(SHAPES), SHAPES)
    for i, p in enumerate(refs):
        lockstep.assert_within(TOLERANCES, driver.params[i], p.detach(), "theta")
        lockstep.assert_within(TOLERANCES, driver.export(i)["exp_avg"], opt.state[p]["exp_avg"], "exp_avg")


def test_segmentation_invariant():
    groups = [{"lr": 1e-3, "weight_decay": 0.1}, {"lr": 3e-4}]
    harness.assert_segmentation_invariant(Lion(), SHAPES, groups, group_of=[0, 1, 0, 1, 0])


def test_state_is_four_bytes_per_param():
    driver = harness.run(Lion(), harness.initial_params(SHAPES), [{}], harness.whole(SHAPES), steps=2)
    for i, shape in enumerate(SHAPES):
        numel = torch.Size(shape).numel()
        # 4 B/param of exp_avg plus the resident 4-byte step counter.
        assert driver.state_bytes(i) == 4 * numel + 4


def test_state_dict_round_trip_through_the_reference():
    params = harness.initial_params(SHAPES)
    ours = harness.run(Lion(), params, [{"lr": 1e-3}], harness.whole(SHAPES), steps=5)
    refs = lockstep.parameters(ours.params)
    opt = _reference(refs, {"lr": 1e-3})
    assert all(set(ours.export(i)) == {"exp_avg"} for i in range(len(SHAPES)))
    lockstep.export_into(opt, ours)
    fresh = harness.Driver(Lion(), ours.params, [{"lr": 1e-3}], harness.split(SHAPES, 1))
    lockstep.import_from(fresh, opt, {"step": torch.tensor(0.0)})
    lockstep.step_both(opt, refs, fresh, range(6, 9))
    for i, p in enumerate(refs):
        assert torch.equal(fresh.params[i], p.detach())


def test_rejects_bad_hyperparameters():
    lion = Lion()
    assert "beta1 must be in [0, 1]" in lion.validate({"beta1": 1.5})
    assert "lr must be > 0" in lion.validate({"lr": 0.0})
    assert lion.validate({"beta2": 1.0}) is None  # the reference accepts 1
