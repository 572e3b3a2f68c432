"""stated on a GPU, against limits measured in the same run (PERFORMANCE.md, GPU section).

    python3 bench/gpu_step.py [--kernel-sizes 16M,128M,512M] [--paged-sizes 256M] [--samples 7]
                              [--only kernel,paged,memory]

(a) kernel: stated's AdamW kernel (stated_kernels.cuda_runner, state resident on the GPU, one launch
    over every tensor) against torch.optim.AdamW(fused=True) on the same tensors with its state on the
    GPU, and its bytes moved per second against device-to-device copy bandwidth; fp32, and bf16 with
    bf16 state (torch's fused AdamW keeps state in the parameter's dtype). Target: >= 0.9x torch.
(b) paged: a stated.AdamW step through a real `stated serve` (state in pinned host memory, streamed
    through the staging ring) against the pinned link: the same bytes copied host-to-device and
    device-to-host at once, on two streams, by this process. Reported as the fraction of the link's
    bandwidth the step reaches (link time / step time). Target: >= 0.8.
(c) memory: the trainer's peak GPU memory (torch.cuda.max_memory_allocated) training one
    transformer-like model with stated.AdamW and with torch.optim.AdamW(fused=True); the difference
    over the optimizer state's size. Target: the whole state (1.0).

Timings interleave candidate and baseline (A, B, A, B) after a warm-up and print the median ratio with
min and max; one summary line per figure comes last, as bench/cpu_step.py prints them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import BenchDaemon, human, interleaved, ratios  # noqa: E402

CUDA = torch.device("cuda")
TENSOR_ELEMENTS = 16 << 20  # large matrices of a model: 16M elements each, the rest in one smaller tensor
ALIGN = 64


def parse_count(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def split(n: int) -> list[int]:
    return [TENSOR_ELEMENTS] * (n // TENSOR_ELEMENTS) + ([n % TENSOR_ELEMENTS] if n % TENSOR_ELEMENTS else [])


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def synchronized(fn, reps: int = 1):
    def run():
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return run


# --- (a) kernel throughput ---------------------------------------------------------------------


class StatedKernel:
    """stated's AdamW page kernel over `sizes` tensors whose state sits in one device buffer (one page
    holding every tensor: one launch per step, as a GPU-cached step runs it)."""

    def __init__(self, sizes: list[int], dtype: torch.dtype):
        from stated_kernels import cuda_runner
        from stated_kernels import cuda_tables as cs
        from stated_kernels.adamw import AdamW
        from stated_kernels.spec import TensorInfo

        spec = AdamW()
        self.runner = runner = cuda_runner.CudaAlgorithm(spec, dtype, dtype, torch.cuda.current_device())
        runner.load()
        n = sum(sizes)
        g = torch.Generator(device=CUDA).manual_seed(0)
        self.params = (torch.randn(n, device=CUDA, generator=g) * 0.02).to(dtype)
        self.grads = (torch.randn(n, device=CUDA, generator=g) * 1e-3).to(dtype)
        size = dtype.itemsize
        hp = {**spec.defaults(), "lr": 1e-3}
        entries, offset, start = [], 0, 0
        rows = cs.tensor_table(len(sizes))
        device = torch.cuda.current_device()
        for k, length in enumerate(sizes):
            m, v = offset, offset + align(length * size)
            offset = v + align(length * size)
            entries.append({"param": start, "grad": start, "length": length, "start": 0, "tensor": k,
                            "fields": [m, v, -1, -1]})
            info = TensorInfo(k, (length,), dtype, 0)
            small = runner.device_small(info, spec.init_small_state(info, hp))
            runner.tensor_row(rows[k], info, hp, 10.0, small, start, start)
            start += length
        self.page = torch.zeros(offset, dtype=torch.uint8, device=CUDA)
        table = cs.segment_table(entries)
        self.segments = cuda_runner.upload(table, device)
        self.tensors = cuda_runner.upload(rows, device)
        self.nseg, self.tiles, self.flags = len(table), cs.total_tiles(table), runner.flags(hp)
        torch.cuda.synchronize()

    def step(self) -> None:
        self.runner.page(None, 0, self.segments, self.nseg, self.tiles, self.tensors, self.params.data_ptr(),
                         self.grads.data_ptr(), self.page.data_ptr(), self.flags)


def torch_fused(sizes: list[int], dtype: torch.dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    params = []
    for length in sizes:
        p = torch.nn.Parameter((torch.randn(length, device=CUDA, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(length, device=CUDA, generator=g) * 1e-3).to(dtype)
        params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.step()  # its state exists from here on
    torch.cuda.synchronize()
    return opt


def bench_kernels(sizes: list[int], samples: int) -> list[str]:
    lines = []
    print(f"{'dtype':>8s} {'params':>8s} {'stated ms':>10s} {'torch ms':>9s} {'copy ms':>8s} {'GB/s':>7s} "
          f"{'copy GB/s':>9s} {'x torch':>8s} {'x copy':>7s}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            shapes = split(n)
            moved = n * (3 * dtype.itemsize + 4 * dtype.itemsize)  # p, g, m, v read; p, m, v written
            reps = max(1, min(50, int(4e9 // moved)))
            ours = StatedKernel(shapes, dtype)
            ref = torch_fused(shapes, dtype)
            half = moved // 2
            src = torch.empty(half, dtype=torch.uint8, device=CUDA)
            dst = torch.empty_like(src)
            a, b = interleaved(synchronized(ours.step, reps), synchronized(ref.step, reps), samples)
            c, d = interleaved(synchronized(ours.step, reps), synchronized(lambda: dst.copy_(src), reps), samples)
            speed, speed_lo, speed_hi = ratios(b, a)  # torch time / stated time: > 1 is faster than torch
            ours_bw = [moved * reps / t for t in c]
            copy_bw = [2 * half * reps / t for t in d]
            frac = [x / y for x, y in zip(ours_bw, copy_bw)]
            ms = statistics.median(a) / reps * 1e3
            name = str(dtype).removeprefix("torch.")
            print(f"{name:>8s} {human(n):>8s} {ms:10.3f} {statistics.median(b) / reps * 1e3:9.3f} "
                  f"{statistics.median(d) / reps * 1e3:8.3f} {statistics.median(ours_bw) / 1e9:7.0f} "
                  f"{statistics.median(copy_bw) / 1e9:9.0f} {speed:8.3f} {statistics.median(frac):7.3f}", flush=True)
            lines.append(f"adamw kernel {name} {human(n)} params: stated/torch-fused throughput {speed:.2f} "
                         f"(min {speed_lo:.2f}, max {speed_hi:.2f}); {statistics.median(ours_bw) / 1e9:.0f} GB/s = "
                         f"{statistics.median(frac):.2f} of device copy ({statistics.median(copy_bw) / 1e9:.0f} GB/s)")
            ours = ref = src = dst = None  # free before the next size
            torch.cuda.empty_cache()
    return lines


# --- (b) paged step over the pinned link -------------------------------------------------------


class Link:
    """`nbytes` copied host-to-device and device-to-host at once (pinned host memory, two streams)."""

    def __init__(self, nbytes: int):
        self.host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dev_in = torch.empty(nbytes, dtype=torch.uint8, device=CUDA)
        self.dev_out = torch.empty(nbytes, dtype=torch.uint8, device=CUDA)
        self.up, self.down = torch.cuda.Stream(), torch.cuda.Stream()
        self.nbytes = nbytes

    def both(self) -> None:
        with torch.cuda.stream(self.up):
            self.dev_in.copy_(self.host_in, non_blocking=True)
        with torch.cuda.stream(self.down):
            self.host_out.copy_(self.dev_out, non_blocking=True)
        torch.cuda.synchronize()

    def one_way(self, up: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if up:
            self.dev_in.copy_(self.host_in, non_blocking=True)
        else:
            self.host_out.copy_(self.dev_out, non_blocking=True)
        end.record()
        end.synchronize()
        return self.nbytes / (start.elapsed_time(end) / 1e3)


def bench_paged(sizes: list[int], samples: int, page_size: str | None) -> list[str]:
    import stated

    lines = []
    daemon = BenchDaemon(*(["--page-size", page_size] if page_size else []))
    try:
        print(f"{'params':>8s} {'step ms':>8s} {'link ms':>8s} {'state GB':>8s} {'H2D GB/s':>8s} {'D2H GB/s':>8s} "
              f"{'both GB/s':>9s} {'step GB/s':>9s} {'fraction':>8s} {'min':>6s} {'max':>6s}", flush=True)
        for n in sizes:
            g = torch.Generator(device=CUDA).manual_seed(0)
            params = []
            for length in split(n):
                p = torch.nn.Parameter(torch.randn(length, device=CUDA, generator=g) * 0.02)
                p.grad = torch.randn(length, device=CUDA, generator=g) * 1e-3
                params.append(p)
            opt = stated.AdamW(params, lr=1e-3, address=daemon.address, job=f"bench-paged-{human(n)}")
            state = 8 * n  # exp_avg and exp_avg_sq in fp32, moved in and out every step
            link = Link(state)
            up = statistics.median(link.one_way(True) for _ in range(5))
            down = statistics.median(link.one_way(False) for _ in range(5))
            a, b = interleaved(opt.step, link.both, samples)
            fraction, low, high = ratios(b, a)  # link time / step time
            step_bw = 2 * state / statistics.median(a)
            both_bw = 2 * state / statistics.median(b)
            print(f"{human(n):>8s} {statistics.median(a) * 1e3:8.1f} {statistics.median(b) * 1e3:8.1f} "
                  f"{state / 1e9:8.2f} {up / 1e9:8.1f} {down / 1e9:8.1f} {both_bw / 1e9:9.1f} {step_bw / 1e9:9.1f} "
                  f"{fraction:8.3f} {low:6.3f} {high:6.3f}", flush=True)
            lines.append(f"adamw paged {human(n)} params: step reaches {fraction:.2f} of the pinned link "
                         f"(min {low:.2f}, max {high:.2f}): {step_bw / 1e9:.1f} GB/s of state in and out against "
                         f"{both_bw / 1e9:.1f} GB/s copied both ways at once (H2D {up / 1e9:.1f}, D2H {down / 1e9:.1f})")
            opt.close()
            del opt, params, link
            torch.cuda.empty_cache()
    finally:
        daemon.stop()
    return lines


# --- (c) the trainer's peak GPU memory ---------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=False)[0]
        return x + self.mlp(self.norm2(x))


class GPTLike(torch.nn.Module):
    def __init__(self, vocab: int = 32000, width: int = 1024, layers: int = 8, heads: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def peak_memory(make_optimizer, steps: int = 5, warmup: int = 2) -> tuple[int, int]:
    """(peak bytes over `steps` training steps in steady state, parameter count)."""
    torch.manual_seed(0)
    model = GPTLike().to(CUDA)
    opt = make_optimizer(model.parameters())
    g = torch.Generator(device=CUDA).manual_seed(1)
    data = torch.randint(0, 32000, (steps + warmup, 8, 257), device=CUDA, generator=g)

    def step(tokens):
        opt.zero_grad(set_to_none=False)  # steady state: gradients stay where they are
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    for tokens in data[:warmup]:
        step(tokens)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for tokens in data[warmup:]:
        step(tokens)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    count = sum(p.numel() for p in model.parameters())
    if hasattr(opt, "close"):
        opt.close()
    opt = model = data = None  # free before the next run
    torch.cuda.empty_cache()
    return peak, count


def bench_memory() -> list[str]:
    import stated

    daemon = BenchDaemon()
    try:
        ours, n = peak_memory(lambda ps: stated.AdamW(ps, lr=1e-4, address=daemon.address, job="bench-memory"))
        theirs, _ = peak_memory(lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))
    finally:
        daemon.stop()
    state = 8 * n
    saved = theirs - ours
    print(f"{'params':>8s} {'stated GiB':>10s} {'torch GiB':>9s} {'saved GiB':>9s} {'state GiB':>9s} {'saved/state':>11s}")
    print(f"{human(n):>8s} {ours / 2**30:10.2f} {theirs / 2**30:9.2f} {saved / 2**30:9.2f} {state / 2**30:9.2f} "
          f"{saved / state:11.3f}", flush=True)
    return [f"trainer peak GPU memory, GPT-like {human(n)} params: stated {ours / 2**30:.2f} GiB, torch-fused "
            f"{theirs / 2**30:.2f} GiB; saved {saved / 2**30:.2f} GiB = {saved / state:.2f} of the optimizer state "
            f"({state / 2**30:.2f} GiB)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel-sizes", default="16M,128M,512M", help="parameter counts for (a)")
    parser.add_argument("--paged-sizes", default="256M", help="parameter counts for (b)")
    parser.add_argument("--page-size", default=None, help="the daemon's --page-size for (b) (default: its own)")
    parser.add_argument("--samples", type=int, default=7, help="timed samples per candidate and baseline")
    parser.add_argument("--only", default="kernel,paged,memory", help="which figures: kernel, paged, memory")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_step.py needs a CUDA device", file=sys.stderr)
        return 1
    only = set(args.only.split(","))
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    lines = []
    if "kernel" in only:
        lines += bench_kernels([parse_count(s) for s in args.kernel_sizes.split(",")], args.samples)
    if "paged" in only:
        lines += bench_paged([parse_count(s) for s in args.paged_sizes.split(",")], args.samples, args.page_size)
    if "memory" in only:
        lines += bench_memory()
    print(f"\n{name}:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
