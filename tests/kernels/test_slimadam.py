"""SlimAdam against a plain re-implementation of low-memory-adam's SlimAdamW equations (ALGORITHMS.md
section 7; the reference repository is not a package), and against torch.optim.AdamW when nothing is
compressed: 100 steps of named 1-D, 2-D, 3-D and 4-D tensors."""

from __future__ import annotations

import functools

import pytest
import torch

import harness
import lockstep
from stated_kernels.slimadam import SlimAdam
from stated_kernels.spec import TensorInfo

TENSORS = [  # name, shape, K the static rules give
    ("blocks.0.attn.q_proj.weight", (24, 40), (1,)),
    ("blocks.0.attn.v_proj.weight", (24, 40), (0,)),
    ("blocks.0.mlp.c_fc.weight", (40, 24), (0,)),
    ("blocks.0.ln_1.weight", (40,), None),
    ("blocks.0.attn.q_proj.bias", (24,), None),  # 1-D under a 2-D rule: never compressed
    ("conv1.weight", (8, 3, 4, 4), (1,)),
    ("wte.weight", (50, 16), (1,)),
    ("mystery.weight", (12, 12), None),
    ("experts.w|compress_dims=0,2", (4, 6, 10), (0, 2)),
]
NAMES = [n for n, _, _ in TENSORS]
SHAPES = [s for _, s, _ in TENSORS]
# Tolerances after 100 steps, as (rtol, atol); (0, 0) is identical bits.
TOLERANCES = {
    # Against the re-implementation: the same operations in the same order; the compressed nu is
    # reduced in the prepass over the whole gradient with the reference's torch.mean, all else is
    # elementwise.
    "equations": (0.0, 0.0),
    # Against torch.optim.AdamW with nothing compressed: SlimAdam takes sqrt(nu / bc2) and a
    # multiply-add for mu where AdamW takes sqrt(v) / sqrt(bc2) and a lerp and folds lr / bc1 into
    # one scalar, about an ulp apart per step. Measured: theta 4.8e-7 (2 ulps of |theta| <= 4);
    # theta crosses zero, hence the absolute floor besides rtol 1e-6.
    "adamw theta": (1e-6, 1e-6),
    # mu: multiply-add against lerp, measured 2.4e-7 (2 ulps of |m| <= 2); m crosses zero.
    "adamw exp_avg": (0.0, 5e-7),
    # nu: multiply-add against addcmul, measured 3.1e-7 relative.
    "adamw exp_avg_sq": (1e-6, 0.0),
}
HP = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


_close = functools.partial(lockstep.assert_within, TOLERANCES)


class ReferenceSlimAdamW:
    """SlimAdamW's step, written from its equations: one tensor at a time, whole tensors, each
    parameter's gradient in its .grad as torch.optim takes it."""

    def __init__(self, params, rules, lr, betas, eps, weight_decay):
        self.params, self.rules = params, rules
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.decays = [weight_decay if p.dim() >= 2 else 0.0 for p in params]
        self.state = [{} for _ in params]

    def _grad_squared(self, grad, dims):
        return grad**2 if dims is None else torch.mean(grad * grad, dim=dims, keepdim=True)

    @torch.no_grad()
    def step(self):
        for p, dims, decay, state in zip(self.params, self.rules, self.decays, self.state):
            g = p.grad
            if g is None:
                continue
            if not state:
                state.update(step=0, mu=torch.zeros_like(p), nu=torch.zeros_like(self._grad_squared(p, dims)))
            state["mu"].mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            state["nu"].mul_(self.beta2).add_(self._grad_squared(g, dims), alpha=1 - self.beta2)
            if decay > 0.0:
                p.mul_(1 - self.lr * decay)
            state["step"] += 1
            mu_hat = state["mu"] / (1 - self.beta1 ** state["step"])
            nu_hat = state["nu"] / (1 - self.beta2 ** state["step"])
            p.add_(-(self.lr * (mu_hat / (nu_hat.sqrt() + self.eps))))


def test_static_rules():
    algo = SlimAdam()
    for i, (name, shape, rule) in enumerate(TENSORS):
        assert algo.rule(TensorInfo(i, shape, torch.float32, 0, name)) == rule, name


def test_matches_the_reference_equations():
    reference = functools.partial(ReferenceSlimAdamW, rules=[r for _, _, r in TENSORS], lr=HP["lr"],
                                  betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=HP["weight_decay"])
    driver, refs, ref = lockstep.run_both(SlimAdam(), reference, HP, harness.split(SHAPES, 1), SHAPES, names=NAMES)
    for i, (name, _, rule) in enumerate(TENSORS):
        mine = driver.export(i)
        _close(driver.params[i], refs[i].detach(), "equations", name)
        _close(mine["mu"], ref.state[i]["mu"], "equations", name)
        _close(mine["nu"], ref.state[i]["nu"], "equations", name)
        assert int(mine["step"]) == ref.state[i]["step"]


def _adamw(refs):
    """torch.optim.AdamW with SlimAdam's hyperparameters, decaying only the tensors of 2 or more dims."""
    return torch.optim.AdamW([{"params": [p for p in refs if p.dim() >= 2], "weight_decay": HP["weight_decay"]},
                              {"params": [p for p in refs if p.dim() < 2], "weight_decay": 0.0}],
                             lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], foreach=False)


def test_equals_adamw_when_nothing_is_compressed():
    # Explicit "none" rules and unmatched names: every tensor keeps a full second moment.
    names = [f"layer{i}.weight|compress_dims=none" for i in range(len(SHAPES))]
    driver, refs, opt = lockstep.run_both(SlimAdam(), _adamw, HP, harness.whole(SHAPES), SHAPES, names=names)
    for i, p in enumerate(refs):
        mine = driver.export(i)
        _close(driver.params[i], p.detach(), "adamw theta", NAMES[i])
        _close(mine["mu"], opt.state[p]["exp_avg"], "adamw exp_avg", NAMES[i])
        _close(mine["nu"], opt.state[p]["exp_avg_sq"], "adamw exp_avg_sq", NAMES[i])


def test_constructor_rules_override_static_ones():
    algo = SlimAdam(rules={"_orig_mod.blocks.0.attn.q_proj.weight": (0,), "wte.weight": None})
    info = lambda name, shape: TensorInfo(0, shape, torch.float32, 0, name)  # noqa: E731
    assert algo.rule(info("blocks.0.attn.q_proj.weight", (24, 40))) == (0,)
    assert algo.rule(info("wte.weight", (50, 16))) is None
    assert algo.rule(info("wte.weight|compress_dims=-1", (50, 16))) == (1,)  # the name wins
    with pytest.raises(ValueError, match="out of range"):
        algo.rule(info("x|compress_dims=2", (50, 16)))


def test_segmentation_invariant():
    harness.assert_segmentation_invariant(SlimAdam(), SHAPES, [HP, {**HP, "lr": 1e-3, "weight_decay": 0.0}],
                                          names=NAMES, group_of=[i % 2 for i in range(len(SHAPES))])


def test_state_layout():
    driver = harness.run(SlimAdam(), harness.initial_params(SHAPES), [HP], harness.whole(SHAPES), steps=2,
                         names=NAMES)
    for i, (name, shape, rule) in enumerate(TENSORS):
        numel = torch.Size(shape).numel()
        nu = numel if rule is None else torch.Size([1 if d in rule else n for d, n in enumerate(shape)]).numel()
        assert driver.state_bytes(i) == 4 * numel + 4 * nu + 4, name
        assert tuple(driver.export(i)["nu"].shape) == tuple(1 if rule and d in rule else n
                                                              for d, n in enumerate(shape))


def test_hyperparameters_are_required():
    assert SlimAdam().validate({"lr": 1e-3}) == "beta1 is required for slimadam"
    assert SlimAdam().validate(HP) is None


def test_a_bad_rule_in_a_name_is_named():
    with pytest.raises(ValueError, match="comma-separated integers, got 'x'"):
        SlimAdam().rule(TensorInfo(0, (4, 4), torch.float32, 0, "w|compress_dims=x"))


@pytest.mark.parametrize("name, rule", [
    ("transformer.h.0.attn.c_proj.weight", (0,)),  # attention_output comes before mlp_down's "c_proj"
    ("transformer.h.0.mlp.c_proj.weight", (0,)),
    ("transformer.h.0.attn.c_attn.weight", None),  # fused qkv matches no static rule
    ("model.embed_tokens.weight", (1,)),
    ("transformer.wpe.weight", (1,)),
    ("lm_head.weight", (1,)),
    ("model.layers.0.mlp.gate_proj.weight", (0,)),
    ("model.layers.0.input_layernorm.weight", None),
])
def test_static_rules_by_layer_name(name, rule):
    """The rules `stated plan` counts with (moved here with them from stated.tools.model_size)."""
    assert SlimAdam().rule(TensorInfo(0, (4, 6), torch.float32, 0, name)) == rule
