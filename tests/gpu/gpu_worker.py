"""A trainer process on a GPU for test_gpu_multiprocess.py: `python tests/gpu/gpu_worker.py --address A
--job J --rank R --seed S`. Trains a small model on cuda:0 with stated.AdamW beside
torch.optim.AdamW(fused=True) from the same initialisation and prints JSON lines on stdout:
{"event": "attached", ...}, then waits for a line on stdin, then {"event": "done", ...}."""

from __future__ import annotations

import argparse
import json
import os
import sys


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import torch

    import stated

    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_helpers import batches, lm_loss, tiny_model

    ours_model, ref_model = tiny_model(args.seed), tiny_model(args.seed)
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05)
    opt = stated.AdamW(ours_model.parameters(), address=args.address, job=args.job, rank=args.rank, **hyper)
    ref = torch.optim.AdamW(ref_model.parameters(), fused=True, **hyper)
    emit(event="attached", session=opt.session_id, pid=os.getpid())
    if not sys.stdin.readline():
        raise SystemExit("stdin closed before the test said go")
    first = loss = None
    worst = 0.0
    for tokens in batches(args.steps, seed=100 + args.seed):
        for model, optimizer in ((ours_model, opt), (ref_model, ref)):
            optimizer.zero_grad()
            value = lm_loss(model, tokens)
            value.backward()
            optimizer.step()
            if model is ours_model:
                loss = value.item()
                first = loss if first is None else first
        worst = max(worst, max((p - q).abs().max().item()
                               for p, q in zip(ours_model.parameters(), ref_model.parameters())))
    state = opt.state_dict()["state"]
    emit(event="done", session=opt.session_id, steps=args.steps, max_abs_diff=worst, first_loss=first, loss=loss,
         step_count=float(state[0]["step"]))
    opt.close()


if __name__ == "__main__":
    main()
