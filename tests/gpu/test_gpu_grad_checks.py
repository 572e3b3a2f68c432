"""Clipping and mixed precision in the daemon's pre-pass on the GPU (Note [gradient checks] in
stated.backends.base): stated gets `max_grad_norm=` and `scaler.step(opt)`; torch gets its own recipe,
`scaler.unscale_(opt)`, `clip_grad_norm_`, `scaler.step(opt)`, `scaler.update()` with
torch.optim.AdamW(fused=True) on CUDA.

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

pytestmark = pytest.mark.gpu

STEPS = 24
INF_STEP = 7
CUDA = torch.device("cuda")


def model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 3)).to(CUDA)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 8, generator=g).to(CUDA), torch.randn(STEPS, 16, 3, generator=g).to(CUDA)


def loss_of(m, X, Y, i, inf=True):
    loss = 100 * torch.nn.functional.mse_loss(m(X[i]), Y[i])
    return loss * float("inf") if inf and i == INF_STEP else loss


def scaler():
    return torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=5)


def assert_same(m_ours, m_ref, rtol=1e-4, atol=1e-6):
    for i, (p, q) in enumerate(zip(m_ours.parameters(), m_ref.parameters())):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=lambda m: f"parameter {i}: {m}")


def test_max_grad_norm_matches_clip_grad_norm(gpu_daemon):
    m_ours, m_ref = model(), model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, max_grad_norm=0.5, address=gpu_daemon.address,
                        job=unique("clip"))
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    X, Y = data()
    clipped = 0
    for i in range(STEPS):
        ours.zero_grad()
        loss_of(m_ours, X, Y, i, inf=False).backward()
        ours.step()
        ref.zero_grad()
        loss_of(m_ref, X, Y, i, inf=False).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(m_ref.parameters(), max_norm=0.5))
        ref.step()
        clipped += norm > 0.5
        assert ours.last_grad_norm == pytest.approx(norm, rel=1e-5), f"step {i}"
        assert not ours.last_step_skipped
    assert clipped > STEPS // 2, "the test must exercise clipping"
    assert_same(m_ours, m_ref)
    ours.close()


def test_grad_scaler_unscales_and_skips_in_the_daemon(gpu_daemon):
    m_ours, m_ref = model(), model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, address=gpu_daemon.address, job=unique("scaler"))
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    s_ours, s_ref = scaler(), scaler()
    X, Y = data()
    for i in range(STEPS):
        for m, opt, s in ((m_ours, ours, s_ours), (m_ref, ref, s_ref)):
            opt.zero_grad()
            s.scale(loss_of(m, X, Y, i)).backward()
            s.step(opt)
            s.update()
        assert ours.last_step_skipped == (i == INF_STEP)
        assert s_ours.get_scale() == s_ref.get_scale(), f"step {i}: the scalers' scales diverged"
    assert float(ours.state_dict()["state"][0]["step"]) == STEPS - 1
    assert_same(m_ours, m_ref)
    ours.close()


def test_grad_scaler_and_max_grad_norm_together(gpu_daemon):
    m_ours, m_ref = model(), model()
    ours = stated.AdamW(m_ours.parameters(), lr=1e-2, max_grad_norm=1.0, address=gpu_daemon.address,
                        job=unique("scaler-clip"))
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    s_ours, s_ref = scaler(), scaler()
    X, Y = data()
    for i in range(STEPS):
        ours.zero_grad()
        s_ours.scale(loss_of(m_ours, X, Y, i)).backward()
        s_ours.step(ours)
        s_ours.update()
        ref.zero_grad()
        s_ref.scale(loss_of(m_ref, X, Y, i)).backward()
        s_ref.unscale_(ref)
        norm = float(torch.nn.utils.clip_grad_norm_(m_ref.parameters(), max_norm=1.0))
        s_ref.step(ref)
        s_ref.update()
        if i != INF_STEP:
            assert ours.last_grad_norm == pytest.approx(norm, rel=1e-5), f"step {i}"
        assert ours.last_step_skipped == (i == INF_STEP)
    assert_same(m_ours, m_ref)
    ours.close()


def test_a_nan_gradient_skips_the_step_and_changes_nothing(gpu_daemon):
    m = model()
    opt = stated.AdamW(m.parameters(), lr=1e-2, max_grad_norm=1.0, address=gpu_daemon.address, job=unique("nan"))
    X, Y = data()
    loss_of(m, X, Y, 0, inf=False).backward()
    opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    state_before = opt.state_dict()["state"]
    opt.zero_grad()
    loss_of(m, X, Y, 1, inf=False).backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
    state_after = opt.state_dict()["state"]
    for i in state_before:
        for key, value in state_before[i].items():
            assert torch.equal(state_after[i][key], value), (i, key)
    opt.close()
