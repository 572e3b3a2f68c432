"""Clipping and mixed precision in the daemon's pre-pass on the GPU (Note [gradient checks] in
stated.backends.base): the scenarios of tests/support/grad_checks.py against torch.optim.AdamW(fused=True)
on CUDA.

The daemon sums squares per tensor in float64 where torch takes fp32 per-tensor norms and a norm of
norms, and it applies (1/scale) x clip coefficient as one fp32 factor inside the kernels where torch
multiplies twice: the norms agree to about 1e-6 relative and the runs, whose gradients come from the
model (the trajectories feed back), to rtol 1e-4 after 24 steps.
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

import stated  # noqa: E402
from gpu_helpers import unique  # noqa: E402
from support import grad_checks  # noqa: E402

pytestmark = pytest.mark.gpu

STEPS = 24
CUDA = torch.device("cuda")


def model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 3)).to(CUDA)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 8, generator=g).to(CUDA), torch.randn(STEPS, 16, 3, generator=g).to(CUDA)


def loss_of(m, X, Y, i):
    return 100 * torch.nn.functional.mse_loss(m(X[i]), Y[i])


def assert_same(m_ours, m_ref, rtol=1e-4, atol=1e-6):
    for i, (p, q) in enumerate(zip(m_ours.parameters(), m_ref.parameters())):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("case", ["max_grad_norm", "grad_scaler", "grad_scaler_and_max_grad_norm"])
def test_gradient_checks_match_torch(gpu_daemon, case):
    daemon_side, scenario = grad_checks.SCENARIOS[case]
    m_ours, m_ref = model(), model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, address=gpu_daemon.address, job=unique(case), **daemon_side)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    scenario(grad_checks.Sides(ours, ref, m_ours, m_ref, *data(), device="cuda", rel=1e-5))
    assert_same(m_ours, m_ref)
    ours.close()


def test_a_nan_gradient_skips_the_step_and_changes_nothing(gpu_daemon):
    m = model()
    opt = stated.AdamW(m.parameters(), lr=1e-2, max_grad_norm=1.0, address=gpu_daemon.address, job=unique("nan"))
    X, Y = data()
    loss_of(m, X, Y, 0).backward()
    opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    state_before = opt.state_dict()["state"]
    opt.zero_grad()
    loss_of(m, X, Y, 1).backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
    state_after = opt.state_dict()["state"]
    for i in state_before:
        for key, value in state_before[i].items():
            assert torch.equal(state_after[i][key], value), (i, key)
    opt.close()
