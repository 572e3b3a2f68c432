"""The CUDA kernels against the CPU kernels, for every algorithm and dtype (needs a GPU and CuPy).

Each case registers a few tensors of different shapes in a param and a grad arena, cuts them into
segments at unaligned places (so that both the vector and the one-value paths run, and a tensor
spans several segments), runs three steps through the kernels in the order cuda/README.md gives,
and compares parameters and state with the CPU result of the same three steps:

- AdamW, Adam, SGD: the stated_kernels CPU modules (`Algorithm.update` on whole-tensor segments).
- Lion, AdamW8bit, Adafactor, CAME, SlimAdam: the reference math of ALGORITHMS.md in plain torch
  (torch.optim.Adafactor itself for Adafactor), the same math their CPU modules implement.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

cp = pytest.importorskip("cupy")
try:
    _DEVICES = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver, no device: the same for this test
    _DEVICES = 0
if _DEVICES == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from stated_kernels import cuda_sources as cs  # noqa: E402

pytestmark = pytest.mark.gpu

STEPS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@functools.cache
def module(algorithm: str):
    return cp.RawModule(code=cs.source(algorithm), options=tuple(cs.nvrtc_options()),
                        name_expressions=cs.name_expressions(algorithm))


def kernel(algorithm: str, name: str, pdtype: str, sdtype: str):
    return module(algorithm).get_function(cs.kernel_name(name, pdtype, sdtype))


def to_device(t: torch.Tensor):
    """Raw bits of a CPU tensor as a CuPy array (CuPy has no bfloat16)."""
    t = t.contiguous()
    if t.dtype in RAW:
        return cp.asarray(t.view(RAW[t.dtype]).numpy())
    return cp.asarray(t.numpy())


def from_device(a, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(cp.asnumpy(a).copy())
    return t.view(dtype) if dtype in RAW else t.to(dtype)


def nbytes(dtype: torch.dtype, count: int) -> int:
    return count * torch.empty((), dtype=dtype).element_size()


def align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


# --- what each algorithm keeps where ---------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    kind: int = 0
    rows: int = 0
    cols: int = 0
    lead: int = 0
    fields: dict[int, tuple[str, torch.dtype, int]] = dataclasses.field(default_factory=dict)  # slot -> (name, dtype, per)
    small: dict[int, tuple[str, torch.dtype, int]] = dataclasses.field(default_factory=dict)  # slot -> (name, dtype, count)


def layout(algorithm: str, shape: tuple[int, ...], hp: dict, sdtype: torch.dtype) -> Layout:
    numel = math.prod(shape)
    f32, f64, u8 = torch.float32, torch.float64, torch.uint8
    if algorithm in ("adamw", "adam"):
        fields = {0: ("exp_avg", sdtype, 1), 1: ("exp_avg_sq", sdtype, 1)}
        if hp["amsgrad"]:
            fields[2] = ("max_exp_avg_sq", sdtype, 1)
        return Layout(fields=fields)
    if algorithm == "sgd":
        return Layout(fields={0: ("momentum_buffer", sdtype, 1)} if hp["momentum"] else {})
    if algorithm == "lion":
        return Layout(fields={0: ("exp_avg", sdtype, 1)})
    if algorithm == "adamw8bit":
        if numel >= 4096 and numel % 256 == 0:
            return Layout(kind=1, fields={0: ("exp_avg", u8, 1), 1: ("exp_avg_sq", u8, 1),
                                          3: ("exp_avg_scale", f32, 256), 4: ("exp_avg_sq_scale", f32, 256)})
        return Layout(fields={0: ("exp_avg", sdtype, 1), 1: ("exp_avg_sq", sdtype, 1)})
    if algorithm in ("adafactor", "came"):
        if len(shape) >= 2:
            n, m = shape[-2], shape[-1]
            lead = numel // (n * m)
            if algorithm == "adafactor":
                small = {0: ("row_var", sdtype, lead * n), 1: ("col_var", sdtype, lead * m),
                         2: ("scratch", f32, lead), 3: ("stats", f64, 4)}
                return Layout(kind=1, rows=n, cols=m, lead=lead, small=small)
            small = {0: ("exp_avg_sq_row", sdtype, lead * n), 1: ("exp_avg_sq_col", sdtype, lead * m),
                     2: ("exp_avg_res_row", sdtype, lead * n), 3: ("exp_avg_res_col", sdtype, lead * m),
                     4: ("means", f32, 2 * lead), 5: ("sums", f32, lead * (n + m)), 6: ("stats", f64, 4)}
            return Layout(kind=1, rows=n, cols=m, lead=lead, fields={0: ("exp_avg", sdtype, 1)}, small=small)
        if algorithm == "adafactor":
            return Layout(small={0: ("variance", sdtype, numel), 3: ("stats", f64, 4)})
        return Layout(fields={0: ("exp_avg", sdtype, 1)}, small={0: ("exp_avg_sq", sdtype, numel), 6: ("stats", f64, 4)})
    if algorithm == "slimadam":
        dims = hp["compress_dims"].get(shape)
        if dims is None or len(shape) < 2:
            return Layout(fields={0: ("exp_avg", sdtype, 1), 1: ("exp_avg_sq", sdtype, 1)})
        lo, hi = min(dims), max(dims) + 1
        assert list(dims) == list(range(lo, hi)), "the kernel takes one run of consecutive dims"
        outer, mid, inner = math.prod(shape[:lo]), math.prod(shape[lo:hi]), math.prod(shape[hi:])
        return Layout(kind=1, lead=outer, rows=mid, cols=inner, fields={0: ("exp_avg", sdtype, 1)},
                      small={0: ("nu", sdtype, outer * inner)})
    raise KeyError(algorithm)


# Launch order per step: ("list", kernel) runs over the group's tensors, ("page", kernel) over the page.
SEQUENCES = {
    "adamw": [("page", "stated_adamw")],
    "adam": [("page", "stated_adamw")],
    "sgd": [("page", "stated_sgd")],
    "lion": [("page", "stated_lion")],
    "adamw8bit": [("page", "stated_adamw8bit")],
    "adafactor": [("list", "stated_adafactor_rows"), ("list", "stated_adafactor_cols"),
                  ("list", "stated_adafactor_row_mean"), ("list", "stated_adafactor_norms"),
                  ("list", "stated_adafactor_finish"), ("page", "stated_adafactor_page")],
    "came": [("list", "stated_came_rows"), ("list", "stated_came_cols"), ("list", "stated_came_row_mean"),
             ("list", "stated_came_norms"), ("list", "stated_came_finish"), ("page", "stated_came_page0"),
             ("list", "stated_came_between"), ("list", "stated_came_between_mean"), ("page", "stated_came_page1")],
    "slimadam": [("list", "stated_slimadam_reduce"), ("page", "stated_slimadam_page")],
}


def cuts(algorithm: str, lay: Layout, numel: int) -> list[int]:
    """Segment boundaries inside a tensor: unaligned ones, and block-aligned ones for 8-bit state."""
    if algorithm == "adamw8bit" and lay.kind == 1:
        blocks = numel // 256
        points = {0, 256 * (blocks // 3), 256 * (2 * blocks // 3), numel}
    else:
        points = {0, numel // 3 + 1, 2 * numel // 3 + 3, numel}
    return sorted(p for p in points if 0 <= p <= numel)


# --- running the kernels ---------------------------------------------------------------------------


def run_gpu(algorithm, hp, params, grads_per_step, pdtype, sdtype, master=False):
    """Runs STEPS steps through the kernels; returns params and state (CPU tensors, whole-tensor)."""
    P, S = DTYPES[pdtype], DTYPES[sdtype]
    layouts = [layout(algorithm, tuple(p.shape), hp, S) for p in params]
    # Arenas: tensors back to back, 64-byte aligned.
    offsets, end = [], 0
    for p in params:
        offsets.append(end)
        end = align((end + p.numel()) * nbytes(P, 1)) // nbytes(P, 1)
    param_arena = torch.zeros(end, dtype=P)
    for p, off in zip(params, offsets):
        param_arena[off: off + p.numel()] = p.reshape(-1)
    d_param = to_device(param_arena)
    d_grad = to_device(torch.zeros(end, dtype=P))

    # One page holding every segment of every tensor.
    seg_rows, page_bytes, placements = [], 0, []
    master_slot = {"adamw": 3, "adam": 3, "sgd": 1, "lion": 1, "adamw8bit": 6, "adafactor": 0, "came": 1,
                   "slimadam": 2}[algorithm]
    for index, (p, lay, off) in enumerate(zip(params, layouts, offsets)):
        bounds = cuts(algorithm, lay, p.numel())
        for start, stop in zip(bounds, bounds[1:]):
            if stop <= start:
                continue
            length = stop - start
            fields = [-1] * cs.MAX_FIELDS
            specs = dict(lay.fields)
            if master:
                specs[master_slot] = ("master", torch.float32, 1)
            for slot, (name, dtype, per) in specs.items():
                fields[slot] = page_bytes
                placements.append((index, name, dtype, per, start, length, page_bytes))
                page_bytes += align(nbytes(dtype, -(-length // per)))
            seg_rows.append({"param": off + start, "grad": off + start, "length": length, "start": start,
                             "tensor": index, "fields": fields})
    page = torch.zeros(max(page_bytes, 64), dtype=torch.uint8)
    if master:  # the master copy starts as the parameter
        for index, name, dtype, per, start, length, at in placements:
            if name == "master":
                view = page[at: at + 4 * length].view(torch.float32)
                view.copy_(params[index].reshape(-1)[start: start + length].float())
    d_page = to_device(page)
    segs = cs.segment_table(seg_rows)
    d_segs = cp.asarray(segs.view(np.uint8))
    ntiles = cs.total_tiles(segs)

    # Small buffers and the tensor table.
    table = cs.tensor_table(len(params))
    smalls = []
    for index, (p, lay, off) in enumerate(zip(params, layouts, offsets)):
        buffers = {}
        for slot, (name, dtype, count) in lay.small.items():
            buffers[slot] = (name, dtype, cp.zeros(nbytes(dtype, count), dtype=cp.uint8))
            table["small"][index, slot] = buffers[slot][2].data.ptr
        smalls.append(buffers)
        table["param"][index], table["grad"][index], table["numel"][index] = off, off, p.numel()
        table["kind"][index], table["rows"][index] = lay.kind, lay.rows
        table["cols"][index], table["lead"][index] = lay.cols, lay.lead
    ids = cp.arange(len(params), dtype=cp.int32)
    qmaps = cp.asarray(np.concatenate([dynamic_map(True), dynamic_map(False)]).astype(np.float32))

    for step in range(1, STEPS + 1):
        grad_arena = torch.zeros(end, dtype=P)
        for g, off in zip(grads_per_step[step - 1], offsets):
            grad_arena[off: off + g.numel()] = g.reshape(-1)
        d_grad = to_device(grad_arena)
        flags = 0
        for index, p in enumerate(params):
            row, flags = cs.host_scalars(algorithm, hp, step, numel=p.numel(), ndim=p.dim(), param_dtype=pdtype)
            table["hp"][index] = row
        d_tensors = cp.asarray(table.view(np.uint8))
        for where, name in SEQUENCES[algorithm]:
            fn = kernel(algorithm, name, pdtype, sdtype)
            if where == "page":
                args = [d_segs, np.int32(len(segs)), d_tensors, d_param, d_grad, d_page, np.uint32(flags)]
                if algorithm == "adamw8bit":
                    args.append(qmaps)
                fn((max(ntiles, 1),), (cs.THREADS,), tuple(args))
            else:
                fn((64, len(params)), (cs.THREADS,), (ids, np.int32(len(params)), d_tensors, d_param, d_grad,
                                                      np.uint32(flags)))
        cp.cuda.Device().synchronize()

    out_params = from_device(d_param, P)
    result = {"param": [out_params[off: off + p.numel()].reshape(p.shape) for p, off in zip(params, offsets)]}
    page_bytes_out = from_device(d_page, torch.uint8)
    state = [dict() for _ in params]
    for index, name, dtype, per, start, length, at in placements:
        count = -(-length // per)
        piece = page_bytes_out[at: at + nbytes(dtype, count)].view(dtype)
        state[index].setdefault(name, []).append(piece)
    for index, buffers in enumerate(smalls):
        for slot, (name, dtype, buf) in buffers.items():
            state[index][name] = [from_device(buf, torch.uint8).view(dtype)]
    result["state"] = [{k: torch.cat(v) for k, v in s.items()} for s in state]
    return result


# --- CPU references --------------------------------------------------------------------------------


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic map, built in float32 as ALGORITHMS.md 3.1 describes."""
    f = np.float32
    data = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        b = torch.linspace(0.1, 1.0, n, dtype=torch.float32)
        means = ((b[:-1] + b[1:]) / 2.0).numpy()
        scaled = (f(10.0 ** (i - 6)) * means).astype(np.float32)
        data += scaled.tolist()
        if signed:
            data += (-scaled).tolist()
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, dtype=np.float32))


def quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = x.reshape(-1, 256)
    scale = blocks.abs().amax(-1).clip(1e-12)
    y = blocks / scale[:, None]
    codes = torch.where(y >= qmap[128], 128, 0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        codes = codes + torch.where(y >= qmap[codes + step], step, 0)
    up = (codes + 1).clip(max=255)
    codes = torch.where(y - qmap[codes] >= (qmap[up] - qmap[codes]) * 0.5, up, codes)
    return codes.to(torch.uint8).reshape(-1), scale


def run_cpu(algorithm, hp, params, grads_per_step, pdtype, sdtype):
    P, S = DTYPES[pdtype], DTYPES[sdtype]
    params = [p.clone() for p in params]
    states = [dict() for _ in params]
    if algorithm in ("adamw", "adam", "sgd"):
        import stated_kernels
        from stated_kernels.spec import Segment, TensorInfo

        algo = stated_kernels.lookup(algorithm)
        infos = [TensorInfo(i, tuple(p.shape), P, 0) for i, p in enumerate(params)]
        fields = [algo.page_fields(info, hp) for info in infos]
        flat = [{f.name: torch.zeros(p.numel(), dtype=S) for f in fs} for p, fs in zip(params, fields)]
        smalls = [algo.init_small_state(info, hp) for info in infos]
        for step in range(STEPS):
            for info, small in zip(infos, smalls):
                algo.begin_step(info, small, hp)
            segments = [Segment(info, 0, p.view(-1), g.reshape(-1).clone(), f, small)
                        for info, p, g, f, small in zip(infos, params, grads_per_step[step], flat, smalls)]
            algo.update(segments, hp)
        return {"param": params, "state": flat}

    f32 = torch.float32
    for step in range(1, STEPS + 1):
        for i, (p, g) in enumerate(zip(params, grads_per_step[step - 1])):
            st = states[i]
            if algorithm == "lion":
                m = st.setdefault("exp_avg", torch.zeros_like(p, dtype=S))
                p.mul_(1 - hp["lr"] * hp["weight_decay"])
                update = m.clone().mul_(hp["beta1"]).add(g, alpha=1 - hp["beta1"]).sign_()
                p.add_(update, alpha=-hp["lr"])
                m.mul_(hp["beta2"]).add_(g, alpha=1 - hp["beta2"])
            elif algorithm == "adamw8bit":
                quantized = p.numel() >= 4096 and p.numel() % 256 == 0
                qs, qu = torch.from_numpy(dynamic_map(True)), torch.from_numpy(dynamic_map(False))
                if quantized:
                    st.setdefault("exp_avg", torch.zeros(p.numel(), dtype=torch.uint8))
                    st.setdefault("exp_avg_sq", torch.zeros(p.numel(), dtype=torch.uint8))
                    st.setdefault("exp_avg_scale", torch.zeros(p.numel() // 256))
                    st.setdefault("exp_avg_sq_scale", torch.zeros(p.numel() // 256))
                    m = (qs[st["exp_avg"].long()].view(-1, 256) * st["exp_avg_scale"][:, None]).view(-1)
                    v = (qu[st["exp_avg_sq"].long()].view(-1, 256) * st["exp_avg_sq_scale"][:, None]).view(-1)
                else:
                    m = st.setdefault("exp_avg", torch.zeros(p.numel(), dtype=S)).float()
                    v = st.setdefault("exp_avg_sq", torch.zeros(p.numel(), dtype=S)).float()
                lr = torch.tensor(hp["lr"], dtype=f32)
                t = torch.tensor(float(step), dtype=f32)
                pf, gf = p.float().view(-1), g.float().view(-1)
                pf = pf - lr * hp["weight_decay"] * pf
                bc1, bc2 = 1 - hp["beta1"] ** t, 1 - hp["beta2"] ** t
                m = m.lerp(gf, 1 - hp["beta1"])
                v = v.lerp(gf.square(), 1 - hp["beta2"])
                denom = (v.sqrt() / bc2.sqrt()) + hp["eps"]
                pf = pf - lr * (m / bc1) / denom
                p.copy_(pf.view(p.shape))
                if quantized:
                    st["exp_avg"], st["exp_avg_scale"] = quantize(m, qs)
                    st["exp_avg_sq"], st["exp_avg_sq_scale"] = quantize(v, qu)
                else:
                    st["exp_avg"].copy_(m)
                    st["exp_avg_sq"].copy_(v)
            elif algorithm == "came":
                gf = g.float()
                factored = p.dim() >= 2
                if not st:
                    st["exp_avg"] = torch.zeros_like(gf)
                    if factored:
                        st["exp_avg_sq_row"] = torch.zeros(gf.shape[:-1])
                        st["exp_avg_sq_col"] = torch.zeros(gf.shape[:-2] + gf.shape[-1:])
                        st["exp_avg_res_row"] = torch.zeros(gf.shape[:-1])
                        st["exp_avg_res_col"] = torch.zeros(gf.shape[:-2] + gf.shape[-1:])
                    else:
                        st["exp_avg_sq"] = torch.zeros_like(gf)
                b1, b2, b3 = hp["beta1"], hp["beta2"], hp["beta3"]

                def approx(row, col):
                    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()

                u = gf ** 2 + hp["eps1"]
                if factored:
                    st["exp_avg_sq_row"].mul_(b2).add_(u.mean(dim=-1), alpha=1 - b2)
                    st["exp_avg_sq_col"].mul_(b2).add_(u.mean(dim=-2), alpha=1 - b2)
                    update = approx(st["exp_avg_sq_row"], st["exp_avg_sq_col"]).mul_(gf)
                else:
                    st["exp_avg_sq"].mul_(b2).add_(u, alpha=1 - b2)
                    update = st["exp_avg_sq"].rsqrt().mul_(gf)
                update.div_((update.norm(2) / (update.numel() ** 0.5) / hp["clip_threshold"]).clamp_(min=1.0))
                st["exp_avg"].mul_(b1).add_(update, alpha=1 - b1)
                if factored:
                    res = (update - st["exp_avg"]) ** 2 + hp["eps2"]
                    st["exp_avg_res_row"].mul_(b3).add_(res.mean(dim=-1), alpha=1 - b3)
                    st["exp_avg_res_col"].mul_(b3).add_(res.mean(dim=-2), alpha=1 - b3)
                    update = approx(st["exp_avg_res_row"], st["exp_avg_res_col"]).mul_(st["exp_avg"])
                else:
                    update = st["exp_avg"].clone()
                if hp["weight_decay"] != 0:
                    p.add_(p, alpha=-hp["weight_decay"] * hp["lr"])
                p.add_(-(update * hp["lr"]))
            elif algorithm == "slimadam":
                dims = hp["compress_dims"].get(tuple(p.shape)) if p.dim() >= 2 else None
                mu = st.setdefault("exp_avg", torch.zeros_like(p, dtype=S))
                gsq = g.float() ** 2 if dims is None else torch.mean(g.float() * g.float(), dim=dims, keepdim=True)
                nu = st.setdefault("exp_avg_sq" if dims is None else "nu", torch.zeros_like(gsq, dtype=S))
                mu.mul_(hp["beta1"]).add_(g, alpha=1 - hp["beta1"])
                nu.mul_(hp["beta2"]).add_(gsq.to(S), alpha=1 - hp["beta2"])
                wd = hp["weight_decay"] if p.dim() >= 2 else 0.0
                if wd > 0:
                    p.mul_(1 - hp["lr"] * wd)
                mu_hat = mu.float() / (1 - hp["beta1"] ** step)
                nu_hat = nu.float() / (1 - hp["beta2"] ** step)
                p.add_(-(hp["lr"] * (mu_hat / (nu_hat.sqrt() + hp["eps"]))).to(p.dtype))
    if algorithm == "adafactor":
        params = [torch.nn.Parameter(p) for p in params]
        opt = torch.optim.Adafactor(params, lr=hp["lr"], beta2_decay=hp["beta2_decay"], eps=(None, hp["eps2"]),
                                    d=hp["d"], weight_decay=hp["weight_decay"], maximize=hp["maximize"])
        for step in range(STEPS):
            for p, g in zip(params, grads_per_step[step]):
                p.grad = g.clone()
            opt.step()
        states = [{k: v for k, v in opt.state[p].items() if k != "step" and v is not None} for p in params]
        params = [p.detach() for p in params]
    return {"param": params, "state": [{k: v.reshape(-1) for k, v in s.items()} for s in states]}


# --- the cases -------------------------------------------------------------------------------------

SHAPES = [(37,), (64, 96), (3, 40, 72), (8192,)]
HP = {
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    "adam": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=True, maximize=True),
    "sgd": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False),
    "lion": dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1),
    "adamw8bit": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False),
    "adafactor": dict(lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=1e-2, maximize=False),
    "came": dict(lr=2e-4, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=1e-2),
    "slimadam": dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                     compress_dims={(64, 96): (1,), (3, 40, 72): (1,)}),
}
SGD_NESTEROV = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True)


def cases():
    for algorithm in HP:
        pairs = cs.dtype_pairs(algorithm)
        for pdtype, sdtype in pairs:
            if algorithm in ("adafactor", "adamw", "adam", "sgd") and sdtype != pdtype:
                continue  # the CPU path keeps these states in the parameter's dtype
            yield algorithm, pdtype, sdtype


def tolerance(pdtype: str) -> dict:
    return dict(rtol=1e-5, atol=1e-6) if pdtype == "float32" else dict(rtol=2e-2, atol=2e-2)


def make_inputs(pdtype: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    P = DTYPES[pdtype]
    params = [torch.randn(s, generator=gen).to(P) for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen) * 0.1).to(P) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("algorithm,pdtype,sdtype", list(cases()))
def test_kernel_matches_cpu(algorithm, pdtype, sdtype):
    hp = HP[algorithm]
    params, grads = make_inputs(pdtype)
    gpu = run_gpu(algorithm, hp, params, grads, pdtype, sdtype)
    cpu = run_cpu(algorithm, hp, params, grads, pdtype, sdtype)
    tol = tolerance(pdtype)
    for index, (got, want) in enumerate(zip(gpu["param"], cpu["param"])):
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"param {index}: {m}")
    for index, (got_state, want_state) in enumerate(zip(gpu["state"], cpu["state"])):
        for name, want in want_state.items():
            if name in ("scratch", "means", "sums", "stats"):
                continue
            got = got_state[name]
            if want.dtype == torch.uint8:  # 8-bit codes: equal except at rounding ties
                assert (got != want).float().mean().item() < 1e-3, f"{name} of tensor {index}"
                continue
            torch.testing.assert_close(got.float(), want.float().reshape(-1), **tol,
                                       msg=lambda m: f"{name} of tensor {index}: {m}")


def test_sgd_nesterov_maximize():
    params, grads = make_inputs("float32", seed=1)
    gpu = run_gpu("sgd", SGD_NESTEROV, params, grads, "float32", "float32")
    cpu = run_cpu("sgd", SGD_NESTEROV, params, grads, "float32", "float32")
    for got, want in zip(gpu["param"], cpu["param"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["adamw", "sgd", "lion", "adamw8bit", "slimadam"])
def test_master_weights_follow_the_fp32_path(algorithm):
    """bf16 parameters with an fp32 master copy and fp32 state step like fp32 parameters, rounded once."""
    hp = HP[algorithm]
    params32, grads32 = make_inputs("float32", seed=2)
    params16 = [p.to(torch.bfloat16) for p in params32]
    grads16 = [[g.to(torch.bfloat16) for g in step] for step in grads32]
    with_master = run_gpu(algorithm, hp, params16, grads16, "bfloat16", "float32", master=True)
    reference = run_gpu(algorithm, hp, [p.float() for p in params16], [[g.float() for g in s] for s in grads16],
                        "float32", "float32")
    for got, want in zip(with_master["param"], reference["param"]):
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)
