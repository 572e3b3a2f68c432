"""The torch.optim features a training loop relies on, each against torch.optim itself."""

from __future__ import annotations

import pytest
import torch

import stated
from stated_client import arenas

from test_parity import assert_same_run, data, make_model


def run_both(address, build, loop, steps: int = 30):
    """Builds the same model twice, one with stated and one with torch's fused AdamW, runs `loop` on both."""
    m_ours, m_ref = make_model(), make_model()
    ours = build(m_ours, lambda params, **kw: stated.AdamW(params, address=address, **kw))
    ref = build(m_ref, lambda params, **kw: torch.optim.AdamW(params, fused=True, **kw))
    X, Y = data(steps)
    for i in range(steps):
        loop(m_ours, ours, X, Y, i)
        loop(m_ref, ref, X, Y, i)
    assert_same_run(ours, ref, m_ours, m_ref)
    return ours, ref, m_ours, m_ref


def plain_step(model, opt, X, Y, i):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X[i]), Y[i]).backward()
    opt.step()


def test_frozen_params_are_never_stepped(address):
    def build(model, make):
        model[0].weight.requires_grad_(False)
        return make(model.parameters(), lr=1e-2)

    ours, ref, m_ours, _ = run_both(address, build, plain_step)
    assert torch.equal(m_ours[0].weight, make_model()[0].weight)
    frozen_index = 0
    assert frozen_index not in ours.state_dict()["state"]
    ours.close()


def test_params_without_grad_in_a_step_are_skipped(address):
    """Every other step the last layer gets no gradient: no decay, no moment update, no step count."""

    def loop(model, opt, X, Y, i):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(X[i]), Y[i]).backward()
        if i % 2:
            model[4].weight.grad = None
            model[4].bias.grad = None
        opt.step()

    ours, *_ = run_both(address, lambda m, make: make(m.parameters(), lr=1e-2, weight_decay=0.1), loop)
    assert float(ours.state_dict()["state"][4]["step"]) == 15.0
    ours.close()


def test_add_param_group_midway(address):
    def build(model, make):
        opt = make([model[0].weight, model[0].bias], lr=1e-2)
        opt.later = [p for i, p in enumerate(model.parameters()) if i >= 2]
        return opt

    def loop(model, opt, X, Y, i):
        if i == 10:
            opt.add_param_group({"params": opt.later, "lr": 3e-3, "weight_decay": 0.0})
        plain_step(model, opt, X, Y, i)

    ours, *_ = run_both(address, build, loop)
    assert len(ours.param_groups) == 2
    ours.close()


def test_closure_is_called_with_grad_enabled(address):
    def loop(model, opt, X, Y, i):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[i]), Y[i])
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss is not None and loss.requires_grad

    ours, *_ = run_both(address, lambda m, make: make(m.parameters(), lr=1e-2), loop)
    ours.close()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_either_way(address, set_to_none):
    def loop(model, opt, X, Y, i):
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in model.parameters())
        elif i:
            assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
        torch.nn.functional.mse_loss(model(X[i]), Y[i]).backward()
        opt.step()

    ours, *_ = run_both(address, lambda m, make: make(m.parameters(), lr=1e-2), loop)
    ours.close()


def test_steady_state_gradients_are_views_of_the_grad_arena(address):
    """With zero_grad(set_to_none=False), autograd accumulates into the arena: nothing is copied."""
    model = make_model()
    opt = stated.AdamW(model.parameters(), lr=1e-2, address=address)
    X, Y = data(4)
    for i in range(4):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(X[i]), Y[i]).backward()
        opt.step()
        for p, view in zip(opt._params, opt._grad_views):
            assert arenas.is_view_of(p.grad, view)
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.mse_loss(model(X[0]), Y[0]).backward()
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers
    opt.close()


def test_params_are_views_of_the_param_arena(address):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = stated.AdamW(model.parameters(), address=address)
    assert len(opt._arenas) == 2
    base = opt._arenas[0]
    start, end = base.data_ptr(), base.data_ptr() + base.numel()
    for p, old in zip(model.parameters(), before):
        assert start <= p.data_ptr() < end
        assert torch.equal(p, old)
    opt.close()


def test_clip_grad_norm_before_step(address):
    def loop(model, opt, X, Y, i):
        opt.zero_grad()
        (100 * torch.nn.functional.mse_loss(model(X[i]), Y[i])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        opt.step()

    ours, *_ = run_both(address, lambda m, make: make(m.parameters(), lr=1e-2), loop)
    ours.close()


def test_grad_scaler(address):
    """torch.amp.GradScaler unscales in place (into the arena) and skips steps with inf gradients."""
    scalers = {}

    def loop(model, opt, X, Y, i):
        scaler = scalers.setdefault(id(opt), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=5))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[i]), Y[i])
        if i == 7:
            loss = loss * float("inf")  # an overflow: the scaler must skip this step on both sides
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    ours, ref, *_ = run_both(address, lambda m, make: make(m.parameters(), lr=1e-2), loop)
    assert float(ours.state_dict()["state"][0]["step"]) == 29.0
    ours.close()
