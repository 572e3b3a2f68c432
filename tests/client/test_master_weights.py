"""master_weights=True: bf16/fp16 parameters in the trainer, an fp32 master copy in the daemon's pages.

The reference is the usual mixed-precision recipe done by hand: an fp32 copy of the parameters stepped
by torch.optim.AdamW(fused=True) with the gradients cast to fp32, then rounded back into the model.
"""

from __future__ import annotations

import pytest
import torch

import stated


def make(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_match_the_hand_made_recipe(address, dtype):
    ours_model, ref_model = make(dtype), make(dtype)
    ours = stated.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.1, master_weights=True, address=address)
    master = [p.detach().float().clone().requires_grad_(True) for p in ref_model.parameters()]
    ref = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        x, y = torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 4, generator=g).to(dtype)
        for model in (ours_model, ref_model):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        for m, p in zip(master, ref_model.parameters()):
            m.grad = p.grad.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            for m, p in zip(master, ref_model.parameters()):
                p.copy_(m)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert p.dtype == dtype
        assert torch.equal(p, q)
    state = ours.state_dict()["state"]
    for i, m in enumerate(master):
        assert state[i]["master_param"].dtype == torch.float32
        assert torch.equal(state[i]["master_param"], m.detach())
        assert torch.equal(state[i]["exp_avg"], ref.state_dict()["state"][i]["exp_avg"])
    # A round trip keeps the fp32 master copies exact (torch would cast them to the parameter dtype).
    ours.load_state_dict(ours.state_dict())
    again = ours.state_dict()["state"]
    for i in state:
        assert torch.equal(again[i]["master_param"], state[i]["master_param"])
    ours.close()


def test_half_parameters_without_master_weights_are_refused(address):
    with pytest.raises(stated.InvalidArgumentError, match="master_weights"):
        stated.AdamW(make(torch.bfloat16).parameters(), address=address)


def test_master_weights_work_for_memory_lean_algorithms(address):
    model = make(torch.bfloat16)
    opt = stated.Lion(model.parameters(), lr=1e-3, master_weights=True, address=address)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16).bfloat16()).float().square().mean().backward()
        opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt.close()
