"""Hyperparameter checks the algorithms share, through the client: the daemon refuses a negative
weight decay for every algorithm (AdamW8bit and CAME once lost the check with copied tables)."""

from __future__ import annotations

import pytest
import torch

import stated


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


CASES = {
    "adamw": lambda params, **kw: stated.AdamW(params, **kw),
    "adamw8bit": lambda params, **kw: stated.AdamW8bit(params, **kw),
    "came": lambda params, **kw: stated.CAME(params, lr=1e-3, **kw),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_negative_weight_decay_is_refused(address, name):
    with pytest.raises(stated.InvalidArgumentError) as info:
        CASES[name](model().parameters(), weight_decay=-1.0, address=address)
    assert "groups[0].weight_decay" in str(info.value) and ">= 0" in str(info.value)
    CASES[name](model().parameters(), weight_decay=0.0, address=address).close()


def test_a_malformed_tuple_is_named_in_the_client(address):
    with pytest.raises(stated.InvalidArgumentError, match=r"betas must be a tuple of 3 numbers"):
        stated.CAME(model().parameters(), lr=1e-3, betas=(0.9, 0.999), address=address)
    with pytest.raises(stated.InvalidArgumentError, match=r"betas must be a pair \(beta1, beta2\)"):
        stated.AdamW(model().parameters(), betas=(0.9,), address=address)
