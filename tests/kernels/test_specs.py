"""What every algorithm spec declares, checked across the registry: the shared hyperparameter checks,
the CUDA declarations the runner reads, the planner's bytes, and the field formats."""

from __future__ import annotations

import pytest
import torch

import stated_kernels
from stated_kernels import cuda_sources, cuda_tables, formats
from stated_kernels.adamw8bit import EIGHT_BIT
from stated_kernels.spec import TensorInfo

# What each algorithm needs besides its defaults to validate (CAME and SlimAdam have required ones).
REQUIRED = {"came": {"lr": 1e-3}, "slimadam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8,
                                              "weight_decay": 0.0}}


@pytest.mark.parametrize("name", sorted(stated_kernels.ALGORITHMS))
def test_negative_weight_decay_is_refused_by_every_algorithm(name):
    algorithm = stated_kernels.lookup(name)
    assert algorithm.validate(REQUIRED.get(name, {})) is None
    problem = algorithm.validate({**REQUIRED.get(name, {}), "weight_decay": -1.0}, "groups[0].")
    assert problem == "groups[0].weight_decay must be >= 0, got -1.0", name


def test_adamw8bit_shares_adamw_table_but_maximize():
    adamw, eight = stated_kernels.lookup("adamw"), stated_kernels.lookup("adamw8bit")
    assert eight.hyperparameters == tuple(h for h in adamw.hyperparameters if h.name != "maximize")


@pytest.mark.parametrize("name", sorted(stated_kernels.ALGORITHMS))
def test_cuda_declarations_are_complete(name):
    algorithm = stated_kernels.lookup(name)
    spec = algorithm.cuda
    assert spec.slots[-1] == ("master", ("float32",))
    assert len(spec.slots) <= cuda_tables.MAX_FIELDS
    assert spec.schedule.passes == algorithm.passes
    hp = {**algorithm.defaults(), **REQUIRED.get(name, {})}
    if name == "lion":
        hp["init_lr"] = hp["lr"]
    row, flags = cuda_tables.host_scalars(name, hp, 1.0, numel=64, ndim=2)
    assert row.shape == (cuda_tables.N_HP,) and row[cuda_tables.GRAD_SCALE] == 1.0
    assert isinstance(flags, int)
    # Every page field of a tensor has a slot of that name.
    info = TensorInfo(0, (64, 64), torch.float32, 0, "w")
    slots = {slot for slot, _ in spec.slots}
    assert {f.name for f in algorithm.page_fields(info, hp)} <= slots, name


def test_gradstats_is_a_source_but_no_algorithm():
    assert set(cuda_sources.kernel_sets()) == {"adamw", "adamw8bit", "adafactor", "came", "lion", "slimadam", "sgd",
                                               "gradstats"}
    assert cuda_sources.kernel_set("adam") is cuda_sources.kernel_set("adamw")
    with pytest.raises(KeyError, match="no CUDA kernels"):
        cuda_sources.kernel_set("adam9")
    with pytest.raises(KeyError, match="no per-step scalars"):
        cuda_tables.host_scalars("adam9", {}, 1.0)


def test_plan_columns_follow_the_registry():
    from stated.tools import model_size

    assert model_size.ALGORITHMS == ("adamw", "adamw8bit", "adafactor", "came", "lion", "slimadam", "sgd")


def test_eight_bit_format_lays_codes_before_scales():
    fields = formats.page_fields({"exp_avg": EIGHT_BIT["exp_avg"], "exp_avg_sq": EIGHT_BIT["exp_avg_sq"]})
    assert [(f.name, f.dtype, f.per) for f in fields] == [
        ("exp_avg", torch.uint8, 1), ("exp_avg_sq", torch.uint8, 1),
        ("exp_avg_scale", torch.float32, 256), ("exp_avg_sq_scale", torch.float32, 256)]
    assert EIGHT_BIT["exp_avg"].nbytes(4096) == 4096 + 4 * 16
    assert formats.Dense(torch.bfloat16).nbytes(10) == 20


def test_eight_bit_format_round_trips_its_own_values():
    fmt = EIGHT_BIT["exp_avg"]
    values = torch.randn(512, generator=torch.Generator().manual_seed(0))
    codes, scale = fmt.encode(values)
    views = {"m": codes, "m_scale": scale}
    decoded = fmt.load(views, "m")
    assert torch.equal(fmt.decode(views, "m"), decoded)
    again = torch.empty_like(codes), torch.empty_like(scale)
    fmt.store({"m": again[0], "m_scale": again[1]}, "m", decoded)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)
