"""master_weights=True with bf16 and fp16 parameters on CUDA: the daemon keeps an fp32 master copy in its
pages, fills it from the parameters on the GPU the first time a page is used, and writes the rounded
parameters back into the trainer's buffer.

Ground truths: stated's CPU backend with the same 16-bit parameters (the same math, Note [master
weights] in stated.session), and the hand-made recipe with torch on CUDA: an fp32 copy stepped by
torch.optim.AdamW(fused=True) with the gradients cast to fp32, then rounded into the model.
Tolerances: fp32 master copies as test_gpu_parity's (Note [GPU tolerances]); the 16-bit parameters
are those copies rounded, so where two master values differ by an ulp they may round to neighbouring
16-bit values: one ulp of the 16-bit type (rtol 2**-7 for bf16, 2**-10 for fp16).
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

import stated  # noqa: E402
from gpu_helpers import gradients, initial, parameters, run, unique  # noqa: E402

pytestmark = pytest.mark.gpu

STEPS = 25
CUDA = torch.device("cuda")
HALF_RTOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def close(a, b, rtol, atol=1e-7, what=""):
    torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kwargs", [(stated.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                        (stated.SGD, dict(lr=0.1, momentum=0.9)),
                                        (stated.Lion, dict(lr=1e-3, weight_decay=0.1))],
                         ids=["adamw", "sgd", "lion"])
def test_master_weights_on_cuda_match_the_cpu_backend(gpu_daemon, dtype, cls, kwargs):
    values, grads = initial(), gradients(STEPS)
    on_cpu, on_gpu = parameters(values, "cpu", dtype), parameters(values, CUDA, dtype)
    cpu_opt = cls(on_cpu, master_weights=True, address=gpu_daemon.address, job=unique("mw-cpu"), **kwargs)
    gpu_opt = cls(on_gpu, master_weights=True, address=gpu_daemon.address, job=unique("mw-gpu"), **kwargs)
    run(cpu_opt, on_cpu, grads)
    run(gpu_opt, on_gpu, grads)
    for i, (p, q) in enumerate(zip(on_gpu, on_cpu)):
        assert p.dtype == dtype and p.is_cuda
        close(p, q, HALF_RTOL[dtype], what=f"parameter {i}")
    cpu_state, gpu_state = cpu_opt.state_dict()["state"], gpu_opt.state_dict()["state"]
    for i in cpu_state:
        assert gpu_state[i]["master_param"].dtype == torch.float32
        close(gpu_state[i]["master_param"], cpu_state[i]["master_param"], 2e-5, what=f"master {i}")
    cpu_opt.close()
    gpu_opt.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_match_the_recipe_with_torch_on_cuda(gpu_daemon, dtype):
    values, grads = initial(), gradients(STEPS)
    mine = parameters(values, CUDA, dtype)
    model = parameters(values, CUDA, dtype)
    master = [p.detach().float().clone().requires_grad_(True) for p in model]
    opt = stated.AdamW(mine, lr=1e-2, weight_decay=0.1, master_weights=True, address=gpu_daemon.address,
                       job=unique("mw-recipe"))
    ref = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.1, fused=True)
    for step_grads in grads:
        for p, m, g in zip(mine, master, step_grads):
            p.grad = g.to(CUDA, dtype)
            m.grad = g.to(CUDA, dtype).float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for p, m in zip(model, master):
                p.copy_(m)
    for i, (p, q) in enumerate(zip(mine, model)):
        close(p, q, HALF_RTOL[dtype], what=f"parameter {i}")
    state = opt.state_dict()["state"]
    for i, m in enumerate(master):
        close(state[i]["master_param"], m, 2e-5, what=f"master {i}")
    opt.close()


def test_master_copy_comes_from_the_parameters_after_a_load_without_it(gpu_daemon):
    """A state_dict without master_param (from torch) makes the daemon take the master copy from the
    parameters again, on the GPU, at the next step."""
    values, grads = initial(), gradients(4)
    mine = parameters(values, CUDA, torch.bfloat16)
    opt = stated.AdamW(mine, lr=1e-2, master_weights=True, address=gpu_daemon.address, job=unique("mw-load"))
    run(opt, mine, grads[:2])
    state = opt.state_dict()
    for entry in state["state"].values():
        del entry["master_param"]
    with torch.no_grad():
        for p in mine:
            p.add_(1.0)  # the parameters move; the master copy must follow them
    opt.load_state_dict(state)
    run(opt, mine, grads[2:3])
    after = opt.state_dict()["state"]
    for i, p in enumerate(mine):
        # One AdamW step from (parameter + 1) moves each value by at most lr (plus decay).
        assert (after[i]["master_param"] - p.detach().float().cpu()).abs().max() < 0.05
    opt.close()
