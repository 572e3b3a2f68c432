"""Step time of stated.AdamW over in-process torch.optim.AdamW(fused=True), on CPU.

For each model size the two optimizers step the same parameters' worth of work, interleaved
(stated, torch, stated, torch, ...). Gradients stay views of the grad arena, as in steady state with
zero_grad(set_to_none=False), so the figure is the cost of the step itself: one step-channel round
trip plus the daemon's page pass, against torch's fused kernel in the training process.

    python bench/cpu_step.py [--sizes 1M,10M,50M,200M] [--samples 9] [--baseline-tree DIR]

With --baseline-tree, a second daemon runs from another checkout (an older commit: `git worktree add
DIR REV`) and its stated.AdamW steps in the same rotation (the two swap places every other round), so a
change is measured against the code before it in one run: the last lines then also give this tree's step
time over the baseline tree's. Each stated.AdamW then runs in a trainer process of its own tree (a client
speaks only its own tree's protocol), which times its own steps; torch's stays in this process.

Targets (issue 2): ratio at most 1.10 from 50M up; at most 1 ms added per step at 1M.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import BenchDaemon, TreeTrainer, human, interleaved, ratios, rotated  # noqa: E402

TENSOR_ELEMENTS = 4 << 20  # a model's large matrices: 4M elements each, the rest in one smaller tensor


def parse_count(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_params(n: int, per_tensor: int = TENSOR_ELEMENTS) -> list[torch.nn.Parameter]:
    sizes = [per_tensor] * (n // per_tensor) + ([n % per_tensor] if n % per_tensor else [])
    g = torch.Generator().manual_seed(0)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, generator=g) * 0.02)
        p.grad = torch.randn(size, generator=g) * 1e-3
        params.append(p)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M,50M,200M", help="comma-separated parameter counts")
    parser.add_argument("--samples", type=int, default=9, help="timed steps per optimizer and size (default 9)")
    parser.add_argument("--page-size", default=None, help="the daemon's --page-size (default: its own default)")
    parser.add_argument("--tensor-elements", type=parse_count, default=TENSOR_ELEMENTS, metavar="COUNT",
                        help="elements per tensor, the rest in one smaller tensor (default 4M; e.g. 3333 makes a 1M "
                             "model of 300 tensors)")
    parser.add_argument("--cpu-threads", default=None, metavar="N",
                        help="the daemon's --cpu-threads (default: its own default; 0: torch's OpenMP threads only)")
    parser.add_argument("--algorithms-at", default=None, metavar="COUNT",
                        help="instead: each algorithm's step time over stated.AdamW's at this size (e.g. 50M)")
    parser.add_argument("--baseline-tree", default=None, metavar="DIR",
                        help="also step a stated.AdamW on a daemon run from this checkout of the repository, in the "
                             "same rotation, and report this tree's step time over it")
    args = parser.parse_args()
    if args.algorithms_at:
        return compare_algorithms(parse_count(args.algorithms_at), args.samples)
    import stated

    flags = [*(["--page-size", args.page_size] if args.page_size else []),
             *(["--cpu-threads", args.cpu_threads] if args.cpu_threads is not None else [])]
    daemons = [BenchDaemon(*flags)]
    if args.baseline_tree:
        daemons.append(BenchDaemon(*flags, tree=args.baseline_tree))
    results, against_tree = [], []
    try:
        print(f"{'params':>8s} {'stated ms':>10s} {'torch ms':>10s} {'added ms':>9s} {'ratio':>6s} "
              f"{'min':>6s} {'max':>6s}" + ("  baseline-tree ms  ratio" if args.baseline_tree else ""), flush=True)
        for text in args.sizes.split(","):
            n = parse_count(text)
            ref = torch.optim.AdamW(make_params(n, args.tensor_elements), lr=1e-3, fused=True)
            if args.baseline_tree:  # each daemon gets a trainer of its own tree (its client's protocol)
                ours = [TreeTrainer(tree, n, args.tensor_elements, d.address, f"bench-{text}")
                        for tree, d in zip([None, args.baseline_tree], daemons)]
            else:
                ours = [stated.AdamW(make_params(n, args.tensor_elements), lr=1e-3, address=d.address,
                                     job=f"bench-{text}") for d in daemons]
            times = rotated([*(o.step for o in ours), ref.step], args.samples, alternate=len(ours))
            a, b = times[0], times[-1]
            median, low, high = ratios(a, b)
            added = (statistics.median(a) - statistics.median(b)) * 1e3
            results.append((n, median, low, high, added))
            line = (f"{human(n):>8s} {statistics.median(a) * 1e3:10.3f} {statistics.median(b) * 1e3:10.3f} "
                    f"{added:9.3f} {median:6.3f} {low:6.3f} {high:6.3f}")
            if args.baseline_tree:
                against_tree.append((n, *ratios(a, times[1])))
                line += f"  {statistics.median(times[1]) * 1e3:16.3f} {against_tree[-1][1]:6.3f}"
            print(line, flush=True)
            for o in ours:
                o.close()
            del ours, ref
    finally:
        for d in daemons:
            d.stop()
    for n, median, low, high, added in results:
        print(f"adamw cpu {human(n)} params: stated/torch-fused step time {median:.2f} "
              f"(min {low:.2f}, max {high:.2f}), added {added:.3f} ms")
    for n, median, low, high in against_tree:
        print(f"adamw cpu {human(n)} params: this tree/baseline tree step time {median:.2f} "
              f"(min {low:.2f}, max {high:.2f})")
    return 0


ALGORITHM_ARGS = {
    "adamw8bit": {}, "adafactor": {}, "came": {"lr": 2e-4}, "lion": {},
    "slimadam": {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}, "sgd": {"momentum": 0.9},
    "adam": {},
}
CLASS_NAMES = {"adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "came": "CAME", "lion": "Lion",
               "slimadam": "SlimAdam", "sgd": "SGD", "adam": "Adam"}


def matrix_params(n: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Square-ish 2048 x 2048 matrices (named like MLP weights, so SlimAdam compresses them)."""
    g = torch.Generator().manual_seed(0)
    out, rows = [], 2048
    for i in range(max(1, n // (rows * rows))):
        p = torch.nn.Parameter(torch.randn(rows, rows, generator=g) * 0.02)
        p.grad = torch.randn(rows, rows, generator=g) * 1e-3
        out.append((f"layers.{i}.mlp.c_fc.weight", p))
    return out


def compare_algorithms(n: int, samples: int) -> int:
    import stated

    daemon = BenchDaemon()
    lines = []
    try:
        base_params = matrix_params(n)
        base = stated.AdamW([p for _, p in base_params], lr=1e-3, address=daemon.address, job="bench-adamw")
        print(f"{'algorithm':>10s} {'ms':>9s} {'adamw ms':>9s} {'ratio':>6s} {'min':>6s} {'max':>6s}", flush=True)
        for name, kwargs in ALGORITHM_ARGS.items():
            named = matrix_params(n)
            params = named if name == "slimadam" else [p for _, p in named]
            opt = getattr(stated, CLASS_NAMES[name])(params, address=daemon.address, job=f"bench-{name}", **kwargs)
            a, b = interleaved(opt.step, base.step, samples)
            median, low, high = ratios(a, b)
            print(f"{name:>10s} {statistics.median(a) * 1e3:9.2f} {statistics.median(b) * 1e3:9.2f} {median:6.2f} "
                  f"{low:6.2f} {high:6.2f}", flush=True)
            lines.append(f"{name} cpu {human(n)} params: step time over stated adamw {median:.2f} "
                         f"(min {low:.2f}, max {high:.2f})")
            opt.close()
            del opt, named, params
        base.close()
    finally:
        daemon.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
