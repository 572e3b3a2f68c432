"""Final loss of every stated algorithm beside AdamW's, on a small GPT-like model and generated text.

The text comes from a fixed random second-order Markov chain over a 256-token vocabulary (generated here,
no downloads), so there is real structure to learn and a known floor (the chain's entropy). Every
algorithm trains the same model from the same initialisation on the same batches for 500 steps with
the learning rate its reference recommends for this kind of model; the table gives the final loss
(mean of the last 20 steps) and its ratio to AdamW's.

    python bench/quality.py [--steps 500] [--algorithms adamw,adamw8bit,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import BenchDaemon  # noqa: E402
from tiny_gpt import TinyGPT  # noqa: E402

VOCAB, CTX, D, LAYERS, BATCH = 256, 64, 128, 2, 16


def markov_text(tokens: int, seed: int = 0) -> torch.Tensor:
    """A second-order Markov chain whose next-token distributions are sparse (8 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, VOCAB, 8), generator=g)
    weights = torch.softmax(torch.randn(VOCAB, VOCAB, 8, generator=g) * 2, -1)
    out = torch.empty(tokens, dtype=torch.long)
    out[0], out[1] = 0, 1
    choices = torch.multinomial(weights.view(-1, 8), 1, replacement=True, generator=g).view(VOCAB, VOCAB)
    noise = torch.rand(tokens, generator=g)
    pick = torch.randint(0, 8, (tokens,), generator=g)
    for i in range(2, tokens):
        a, b = int(out[i - 2]), int(out[i - 1])
        j = int(pick[i]) if noise[i] < 0.3 else int(choices[a, b])
        out[i] = successors[a, b, j]
    return out


def algorithms():
    import stated

    return {
        "adamw": (stated.AdamW, dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))),
        "adamw8bit": (stated.AdamW8bit, dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))),
        "adafactor": (stated.Adafactor, dict(lr=1e-2)),
        "came": (stated.CAME, dict(lr=2e-4, weight_decay=1e-2)),
        "lion": (stated.Lion, dict(lr=1e-4, weight_decay=1.0, betas=(0.9, 0.99))),
        "slimadam": (stated.SlimAdam, dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
        "sgd": (stated.SGD, dict(lr=0.3, momentum=0.9)),
    }


def train(name: str, address: str, data: torch.Tensor, steps: int) -> tuple[float, float]:
    cls, kwargs = algorithms()[name]
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, CTX, D, LAYERS)
    params = model.named_parameters() if name == "slimadam" else model.parameters()
    opt = cls(params, address=address, job=f"quality-{name}", **kwargs)
    g = torch.Generator().manual_seed(1)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CTX - 1, (BATCH,), generator=g)
        batch = torch.stack([data[s: s + CTX + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.close()
    tail = losses[-20:]
    return sum(tail) / len(tail), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="training steps per algorithm (default 500)")
    parser.add_argument("--algorithms", default=",".join(algorithms()), help="comma-separated algorithm names")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = markov_text(200_000)
    daemon = BenchDaemon()
    results = {}
    try:
        print(f"{'algorithm':>10s} {'final loss':>10s} {'vs adamw':>9s} {'seconds':>8s}", flush=True)
        for name in args.algorithms.split(","):
            loss, seconds = train(name, daemon.address, data, args.steps)
            results[name] = loss
            ratio = loss / results["adamw"] if "adamw" in results else float("nan")
            print(f"{name:>10s} {loss:10.4f} {ratio:9.3f} {seconds:8.1f}", flush=True)
    finally:
        daemon.stop()
    base = results.get("adamw")
    for name, loss in results.items():
        print(f"quality {name}: final loss {loss:.4f}, {loss / base:.3f} of adamw's" if base else
              f"quality {name}: final loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
