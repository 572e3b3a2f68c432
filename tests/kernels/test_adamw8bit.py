"""AdamW8bit against torchao 0.18.0's AdamW8bit running here, compiled by torch.compile as torchao
ships it: 100 steps of 1-D, 2-D and 3-D tensors with 8-bit state and of small ones with float state.

Compiling costs seconds per distinct input shape, so torchao steps flattened views of the parameters:
its update is elementwise and its blocks run over the flattened tensor, so the shape does not enter
the numbers, and all 8-bit tensors (4096 elements) share one compiled graph and all float ones
another. stated steps the real shapes.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

import harness
from stated_kernels import quant_maps
from stated_kernels.adamw8bit import AdamW8bit, dequantize_state, from_torchao, is_quantized, quantize_state, to_torchao

SHAPES = [(4096,), (64, 64), (4, 8, 128), (100,), (10, 10), (2, 5, 10)]
HP = {"lr": 1e-2, "weight_decay": 0.1}
STEPS = 100
# Tolerances after 100 steps, as (rtol, atol); (0, 0) is identical bits. The 8-bit codes must be
# identical after every step, so they have no entry. stated runs the compiled kernel's float32
# operations in the same order (Note [compiled torchao] in stated_kernels.adamw8bit): lerp as
# inductor's decomposition with no fused multiply-add, and a correctly rounded sqrt; quantization
# is exact comparisons and one division per element.
TOLERANCES = {"scales": (0.0, 0.0), "float state": (0.0, 0.0), "theta": (0.0, 0.0)}
SIGNED_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
UNSIGNED_SHA256 = "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"


def _sha256(values: torch.Tensor) -> str:
    return hashlib.sha256(values.numpy().astype("<f4").tobytes()).hexdigest()


def test_dynamic_maps_hash_as_specified():
    signed, unsigned = quant_maps.dynamic_map(True), quant_maps.dynamic_map(False)
    assert _sha256(signed) == SIGNED_SHA256
    assert _sha256(unsigned) == UNSIGNED_SHA256
    assert signed[127] == 0 and signed[255] == 1 and unsigned[0] == 0 and unsigned[255] == 1
    assert torch.all(signed[1:] > signed[:-1]) and torch.all(unsigned[1:] > unsigned[:-1])


def _torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optim = pytest.importorskip("torchao.optim")
    return optim


class Run:
    """stated and torchao side by side; torchao gets flattened views (see the module docstring)."""

    def __init__(self):
        optim = _torchao()
        params = harness.initial_params(SHAPES)
        self.refs = [torch.nn.Parameter(p.clone().reshape(-1)) for p in params]
        self.opt = optim.AdamW8bit(self.refs, **HP)
        self.driver = harness.Driver(AdamW8bit(), params, [HP], harness.split(SHAPES, 256))
        self.steps = 0
        self.code_mismatches: list[tuple[int, int, str]] = []

    def step(self, steps: int, check_codes: bool = False) -> None:
        for _ in range(steps):
            self.steps += 1
            grads = harness.gradients(SHAPES, self.steps)
            for p, g in zip(self.refs, grads):
                p.grad = None if g is None else g.reshape(-1)
            with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.opt.step()
            self.driver.step(grads)
            if check_codes:
                for i, p in enumerate(self.refs):
                    mine, theirs = self.driver.export(i), self.opt.state[p]
                    for key in ("exp_avg", "exp_avg_sq"):
                        if hasattr(theirs[key], "codes") and not torch.equal(mine[key].reshape(-1),
                                                                             theirs[key].codes):
                            self.code_mismatches.append((self.steps, i, key))


@pytest.fixture(scope="module")
def run():
    run = Run()
    run.step(STEPS, check_codes=True)
    return run


def test_codes_identical_to_torchao_every_step(run):
    assert run.code_mismatches == []


def test_matches_torchao_after_100_steps(run):
    for i, p in enumerate(run.refs):
        mine, theirs = run.driver.export(i), run.opt.state[p]
        assert torch.equal(mine["step"], theirs["step"])
        _close(run.driver.params[i].reshape(-1), p.detach(), "theta")
        for key in ("exp_avg", "exp_avg_sq"):
            if is_quantized(p.numel()):
                assert mine[key].dtype == torch.uint8 and mine[key].shape == SHAPES[i]
                assert torch.equal(mine[key].reshape(-1), theirs[key].codes), f"{key} codes of tensor {i}"
                _close(mine[key + "_scale"], theirs[key].scale, "scales")
            else:
                _close(mine[key].reshape(-1), theirs[key], "float state")


def _close(actual, expected, quantity):
    rtol, atol = TOLERANCES[quantity]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{quantity}: {m}")


def test_state_loads_into_torchao_and_back(run):
    """stated's state, converted by to_torchao, continues in torchao exactly as stated continues."""
    optim = _torchao()
    refs = [torch.nn.Parameter(p.clone().reshape(-1)) for p in run.driver.params]
    opt = optim.AdamW8bit(refs, **HP)
    flat = {i: {k: (v.reshape(-1) if k in ("exp_avg", "exp_avg_sq") else v) for k, v in run.driver.export(i).items()}
            for i in range(len(SHAPES))}
    opt.load_state_dict({"state": {i: to_torchao(e) for i, e in flat.items()},
                         "param_groups": opt.state_dict()["param_groups"]})
    back = harness.Driver(AdamW8bit(), run.driver.params, [HP], harness.whole(SHAPES))
    for i in range(len(SHAPES)):
        assert any(hasattr(v, "codes") for v in opt.state[refs[i]].values()) == is_quantized(refs[i].numel())
        back.load(i, from_torchao(opt.state_dict()["state"][i]))
    for step in range(STEPS + 1, STEPS + 4):
        grads = harness.gradients(SHAPES, step)
        for p, g in zip(refs, grads):
            p.grad = None if g is None else g.reshape(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        back.step(grads)
    for i, p in enumerate(refs):
        assert torch.equal(back.params[i].reshape(-1), p.detach()), f"theta of tensor {i}"


def test_quantization_rule_is_torchaos():
    optim = _torchao()
    for numel in (100, 4095, 4096, 4100, 4352, 8192):
        p = torch.nn.Parameter(torch.zeros(numel))
        buffer = optim.AdamW8bit([p])._new_buffer(p, True)
        assert hasattr(buffer, "codes") == is_quantized(numel), numel


def test_conversions_agree_with_torchao():
    """dequantize_state decodes as torchao's OptimState8bit does; quantize_state encodes float moments
    as torchao does when it copies float values into 8-bit state."""
    _torchao()
    from torchao.optim.subclass_8bit import OptimState8bit

    driver = harness.run(AdamW8bit(), harness.initial_params(SHAPES), [HP], harness.whole(SHAPES), steps=5)
    for i, shape in enumerate(SHAPES):
        entry = driver.export(i)
        floats = dequantize_state(entry)
        assert set(floats) == {"step", "exp_avg", "exp_avg_sq"}
        assert floats["exp_avg"].dtype == torch.float32 and floats["exp_avg"].shape == shape
        if not is_quantized(floats["exp_avg"].numel()):
            assert quantize_state(floats).keys() == floats.keys()
            continue
        theirs = to_torchao(entry)
        again = quantize_state({k: v * 1.5 for k, v in floats.items()})
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(theirs[key].dequantize(), floats[key]), (i, key)
            target = OptimState8bit.zeros(shape, signed=key == "exp_avg")
            target.copy_(floats[key] * 1.5)
            assert torch.equal(again[key], target.codes) and torch.equal(again[key + "_scale"], target.scale)


def test_dequantized_state_loads_into_torch_adamw():
    driver = harness.run(AdamW8bit(), harness.initial_params(SHAPES), [HP], harness.whole(SHAPES), steps=5)
    p = torch.nn.Parameter(driver.params[1].clone())
    opt = torch.optim.AdamW([p])
    opt.load_state_dict({"state": {0: dequantize_state(driver.export(1))},
                         "param_groups": opt.state_dict()["param_groups"]})
    p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 6.0


def test_imports_float_moments_by_quantizing_them():
    driver = harness.run(AdamW8bit(), harness.initial_params(SHAPES), [HP], harness.whole(SHAPES), steps=3)
    fresh = harness.Driver(AdamW8bit(), driver.params, [HP], harness.split(SHAPES, 256))
    for i in range(len(SHAPES)):
        floats = dequantize_state(driver.export(i))
        fresh.load(i, floats)
        expected = quantize_state(floats)
        got = fresh.export(i)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value.reshape(got[key].shape)), (i, key)
    with pytest.raises(ValueError, match="holds 8-bit codes"):
        fresh.load(3, {"step": torch.tensor(1.0), "exp_avg": torch.zeros(100, dtype=torch.uint8),
                       "exp_avg_sq": torch.zeros(100, dtype=torch.uint8)})


def test_segmentation_invariant():
    shapes = [(4096,), (64, 96), (4, 16, 80), (100,), (65, 70), (3, 5, 7)]
    groups = [HP, {"lr": 1e-3, "amsgrad": True}]
    harness.assert_segmentation_invariant(AdamW8bit(), shapes, groups, group_of=[0, 1, 0, 1, 0, 1])


def test_state_bytes_per_param():
    shapes = [(4096,), (64, 96), (4, 16, 80), (256, 256), (100,), (65, 70)]
    driver = harness.run(AdamW8bit(), harness.initial_params(shapes), [HP], harness.whole(shapes), steps=1)
    for i, shape in enumerate(shapes):
        numel = torch.Size(shape).numel()
        per_param = driver.state_bytes(i) / numel
        if is_quantized(numel):
            assert per_param <= 2.04, (shape, per_param)
        else:  # float32 state as torchao keeps it for small tensors and partial blocks
            assert per_param == (8 * numel + 4) / numel


@pytest.mark.parametrize("signed", [True, False])
def test_codes_equal_torchaos_quantizer_at_every_boundary(signed):
    """Note [code thresholds]: the table lookup gives torchao's code for every map value, every
    threshold and their float32 neighbours, NaN, signed zeros, subnormals and random values."""
    _torchao()
    from torchao.optim.quant_utils import quantize_8bit_with_qmap

    q = quant_maps.dynamic_map(signed)
    edges = torch.cat([q, quant_maps._thresholds(signed)[:-2]])
    bits = edges.view(torch.int32)
    neighbours = torch.cat([(bits + d).view(torch.float32) for d in range(-3, 4)])  # same sign: same order
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([
        neighbours, -neighbours,
        torch.rand(200_000, generator=gen) * 2 - 1,
        torch.randn(20_000, generator=gen) * 1e-6,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1e-38, float("nan"), -float("nan")]),
    ])
    assert torch.equal(quant_maps.codes_of(x, signed), quantize_8bit_with_qmap(x, q))
