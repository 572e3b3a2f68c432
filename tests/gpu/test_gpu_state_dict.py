"""state_dict() and load_state_dict() with CUDA parameters: the daemon flushes what the GPU holds (small
state, cached pages) before export and forgets its device copies after import (stated.store calls
backend.flush / backend.invalidate), with and without the GPU cache.

A run split by a save and a load into a new optimizer gives the same bits as the run without the
break; a stated checkpoint continues in torch.optim.AdamW on CUDA and the other way round, within
test_gpu_parity's tolerances (Note [GPU tolerances]).
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

import stated  # noqa: E402
from gpu_helpers import assert_states_close, gradients, initial, parameters, run, unique  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
STEPS = 10


@pytest.mark.parametrize("which", ["gpu_daemon", "gpu_cache_daemon"])
@pytest.mark.parametrize("cls,kwargs", [(stated.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                        (stated.Adafactor, dict(lr=1e-2)),
                                        (stated.AdamW, dict(lr=1e-2, master_weights=True))],
                         ids=["adamw", "adafactor", "adamw-bf16-master"])
def test_a_save_and_load_in_the_middle_changes_no_bit(request, which, cls, kwargs):
    daemon = request.getfixturevalue(which)
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    values, grads = initial(), gradients(2 * STEPS)
    straight = parameters(values, CUDA, dtype)
    opt = cls(straight, address=daemon.address, job=unique("straight"), **kwargs)
    run(opt, straight, grads)

    split = parameters(values, CUDA, dtype)
    first = cls(split, address=daemon.address, job=unique("first"), **kwargs)
    run(first, split, grads[:STEPS])
    saved = first.state_dict()
    snapshot = [p.detach().clone() for p in split]
    run(first, split, grads[STEPS:STEPS + 2])  # the first optimizer moves on; the checkpoint must not
    first.close()
    resumed = [torch.nn.Parameter(v) for v in snapshot]
    second = cls(resumed, address=daemon.address, job=unique("second"), **kwargs)
    second.load_state_dict(saved)
    run(second, resumed, grads[STEPS:])
    for i, (p, q) in enumerate(zip(resumed, straight)):
        assert torch.equal(p, q), f"parameter {i}"
    a, b = second.state_dict()["state"], opt.state_dict()["state"]
    for i in b:
        for key, value in b[i].items():
            assert torch.equal(a[i][key], value), (i, key)
    assert float(saved["state"][0]["step"]) == STEPS
    second.close()
    opt.close()


def test_checkpoints_cross_between_stated_and_torch_on_cuda(gpu_daemon):
    values, grads = initial(), gradients(2 * STEPS)
    mine, theirs = parameters(values, CUDA), parameters(values, CUDA)
    opt = stated.AdamW(mine, lr=1e-2, address=gpu_daemon.address, job=unique("cross"))
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    run(opt, mine, grads[:STEPS])
    run(ref, theirs, grads[:STEPS])
    assert_states_close(opt.state_dict()["state"], ref.state_dict()["state"], 2e-5)
    # Swap: torch continues from stated's checkpoint and parameters, stated from torch's.
    ours_saved, theirs_saved = opt.state_dict(), ref.state_dict()
    ref.load_state_dict(ours_saved)
    opt.load_state_dict(theirs_saved)
    with torch.no_grad():
        for p, q in zip(mine, theirs):
            ours_value = p.detach().clone()
            p.copy_(q)
            q.copy_(ours_value)
    run(opt, mine, grads[STEPS:])
    run(ref, theirs, grads[STEPS:])
    for i, (p, q) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7, msg=lambda m: f"parameter {i}: {m}")
    opt.close()
