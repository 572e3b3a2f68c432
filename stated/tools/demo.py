"""`stated demo`: train a small model with stated.AdamW beside torch.optim.AdamW and compare.

Everything is generated here (no downloads): a random "teacher" network labels random inputs, and a
student of the same shape learns it. Both optimizers start from the same initialisation and see the
same batches; the table shows that the daemon computed what torch computes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from stated.v1 import state_service_pb2 as pb


def build_model(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                               torch.nn.GELU(), torch.nn.Linear(width, 16))


def make_batches(steps: int, seed: int, batch: int = 64):
    teacher = build_model(64, seed + 1000)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(steps, batch, 64, generator=g)
    with torch.no_grad():
        Y = teacher(X) + 0.01 * torch.randn(steps, batch, 16, generator=g)
    return X, Y


def _train_step(model, opt, x, y) -> tuple[float, float]:
    opt.zero_grad(set_to_none=False)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    start = time.perf_counter()
    opt.step()
    return loss.item(), time.perf_counter() - start


PAGE_BYTES = 64 << 10


def run_demo(steps: int = 300, width: int = 512, seed: int = 0, budget: float = 0.25, out=sys.stdout) -> int:
    import stated
    from stated_client import embedded
    from stated_client.connection import _answers

    ours_model, ref_model = build_model(width, seed), build_model(width, seed)
    params = sum(p.numel() for p in ours_model.parameters())
    host_memory = int(8 * params * budget)
    print(f"stated demo: {steps} steps of a {width}-wide MLP ({params:,} parameters), stated.AdamW beside "
          f"torch.optim.AdamW", file=out)
    extra: tuple[str, ...] = ()
    if budget < 1:
        extra = ("--host-memory", str(host_memory), "--page-size", str(PAGE_BYTES))
        print(f"starting an embedded daemon whose host memory for state is {budget:.0%} of it "
              f"({host_memory:,} of {8 * params:,} bytes, {PAGE_BYTES // 1024} KiB pages): the rest is paged "
              f"to a state file ...", file=out, flush=True)
    else:
        print("starting an embedded daemon ...", file=out, flush=True)
    address = embedded.embedded_target(_answers, extra)
    ours = stated.AdamW(ours_model.parameters(), lr=1e-3, weight_decay=0.01, address=address, job="demo")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.01)
    X, Y = make_batches(steps, seed)
    times = {"stated": [], "torch": []}
    losses = {"stated": 0.0, "torch": 0.0}
    for i in range(steps):
        losses["stated"], t = _train_step(ours_model, ours, X[i], Y[i])
        times["stated"].append(t)
        losses["torch"], t = _train_step(ref_model, ref, X[i], Y[i])
        times["torch"].append(t)
        if (i + 1) % 50 == 0 or i + 1 == steps:
            print(f"  step {i + 1:4d}/{steps}  loss stated {losses['stated']:.5f}  torch {losses['torch']:.5f}",
                  file=out, flush=True)
    diff = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), ref_model.parameters()))
    stats = ours._connection.call("GetStats", pb.GetStatsRequest(session=ours._session))
    mine = [s for s in stats.sessions if s.id == ours.session_id][0]
    rows = [
        ("parameters", f"{params:,}", f"{params:,}"),
        ("final loss", f"{losses['stated']:.6f}", f"{losses['torch']:.6f}"),
        ("median step time", f"{statistics.median(times['stated']) * 1e3:.3f} ms",
         f"{statistics.median(times['torch']) * 1e3:.3f} ms"),
        ("optimizer state in this process", "0 B", f"{8 * params:,} B"),
        ("optimizer state in the daemon", f"{mine.state_bytes:,} B", "-"),
    ]
    print(file=out)
    print(f"{'':34s}{'stated.AdamW':>18s}{'torch.optim.AdamW':>20s}", file=out)
    for name, a, b in rows:
        print(f"{name:34s}{a:>18s}{b:>20s}", file=out)
    print(f"{'largest parameter difference':34s}{diff:>18.3g}", file=out)
    print(f"{'state bytes per parameter':34s}{mine.state_bytes_per_parameter:>18.2f}", file=out)
    print(file=out)
    print(f"paging: {mine.pages} pages, {mine.resident_capacity} kept in host memory; "
          f"{mine.page_faults:,} page faults ({mine.page_faults / steps:.1f} per step), "
          f"{mine.bytes_read / 1e6:,.1f} MB read and {mine.bytes_written / 1e6:,.1f} MB written; "
          f"the daemon waited for pages {100 * mine.stall_seconds / max(mine.step_seconds, 1e-12):.1f}% of its "
          f"step time", file=out)
    ours.close()
    # The reference is torch's default single-tensor path; stated runs the fused kernel, which agrees with
    # it to about an ulp per step (ALGORITHMS.md section 1), so differences stay near float32 resolution.
    return 0 if diff < 1e-4 else 1
