"""Lion against lion-pytorch 0.2.5 running here: 100 steps of 1-D, 2-D, 3-D, 4-D and 0-D tensors."""

from __future__ import annotations

import pytest
import torch

import harness
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


def _reference(params, kwargs):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    return lion_pytorch.Lion(params, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_matches_lion_pytorch(case):
    hp, kwargs = CASES[case]
    params = harness.initial_params(SHAPES)
    refs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = _reference(refs, kwargs)
    # decoupled: the reference divides by the lr it was built with, then steps with a smaller one.
    for group in opt.param_groups:
        group["lr"] = hp.get("lr", group["lr"])
    driver = harness.Driver(Lion(), params, [hp], harness.whole(SHAPES))
    for step in range(1, 101):
        grads = harness.gradients(SHAPES, step)
        for p, g in zip(refs, grads):
            p.grad = g
        opt.step()
        driver.step(grads)
    for i, p in enumerate(refs):
        rtol, atol = TOLERANCES["theta"]
        torch.testing.assert_close(driver.params[i], p.detach(), rtol=rtol, atol=atol)
        rtol, atol = TOLERANCES["exp_avg"]
        torch.testing.assert_close(driver.export(i)["exp_avg"], opt.state[p]["exp_avg"], rtol=rtol, atol=atol)


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
    refs = [torch.nn.Parameter(p.clone()) for p in ours.params]
    opt = _reference(refs, {"lr": 1e-3})
    state = {"state": {i: ours.export(i) for i in range(len(SHAPES))},
             "param_groups": [{**opt.state_dict()["param_groups"][0]}]}
    assert all(set(entry) == {"exp_avg"} for entry in state["state"].values())
    opt.load_state_dict(state)
    fresh = harness.Driver(Lion(), ours.params, [{"lr": 1e-3}], harness.split(SHAPES, 1))
    for i, p in enumerate(refs):
        fresh.load(i, {**opt.state_dict()["state"][i], "step": torch.tensor(0.0)})
    for step in range(6, 9):
        grads = harness.gradients(SHAPES, step)
        for p, g in zip(refs, grads):
            p.grad = g
        opt.step()
        fresh.step(grads)
    for i, p in enumerate(refs):
        assert torch.equal(fresh.params[i], p.detach())


def test_rejects_bad_hyperparameters():
    lion = Lion()
    assert "beta1 must be in [0, 1]" in lion.validate({"beta1": 1.5})
    assert "lr must be > 0" in lion.validate({"lr": 0.0})
    assert lion.validate({"beta2": 1.0}) is None  # the reference accepts 1
