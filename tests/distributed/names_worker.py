"""A rank of a distributed run for tests/distributed/test_one_job_per_run.py.

    names_worker.py OUT_DIR [--init tcp://HOST:PORT WORLD RANK] [--crash-after K]

Each rank makes a stated.AdamW (resume=True) over a few seeded tensors at $STATED_ADDRESS, steps it to
step 6 with gradients that depend only on the step, and writes OUT_DIR/rank<R>.json: the job name and
rank it used, the step it resumed from and its final parameters. With --init, torch.distributed is
initialised over tcp:// (no $MASTER_ADDR) before the optimizer is made. With --crash-after K, rank 1 of
the first attempt ($TORCHELASTIC_RESTART_COUNT 0) exits with status 1 after step K, once rank 0 has
reached it; rank 0 waits until torchrun stops it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

import stated

STEPS = 6
SHAPES = [(16, 8), (8,), (5, 3)]


def params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def gradient(step: int, index: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index))


def crash(out: str, rank: int) -> None:
    """Rank 1 exits with status 1 once every rank has taken this step (a file each, not a collective:
    the test is of stated's names, and gloo's own rendezvous after a restart is not always clean)."""
    open(os.path.join(out, f"reached{rank}"), "w").close()
    if rank == 1:
        while not os.path.exists(os.path.join(out, "reached0")):
            time.sleep(0.05)
        os._exit(1)
    time.sleep(600)  # torchrun stops this rank when rank 1 fails


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--init", nargs=3, metavar=("URL", "WORLD", "RANK"))
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.init:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=args.init[0], world_size=int(args.init[1]),
                                rank=int(args.init[2]))
    ps = params()
    opt = stated.AdamW(ps, lr=1e-2, weight_decay=0.1, resume=True)
    first = opt.resumed_step or 0
    for step in range(first + 1, STEPS + 1):
        for i, p in enumerate(ps):
            p.grad = gradient(step, i, p.shape)
        opt.step()
        if args.crash_after == step and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            crash(args.out, opt._rank)
    rank = opt._rank
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"job": opt.job, "rank": rank, "resumed": opt.resumed_step,
                   "params": [p.detach().reshape(-1).tolist() for p in ps]}, f)
    opt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
