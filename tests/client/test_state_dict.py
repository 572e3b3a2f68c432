"""state_dict in torch's own format: round trips with torch.optim in both directions, mid-run, then
continuing identically (also through torch.save)."""

from __future__ import annotations

import io

import pytest
import torch

import stated

from test_parity import assert_same_run, data, groups, make_model, train  # noqa: E402

CASES = {
    "adamw": (stated.AdamW, torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.05), dict(lr=1e-3, amsgrad=False)),
    "adamw-amsgrad": (stated.AdamW, torch.optim.AdamW, dict(lr=3e-3, amsgrad=True), dict(lr=1e-3, amsgrad=True)),
    "adam": (stated.Adam, torch.optim.Adam, dict(lr=3e-3, weight_decay=0.01), dict(lr=1e-3)),
    "sgd-momentum": (stated.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9), dict(lr=0.01, momentum=0.5)),
}


def through_torch_save(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _hand_over(make_giver, m_giver, make_taker, m_taker, X, Y):
    """`make_giver(m_giver)` trains on X, Y under a StepLR; its parameters, its state_dict (through
    torch.save) and its scheduler's state go to `make_taker(m_taker)`. Returns both optimizers with
    their schedulers: (giver, sched), (taker, sched)."""
    giver = make_giver(m_giver)
    sched_giver = torch.optim.lr_scheduler.StepLR(giver, 30, 0.5)
    train(m_giver, giver, sched_giver, X, Y)
    with torch.no_grad():
        for p, q in zip(m_taker.parameters(), m_giver.parameters()):
            p.copy_(q)
    taker = make_taker(m_taker)
    taker.load_state_dict(through_torch_save(giver.state_dict()))
    sched_taker = torch.optim.lr_scheduler.StepLR(taker, 30, 0.5)
    sched_taker.load_state_dict(sched_giver.state_dict())
    return (giver, sched_giver), (taker, sched_taker)


@pytest.mark.parametrize("direction", ["torch_to_stated", "stated_to_torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_hands_over_mid_run(address, case, direction):
    """One side trains 60 steps, its state_dict loads into the other, both continue identically."""
    ours_cls, torch_cls, first, second = CASES[case]
    fused = {} if torch_cls is torch.optim.SGD else {"fused": True}

    def make_ours(model):
        return ours_cls(groups(model, first, second), address=address)

    def make_ref(model):
        return torch_cls(groups(model, first, second), **fused)

    X, Y = data(120)
    m_ours, m_ref = make_model(), make_model()
    if direction == "torch_to_stated":
        (ref, sched), (ours, sched_ours) = _hand_over(make_ref, m_ref, make_ours, m_ours, X[:60], Y[:60])
    else:
        (ours, sched_ours), (ref, sched) = _hand_over(make_ours, m_ours, make_ref, m_ref, X[:60], Y[:60])
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    assert_same_run(ours, ref, m_ours, m_ref)
    train(m_ref, ref, sched, X[60:], Y[60:])
    train(m_ours, ours, sched_ours, X[60:], Y[60:])
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


def _train_at_constant_lr(model, opt, X, Y):
    train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), X, Y)


def _trained_adamw(address, steps=5):
    """A model and the stated AdamW (lr 1e-2) that trained it for `steps` steps."""
    model = make_model()
    ours = stated.AdamW(model.parameters(), lr=1e-2, address=address)
    _train_at_constant_lr(model, ours, *data(steps))
    return model, ours


def test_state_dict_keys_and_types_match_torch(address):
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-3, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-3)
    X, Y = data(3)
    for model, opt in ((m_ours, ours), (m_ref, ref)):
        _train_at_constant_lr(model, opt, X, Y)
    a, b = ours.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entry in b["state"].items():
        for key, value in entry.items():
            assert a["state"][index][key].dtype == value.dtype
            assert a["state"][index][key].shape == value.shape
    assert float(a["state"][0]["step"]) == 3.0
    ours.close()


def test_load_resets_params_absent_from_the_state_dict(address):
    """torch's load_state_dict replaces all state: a param with no saved state starts afresh."""
    _, ours = _trained_adamw(address)
    fresh = torch.optim.AdamW(make_model().parameters(), lr=1e-2).state_dict()  # no state at all
    ours.load_state_dict(fresh)
    assert ours.state_dict()["state"] == {}
    ours.close()


def test_a_refused_load_changes_nothing(address):
    """load_state_dict is all or nothing: a bad entry anywhere leaves the daemon's state as it was."""
    _, ours = _trained_adamw(address)
    before = ours.state_dict()
    bad = ours.state_dict()
    bad["state"][3]["exp_avg"] = torch.zeros(7)  # the wrong size, after three good entries
    with pytest.raises(stated.StatedError, match="exp_avg"):
        ours.load_state_dict(bad)
    after = ours.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    ours.close()
