"""Clipping and mixed precision in the daemon's pre-pass (Note [gradient checks] in stated.backends.base):
the scenarios of tests/support/grad_checks.py against torch.optim.AdamW(fused=True). Tolerances are
test_parity's (rtol 1e-6): the daemon computes the norm with the same fp32 per-tensor norms and norm
of norms as clip_grad_norm_, and its clip coefficient differs from torch's fp32 division by at most
one rounding.
"""

from __future__ import annotations

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.errors import InvalidArgumentError
from support import grad_checks

from test_parity import assert_same_run, data, make_model

STEPS = 24


@pytest.mark.parametrize("case", grad_checks.SCENARIOS)
def test_gradient_checks_match_torch(address, case):
    daemon_side, scenario = grad_checks.SCENARIOS[case]
    m_ours, m_ref = make_model(), make_model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, address=address, **daemon_side)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    scenario(grad_checks.Sides(ours, ref, m_ours, m_ref, *data(STEPS), device="cpu", rel=1e-6))
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
