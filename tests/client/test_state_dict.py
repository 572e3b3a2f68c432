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


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_to_stated_mid_run(address, case):
    """torch.optim trains 60 steps, its state_dict loads into stated, both continue identically."""
    ours_cls, torch_cls, first, second = CASES[case]
    fused = {} if torch_cls is torch.optim.SGD else {"fused": True}
    X, Y = data(120)
    m_ref, m_ours = make_model(), make_model()
    ref = torch_cls(groups(m_ref, first, second), **fused)
    sched = torch.optim.lr_scheduler.StepLR(ref, 30, 0.5)
    train(m_ref, ref, sched, X[:60], Y[:60])
    with torch.no_grad():
        for p, q in zip(m_ours.parameters(), m_ref.parameters()):
            p.copy_(q)
    ours = ours_cls(groups(m_ours, first, second), address=address)
    ours.load_state_dict(through_torch_save(ref.state_dict()))
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, 30, 0.5)
    sched_ours.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    assert_same_run(ours, ref, m_ours, m_ref)
    train(m_ref, ref, sched, X[60:], Y[60:])
    train(m_ours, ours, sched_ours, X[60:], Y[60:])
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_stated_to_torch_mid_run(address, case):
    """stated trains 60 steps, its state_dict loads into torch.optim, both continue identically."""
    ours_cls, torch_cls, first, second = CASES[case]
    fused = {} if torch_cls is torch.optim.SGD else {"fused": True}
    X, Y = data(120)
    m_ours, m_ref = make_model(), make_model()
    ours = ours_cls(groups(m_ours, first, second), address=address)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, 30, 0.5)
    train(m_ours, ours, sched_ours, X[:60], Y[:60])
    with torch.no_grad():
        for p, q in zip(m_ref.parameters(), m_ours.parameters()):
            p.copy_(q)
    ref = torch_cls(groups(m_ref, first, second), **fused)
    ref.load_state_dict(through_torch_save(ours.state_dict()))
    sched = torch.optim.lr_scheduler.StepLR(ref, 30, 0.5)
    sched.load_state_dict(sched_ours.state_dict())
    assert_same_run(ours, ref, m_ours, m_ref)
    train(m_ref, ref, sched, X[60:], Y[60:])
    train(m_ours, ours, sched_ours, X[60:], Y[60:])
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


def test_state_dict_keys_and_types_match_torch(address):
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-3, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-3)
    X, Y = data(3)
    for model, opt in ((m_ours, ours), (m_ref, ref)):
        train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), X, Y)
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
    model = make_model()
    ours = stated.AdamW(model.parameters(), lr=1e-2, address=address)
    X, Y = data(5)
    train(model, ours, torch.optim.lr_scheduler.LambdaLR(ours, lambda i: 1.0), X, Y)
    fresh = torch.optim.AdamW(make_model().parameters(), lr=1e-2).state_dict()  # no state at all
    ours.load_state_dict(fresh)
    assert ours.state_dict()["state"] == {}
    ours.close()


def test_a_refused_load_changes_nothing(address):
    """load_state_dict is all or nothing: a bad entry anywhere leaves the daemon's state as it was."""
    model = make_model()
    ours = stated.AdamW(model.parameters(), lr=1e-2, address=address)
    X, Y = data(5)
    train(model, ours, torch.optim.lr_scheduler.LambdaLR(ours, lambda i: 1.0), X, Y)
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
