"""Clipping and mixed precision in the daemon's pre-pass (Note [gradient checks] in stated.backends.base).

The reference is torch's own recipe in the trainer: `scaler.unscale_(opt)`,
`torch.nn.utils.clip_grad_norm_(params, max_norm)`, `scaler.step(opt)`, `scaler.update()`, with
torch.optim.AdamW(fused=True). stated gets only `max_grad_norm=` and `scaler.step(opt)`: the daemon
unscales, measures, clips and skips. Tolerances are test_parity's (rtol 1e-6): the daemon computes the
norm with the same fp32 per-tensor norms and norm of norms as clip_grad_norm_, and its clip coefficient
differs from torch's fp32 division by at most one rounding.
"""

from __future__ import annotations

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.errors import InvalidArgumentError

from test_parity import assert_same_run, data, make_model

STEPS = 24
INF_STEP = 7  # an overflow: both sides must skip it and halve the scale


def _loss(model, X, Y, i):
    loss = 100 * torch.nn.functional.mse_loss(model(X[i]), Y[i])  # large gradients: clipping bites
    return loss * float("inf") if i == INF_STEP else loss


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)


def _scaled_step(opt, model, scaler, X, Y, i):
    """torch's GradScaler recipe without unscale_: scale, backward, scaler.step, scaler.update."""
    opt.zero_grad()
    scaler.scale(_loss(model, X, Y, i)).backward()
    scaler.step(opt)
    scaler.update()


def test_max_grad_norm_matches_clip_grad_norm(address):
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, max_grad_norm=0.5, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    X, Y = data(STEPS)
    clipped = 0
    for i in range(STEPS):
        ours.zero_grad()
        (100 * torch.nn.functional.mse_loss(m_ours(X[i]), Y[i])).backward()
        ours.step()
        ref.zero_grad()
        (100 * torch.nn.functional.mse_loss(m_ref(X[i]), Y[i])).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(m_ref.parameters(), max_norm=0.5))
        ref.step()
        clipped += norm > 0.5
        assert ours.last_grad_norm == pytest.approx(norm, rel=1e-6), f"step {i}"
        assert not ours.last_step_skipped
    assert clipped > STEPS // 2, "the test must exercise clipping"
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


def test_grad_scaler_unscales_and_skips_in_the_daemon(address):
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    s_ours, s_ref = _scaler(), _scaler()
    X, Y = data(STEPS)
    for i in range(STEPS):
        _scaled_step(ours, m_ours, s_ours, X, Y, i)
        _scaled_step(ref, m_ref, s_ref, X, Y, i)
        assert ours.last_step_skipped == (i == INF_STEP)
        assert s_ours.get_scale() == s_ref.get_scale(), f"step {i}: the scalers' scales diverged"
    assert s_ours.get_scale() != 2.0 ** 12, "the scale must have moved (growth and the inf backoff)"
    assert float(ours.state_dict()["state"][0]["step"]) == STEPS - 1
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


def test_grad_scaler_and_max_grad_norm_together(address):
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, max_grad_norm=1.0, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    s_ours, s_ref = _scaler(), _scaler()
    X, Y = data(STEPS)
    for i in range(STEPS):
        _scaled_step(ours, m_ours, s_ours, X, Y, i)  # unscaling and clipping happen in the daemon
        ref.zero_grad()
        s_ref.scale(_loss(m_ref, X, Y, i)).backward()
        s_ref.unscale_(ref)
        norm = float(torch.nn.utils.clip_grad_norm_(m_ref.parameters(), max_norm=1.0))
        s_ref.step(ref)
        s_ref.update()
        if i != INF_STEP:
            assert ours.last_grad_norm == pytest.approx(norm, rel=1e-6), f"step {i}"
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


def test_trainer_side_unscale_still_works(address):
    """The classic recipe (unscale_, clip in the trainer, scaler.step) on a stated optimizer."""
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, address=address)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    s_ours, s_ref = _scaler(), _scaler()
    X, Y = data(STEPS)
    for i in range(STEPS):
        for model, opt, scaler in ((m_ours, ours, s_ours), (m_ref, ref, s_ref)):
            opt.zero_grad()
            scaler.scale(_loss(model, X, Y, i)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            scaler.step(opt)
            scaler.update()
        assert ours.last_step_skipped == (i == INF_STEP)
    assert_same_run(ours, ref, m_ours, m_ref)
    ours.close()


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_max_grad_norm_is_refused_in_the_client(address, value):
    with pytest.raises(InvalidArgumentError, match="max_grad_norm"):
        stated.AdamW([torch.nn.Parameter(torch.zeros(4))], max_grad_norm=value, address=address)


@pytest.mark.parametrize("field,value", [("grad_scale", -1.0), ("grad_scale", float("nan")),
                                         ("max_grad_norm", float("inf")), ("max_grad_norm", -0.5)])
def test_bad_step_scalars_are_refused_by_the_daemon(address, field, value):
    p = torch.nn.Parameter(torch.ones(8))
    opt = stated.AdamW([p], address=address)
    p.grad = torch.ones(8)
    before = p.detach().clone()
    stub = opt._connection.stub
    groups = [opt._hyperparameters(g) for g in opt.param_groups]
    with pytest.raises(grpc.RpcError) as info:
        stub.Step(pb.StepRequest(session=opt._session, step=1, groups=groups, has_grad=b"\x01", **{field: value}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert torch.equal(p.detach(), before)
    opt.step()  # the session still serves, at step 1
    assert not torch.equal(p.detach(), before)
    opt.close()
