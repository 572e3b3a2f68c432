"""Training parity on CUDA parameters: stated's CUDA backend against torch.optim on CUDA, and against
stated's own CPU backend for every algorithm (the CPU kernels are tested against the references, so they
are the ground truth for the CUDA kernels: STYLE.md point 6).

Note [GPU tolerances]: with fixed gradients (gradients/initial in gpu_helpers) each run is a sum of
per-step updates, so differences do not compound through a forward pass. Per step, the CUDA kernels
and torch's fused CUDA Adam differ by a few fp32 ulps (m as ATen's lerp against a multiply-add, bias
corrections rounded once from float64 against computed in float32, sqrt(v)/bc2 against a fused
form): at most about 4 ulps (5e-7 relative) of an update per step, so after 30 steps rtol 2e-5 on
parameters and state holds with a wide margin, and atol covers values near 0 (1e-7 on parameters
of size ~0.1; a millionth of each state tensor's largest value). SGD is a multiply-add per element
on both sides. Whole-tensor reductions (Adafactor, CAME) differ from the CPU module by summation
order only (rtol 1e-4); AdamW8bit's codes equal the CPU's except where a value lands within
rounding of a code midpoint, which moves that element's update by about one code step (atol 5e-5
after 30 steps of lr 1e-3).
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

import stated  # noqa: E402
from gpu_helpers import (  # noqa: E402
    assert_states_close, batches, gradients, initial, lm_loss, parameters, run, tiny_model, unique,
)

pytestmark = pytest.mark.gpu

STEPS = 30
CUDA = torch.device("cuda")
RTOL, ATOL = 2e-5, 1e-7

TORCH_CASES = {
    "adamw": (stated.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), dict(fused=True)),
    "adamw-amsgrad": (stated.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, betas=(0.8, 0.99)),
                      dict(fused=True)),
    "adamw-maximize": (stated.AdamW, torch.optim.AdamW, dict(lr=3e-3, maximize=True), dict(fused=True)),
    "adam-l2": (stated.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01), dict(fused=True)),
    "sgd": (stated.SGD, torch.optim.SGD, dict(lr=0.1), {}),
    "sgd-momentum": (stated.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3), {}),
    "sgd-nesterov": (stated.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), {}),
}


def assert_params_close(mine, theirs, rtol=RTOL, atol=ATOL) -> None:
    for i, (p, q) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(p.detach().float().cpu(), q.detach().float().cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_optim_on_cuda(gpu_daemon, case):
    ours_cls, torch_cls, kwargs, torch_only = TORCH_CASES[case]
    values, grads = initial(), gradients(STEPS)
    mine, theirs = parameters(values, CUDA), parameters(values, CUDA)
    opt = ours_cls(mine, address=gpu_daemon.address, job=unique(case), **kwargs)
    ref = torch_cls(theirs, **kwargs, **torch_only)
    # Tensor 4 has no gradient on two steps: both sides skip it (has_grad), the others step.
    skip = {5: {4}, 6: {4, 1}}
    run(opt, mine, grads, skip)
    run(ref, theirs, grads, skip)
    assert_params_close(mine, theirs)
    ours_state = opt.state_dict()["state"]
    assert_states_close(ours_state, ref.state_dict()["state"], RTOL)
    opt.close()


# Each algorithm on CUDA against the same algorithm on the CPU backend (same daemon, same inputs).
CPU_CASES = {
    "adamw": (stated.AdamW, dict(lr=1e-2, weight_decay=0.05), RTOL, ATOL),
    "adam": (stated.Adam, dict(lr=1e-2, amsgrad=True), RTOL, ATOL),
    "sgd": (stated.SGD, dict(lr=0.1, momentum=0.9), RTOL, ATOL),
    "lion": (stated.Lion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), RTOL, ATOL),
    "lion-decoupled": (stated.Lion, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), RTOL, ATOL),
    "adafactor": (stated.Adafactor, dict(lr=1e-2, weight_decay=0.01), 1e-4, 1e-6),
    "came": (stated.CAME, dict(lr=2e-4, weight_decay=0.01), 1e-4, 1e-6),
    "adamw8bit": (stated.AdamW8bit, dict(lr=1e-3), 1e-3, 5e-5),
    "slimadam": (stated.SlimAdam, dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), 1e-4, 1e-6),
}
NAMES = ["layers.0.attn.c_attn.weight", "layers.0.attn.c_attn.bias", "layers.0.mlp.c_fc.weight",
         "layers.0.mlp.c_fc.bias", "layers.0.mlp.c_proj.weight", "lm_head.bias", "layers.1.mlp.c_fc.weight"]


@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_cuda_backend_matches_cpu_backend(gpu_daemon, case):
    cls, kwargs, rtol, atol = CPU_CASES[case]
    values, grads = initial(), gradients(STEPS)
    on_cpu, on_gpu = parameters(values, "cpu"), parameters(values, CUDA)

    def make(params, tag):
        given = list(zip(NAMES, params)) if cls is stated.SlimAdam else params
        return cls(given, address=gpu_daemon.address, job=unique(f"{case}-{tag}"), **kwargs)

    cpu_opt, gpu_opt = make(on_cpu, "cpu"), make(on_gpu, "gpu")
    run(cpu_opt, on_cpu, grads)
    run(gpu_opt, on_gpu, grads)
    assert_params_close(on_gpu, on_cpu, rtol, atol)
    cpu_state, gpu_state = cpu_opt.state_dict()["state"], gpu_opt.state_dict()["state"]
    assert gpu_state.keys() == cpu_state.keys()
    if case != "adamw8bit":  # its codes may differ by one step near a midpoint (Note [GPU tolerances])
        assert_states_close(gpu_state, cpu_state, rtol, atol_fraction=1e-5)
    for index in cpu_state:  # Lion (as lion-pytorch) and SGD (as torch) keep no step count
        assert ("step" in gpu_state[index]) == ("step" in cpu_state[index]), index
        if "step" in cpu_state[index]:
            assert float(gpu_state[index]["step"]) == float(cpu_state[index]["step"])
    cpu_opt.close()
    gpu_opt.close()


def test_param_groups_and_a_scheduler(gpu_daemon):
    """Two groups with their own hyperparameters, changed every step by a scheduler."""
    values, grads = initial(), gradients(STEPS)
    mine, theirs = parameters(values, CUDA), parameters(values, CUDA)

    def grouped(ps):
        return [{"params": ps[:3], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[3:], "lr": 3e-3}]

    opt = stated.AdamW(grouped(mine), address=gpu_daemon.address, job=unique("groups"))
    ref = torch.optim.AdamW(grouped(theirs), fused=True)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (opt, ref)]
    for step_grads in grads:
        for ps, o, s in ((mine, opt, sched[0]), (theirs, ref, sched[1])):
            for p, g in zip(ps, step_grads):
                p.grad = g.to(CUDA)
            o.step()
            s.step()
    assert_params_close(mine, theirs)
    opt.close()


def test_training_a_small_transformer_matches_torch(gpu_daemon):
    """Forward and backward on the GPU, the optimizer in the daemon: the loss curve and the weights
    follow torch.optim.AdamW(fused=True). The trajectories feed the parameters back into the gradients,
    so ulp-level differences grow a little: rtol 1e-4 after 40 steps."""
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = stated.AdamW(ours_model.parameters(), lr=3e-3, weight_decay=0.01, address=gpu_daemon.address,
                        job=unique("tiny"))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=0.01, fused=True)
    data = batches(40)
    losses = []
    for tokens in data:
        pair = []
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=False)
            loss = lm_loss(model, tokens)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    assert losses[-1][0] < 0.8 * losses[0][0], losses
    for a, b in losses:
        assert a == pytest.approx(b, rel=1e-4)
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()), rtol=1e-4, atol=1e-5)
    ours.close()

