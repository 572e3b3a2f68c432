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


# Param groups as each client class builds them, and the wire values the spec packs from them (what
# the classes packed by hand before).
PACKED = {
    "adamw": (dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=True),
              {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
              {"amsgrad": False, "maximize": True}),
    "sgd": (dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False),
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0},
            {"nesterov": True, "maximize": False}),
    "adamw8bit": (dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=True, block_size=256),
                  {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}, {"amsgrad": True}),
    "adafactor": (dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False),
                  {"lr": 1e-2, "beta2_decay": -0.8, "eps1": -1.0, "eps2": 1e-3, "d": 1.0, "weight_decay": 0.0},
                  {"maximize": False}),
    "came": (dict(lr=2e-4, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999), weight_decay=0.0),
             {"lr": 2e-4, "eps1": 1e-30, "eps2": 1e-16, "clip_threshold": 1.0, "beta1": 0.9, "beta2": 0.999,
              "beta3": 0.9999, "weight_decay": 0.0}, {}),
    "slimadam": (dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
                 {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}, {}),
}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_the_spec_packs_a_param_group(name):
    from stated_client.hyperparameters import pack

    group, scalars, flags = PACKED[name]
    packed = pack(name, {**group, "lr": torch.tensor(group["lr"])})
    assert dict(packed.scalars) == pytest.approx(scalars, rel=1e-7) and dict(packed.flags) == flags


def test_lion_sends_what_the_optimizer_holds():
    from stated_client.hyperparameters import pack

    packed = pack("lion", dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1),
                  {"init_lr": 5e-4, "decoupled_weight_decay": True})
    assert dict(packed.scalars) == pytest.approx({"lr": 3e-4, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.1,
                                                  "init_lr": 5e-4})
    assert dict(packed.flags) == {"decoupled_weight_decay": True}
