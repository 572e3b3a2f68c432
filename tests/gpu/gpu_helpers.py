"""Shared by the GPU tests: parameters and gradients made on the CPU (so that every side starts from the
same bits), stepping an optimizer through them, and reading the daemon's metrics."""

from __future__ import annotations

import re
import uuid

import torch

# A transformer block's worth of shapes: matrices, vectors, odd sizes (unaligned tails); about 46K
# parameters, so AdamW's state spans 6 of the fixtures' 64KiB pages and the staging ring turns over.
SHAPES = [(64, 96), (96,), (96, 64), (64,), (37, 11), (129,), (128, 256)]


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def initial(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.1 for s in shapes]


def gradients(steps: int, shapes=SHAPES, seed: int = 1, scale: float = 1e-2) -> list[list[torch.Tensor]]:
    """Fixed gradients, independent of the parameters: the runs compared differ only in the optimizer
    (no trajectory amplifies a difference in the forward pass)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * scale for s in shapes] for _ in range(steps)]


def parameters(values, device, dtype=torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(v.to(device=device, dtype=dtype).clone()) for v in values]


def run(opt, params, grads, skip: dict[int, set[int]] | None = None) -> None:
    """Steps `opt` once per entry of `grads`; `skip[step]` names parameters without a gradient then."""
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if skip and i in skip.get(step, ()) else g.to(device=p.device, dtype=p.dtype)
        opt.step()


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}" + (rf"\{{{re.escape(want)}\}}" if want else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"no sample {name}{{{want}}} in the metrics")
    return float(match.group(1))


class TinyTransformer(torch.nn.Module):
    """A transformer-like model small enough for a test: embedding, one attention block, MLP, head.

    The attention has no biases: the key bias adds one vector to every key, which shifts each query's
    scores by a constant, so softmax makes its gradient zero, and what the backward pass computes for it
    is rounding noise. Adam divides that noise by its own running size, so the key bias takes steps of
    about lr in directions set by the noise, and two optimizers that differ by an ulp part by about
    1e-3 there within 40 steps (torch.optim.AdamW against itself with one ulp moved on the CPU: 8e-4;
    with no attention biases, 6e-6). Everything else in the model follows its gradient."""

    def __init__(self, vocab: int = 97, width: int = 64, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True, bias=False)
        self.norm2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def tiny_model(seed: int = 0, device="cuda", dtype=torch.float32) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().to(device=device, dtype=dtype)


def batches(steps: int, seed: int = 3, device="cuda", batch: int = 8, length: int = 16, vocab: int = 97):
    """Sequences with something to learn: each token is the one before plus 7 (mod vocab), from random
    first tokens. (Uniformly random tokens cannot be predicted: the loss stays near ln(vocab), 4.57,
    from about 4.8, so no optimizer brings it to 0.8 times its start; this one is below 0.01 in 40
    steps of AdamW at lr 3e-3.)"""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (steps, batch, 1), generator=g)
    data = (first + 7 * torch.arange(length + 1)) % vocab
    return data.to(device)


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def assert_states_close(ours: dict, theirs: dict, rtol: float, atol_fraction: float = 1e-6) -> None:
    """Every tensor of `theirs` (a torch state_dict()["state"]) is in `ours` and close to it; `atol` is a
    fraction of the largest value of each state tensor, since moments are orders of magnitude apart."""
    assert set(theirs) <= set(ours), (sorted(theirs), sorted(ours))
    for index, entry in theirs.items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            mine = ours[index][key]
            a, b = mine.detach().float().cpu(), value.detach().float().cpu()
            atol = atol_fraction * float(b.abs().max()) if b.numel() else 0.0
            torch.testing.assert_close(a.reshape(b.shape), b, rtol=rtol, atol=max(atol, 1e-30),
                                       msg=lambda m: f"state[{index}][{key!r}]: {m}")
