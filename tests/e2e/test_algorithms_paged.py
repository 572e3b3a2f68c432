"""Every algorithm through the daemon, paged at 25% of its state, gives exactly the unpaged results.

The model has 1-D, 2-D and 3-D parameters, and pages of 64 KiB cut its tensors into several segments,
so segmentation, staging buffers and state files all take part.
"""

from __future__ import annotations

import pytest
import torch

import stated
from support.daemon import DaemonProcess

PAGE = 64 << 10


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(64, 256)  # 2-D weight (a SlimAdam rule) and a 1-D bias
        self.experts = torch.nn.Parameter(torch.randn(4, 256, 64) * 0.05)  # 3-D
        self.lm_head = torch.nn.Linear(64, 8, bias=False)

    def forward(self, x):
        h = torch.tanh(self.q_proj(x))
        h = torch.einsum("bd,edk->bk", h, self.experts) / 4
        return self.lm_head(h)


ALGORITHMS = {
    "adamw": (stated.AdamW, dict(lr=1e-3)),
    "sgd": (stated.SGD, dict(lr=1e-2, momentum=0.9)),
    "adamw8bit": (stated.AdamW8bit, dict(lr=1e-3)),
    "adafactor": (stated.Adafactor, dict(lr=1e-2)),
    "came": (stated.CAME, dict(lr=2e-4, weight_decay=1e-2)),
    "lion": (stated.Lion, dict(lr=1e-4, weight_decay=0.1)),
    "slimadam": (stated.SlimAdam, dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
}


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    budget = 8 * sum(p.numel() for p in Mixed().parameters()) // 4
    proc = DaemonProcess(tmp_path_factory.mktemp("paged"), "--host-memory", str(budget), "--page-size", str(PAGE))
    proc.start()
    yield proc
    proc.stop()
    assert proc.leaked_segments() == []


def run(address, name, steps=30):
    cls, kwargs = ALGORITHMS[name]
    model = Mixed()
    params = model.named_parameters() if cls is stated.SlimAdam else model.parameters()
    opt = cls(params, address=address, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    state = opt.state_dict()["state"]
    opt.close()
    return [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_paged_equals_unpaged(paged, daemon, name):
    params_paged, state_paged = run(paged.address, name)
    params_flat, state_flat = run(daemon.address, name)
    for p, q in zip(params_paged, params_flat):
        assert torch.equal(p, q)
    assert state_paged.keys() == state_flat.keys()
    for index, entry in state_flat.items():
        for key, value in entry.items():
            assert torch.equal(state_paged[index][key], value), f"state[{index}][{key!r}]"
