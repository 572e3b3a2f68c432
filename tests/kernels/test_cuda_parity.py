"""The CUDA kernels, driven through cuda_runner, against the CPU modules (needs CuPy and a CUDA device;
skipped without them).

Each case registers five tensors (0-D to 3-D; quantized and not; SlimAdam's static, uncompressed and
non-consecutive rules) in a param and a grad arena laid out by stated.layout, cut into 16 KiB pages so
that tensors span pages and pages hold several tensors, and runs three steps twice: the CPU module the
way the CPU backend drives it (Note [step order], Note [master weights], gradients multiplied in the
arena) and the kernels the way cuda_runner's docstring says. Parameters, every page field and the
small state must agree within the tolerances below; `test_state_crosses_between_cpu_and_gpu` hands
pages and small state from one to the other halfway.

The harness takes the cupy module as an argument, so test_cuda_emulated.py runs the same cases
through a CPU emulation of the kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

import stated_kernels
from stated.layout import Page, cut_pages, place_tensors
from stated.session import MASTER
from stated_kernels import cuda_runner
from stated_kernels import cuda_tables as cs
from stated_kernels.spec import Algorithm, FieldSpec, Segment, TensorInfo

STEPS = 3
PAGE_BYTES = 16 << 10
TENSORS = [
    ("ln_f.weight", (37,)),
    ("h.0.attn.q_proj.weight", (64, 96)),  # SlimAdam K = (1,); 8-bit: quantized
    ("h.0.mlp.c_fc.weight", (3, 40, 72)),  # SlimAdam K = (0,); 8-bit: 8640 % 256 != 0, float state
    ("bias", (8192,)),  # 8-bit: quantized
    ("experts.w|compress_dims=0,2", (4, 6, 10)),  # SlimAdam: K of two runs (kind 2)
]
CONFIGS: dict[str, tuple[str, dict]] = {
    "adamw": ("adamw", {"lr": 1e-2, "weight_decay": 1e-2}),
    "adamw-amsgrad-maximize": ("adamw", {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True, "maximize": True}),
    "adam-l2-amsgrad": ("adam", {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    "sgd-momentum": ("sgd", {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    "sgd-nesterov-maximize": ("sgd", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "maximize": True}),
    "sgd-plain": ("sgd", {"lr": 1e-2, "weight_decay": 1e-2}),
    "lion": ("lion", {"lr": 1e-3, "weight_decay": 0.1}),
    "lion-decoupled": ("lion", {"lr": 1e-3, "weight_decay": 1e-4, "decoupled_weight_decay": True, "init_lr": 2e-3}),
    "adamw8bit": ("adamw8bit", {"lr": 1e-2, "weight_decay": 1e-2}),
    "adamw8bit-amsgrad": ("adamw8bit", {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    "adafactor": ("adafactor", {"lr": 1e-2, "weight_decay": 1e-2}),
    "adafactor-maximize": ("adafactor", {"lr": 3e-3, "maximize": True, "beta2_decay": -0.6, "d": 2.0, "eps1": 1e-6}),
    "came": ("came", {"lr": 2e-4, "weight_decay": 1e-2}),
    "slimadam": ("slimadam", {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}),
}
# (param dtype, master weights). Without master weights the state type is the parameter's (CAME:
# float32); with them the algorithm works on float32 and the arenas stay 16-bit.
MODES = [("float32", False), ("bfloat16", False), ("float16", False), ("bfloat16", True), ("float16", True)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
# The gradient multiplier (hp[31]): 0.37 is not a power of two, so float32 gradients test the
# float32 product; for 16-bit gradients the CPU backend multiplies the arena in place (rounding to
# P), which equals the kernels' unrounded product only for a power of two.
MULTIPLIER = {"float32": 0.37, "bfloat16": 2.0, "float16": 2.0}

# --- tolerances -------------------------------------------------------------------------------------
#
# Compared as |got - want| <= rtol * |want| + atol * max|want| per tensor, failing when more than
# `frac` of the elements are outside (0: none may be).
#
# float32 math (float32 parameters, or master weights): each kernel repeats its CPU module's
# roundings (cuda/README.md, "Numerics"), except that ATen's vector code may fuse a multiply-add the
# kernel rounds separately (or the reverse) and that whole-tensor sums (Adafactor's R, C and norms,
# CAME's, SlimAdam's compressed nu) add in another order: about 1e-7 relative per step each. Over
# three steps, and through sqrt(v) and the factored normalizers, that stays below 1e-5; atol covers
# values that cross zero (moments).
F32 = (1e-5, 1e-6, 0.0)
# 16-bit parameters and state without master weights: the kernels round each intermediate to P where
# the CPU module computes in P, so values agree to an ulp of P; a different float sum can move one P
# rounding, and rounding differences feed the next step: 2 ulps (bf16 2^-7, fp16 2^-10 relative),
# with 1% of elements allowed past that (Lion's sign of a c within an ulp of 0, an 8-bit-free
# moment near a rounding boundary).
P16 = {"bfloat16": (2.0**-7, 2.0**-7, 0.01), "float16": (2.0**-10, 2.0**-10, 0.01)}
# 16-bit arena parameters with master weights: each is the rounded master on both sides, so they
# differ only where the float32 masters (within F32 of each other) straddle a rounding boundary: one
# ulp of P, or F32's absolute floor for values near zero. One ulp is 2^-7 (bf16, 8 significant bits)
# or 2^-10 (fp16, 11) of the power of two at or below the value, which is between half of 2^-7 times
# the value and all of it: relative to the value itself, 2^-8 is less than one ulp everywhere (a
# parameter whose masters straddle a boundary failed on an H200), and 2^-7 allows two ulps near the
# top of a binade. So this tolerance is relative to the binade (the fourth field), not the value.
ONE_ULP = {"bfloat16": (2.0**-7, F32[1], 0.0, "binade"), "float16": (2.0**-10, F32[1], 0.0, "binade")}
# AdamW8bit codes: every operation is specified (float32, rounded on its own), so codes should be
# equal; one code apart is allowed where a value lands within rounding of a midpoint, for at most
# 0.1% of the codes.
CODE_FRACTION = 1e-3


def tolerance(pdtype: str, master: bool, dtype: torch.dtype, quantity: str) -> tuple:
    """quantity: "param" (the arena), "state" (page fields, master, small state). (rtol, atol, frac),
    and "binade" fourth where rtol is relative to the power of two at or below |want| (ONE_ULP)."""
    if quantity == "param" and pdtype != "float32":
        return ONE_ULP[pdtype] if master else P16[pdtype]
    if dtype in (torch.bfloat16, torch.float16):
        return P16[str(dtype)[6:]]
    return F32


def binade(x: torch.Tensor) -> torch.Tensor:
    """The power of two at or below |x| (0 for 0): |x| = m * 2^e with m in [0.5, 1) gives 2^(e - 1)."""
    mantissa, exponent = torch.frexp(x.abs())
    return torch.where(mantissa == 0, torch.zeros_like(x), torch.ldexp(torch.full_like(x, 0.5), exponent))


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: tuple, what: str) -> None:
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    assert got.shape == want.shape, what
    rtol, atol, frac, *relative_to = tol
    scale = want.abs().max().item() if want.numel() else 0.0
    base = binade(want) if relative_to == ["binade"] else want.abs()
    bad = (got - want).abs() > rtol * base + atol * scale
    bad |= got.isnan() != want.isnan()
    bad &= ~(got.isnan() & want.isnan())
    count = int(bad.sum())
    if count > frac * got.numel():
        k = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {count} of {got.numel()} elements differ (allowed {frac:.3%}); first at "
                             f"{k}: got {got[k].item()!r}, want {want[k].item()!r}")


def assert_codes_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = (got.int() - want.int()).abs()
    assert (int(diff.max()) if diff.numel() else 0) <= 1, f"{what}: a code differs by more than one"
    assert int((diff != 0).sum()) <= CODE_FRACTION * diff.numel(), f"{what}: {int((diff != 0).sum())} codes differ"


# --- the problem ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    algorithm: Algorithm
    hp: dict
    pdtype: str
    master: bool
    infos: list[TensorInfo]  # with the dtype the algorithm sees
    fields: list[tuple[FieldSpec, ...]]
    offsets: list[int]  # element offsets in the arenas
    size: int  # arena elements
    pages: list[Page]
    params: torch.Tensor  # the initial param arena (P)
    grads: list[torch.Tensor]  # the grad arena of every step (P), before the multiplier
    multiplier: float

    @property
    def P(self) -> torch.dtype:
        return DTYPES[self.pdtype]

    def view(self, arena: torch.Tensor, i: int) -> torch.Tensor:
        return arena[self.offsets[i]: self.offsets[i] + self.infos[i].numel]


def make_problem(config: str, pdtype: str, master: bool, steps: int = STEPS, seed: int = 0) -> Problem:
    name, overrides = CONFIGS[config]
    algorithm = stated_kernels.lookup(name)
    hp = {**algorithm.defaults(), **overrides}
    assert algorithm.validate(dict(overrides)) is None
    P = DTYPES[pdtype]
    seen = torch.float32 if master else P
    infos = [TensorInfo(i, shape, seen, 0, label) for i, (label, shape) in enumerate(TENSORS)]
    fields = [algorithm.page_fields(info, hp) + ((MASTER,) if master else ()) for info in infos]
    byte_offsets, nbytes = place_tensors([dataclasses.replace(i, dtype=P) for i in infos], P.itemsize)
    pages = cut_pages(list(zip(infos, fields)), PAGE_BYTES, algorithm.block_elements, 0, 0)
    size = nbytes // P.itemsize
    gen = torch.Generator().manual_seed(seed)
    params = torch.zeros(size, dtype=P)
    offsets = [b // P.itemsize for b in byte_offsets]
    for info, off in zip(infos, offsets):
        params[off: off + info.numel] = torch.randn(info.numel, generator=gen).to(P)
    grads = []
    for step in range(steps):
        arena = torch.zeros(size, dtype=P)
        for i, (info, off) in enumerate(zip(infos, offsets)):
            drift = 0.05 * math.sin(0.3 * step + i)  # so that moments do not average out
            arena[off: off + info.numel] = (torch.randn(info.numel, generator=gen) * 0.1 + drift).to(P)
        grads.append(arena)
    return Problem(algorithm, hp, pdtype, master, infos, fields, offsets, size, pages, params, grads,
                   MULTIPLIER[pdtype])


@dataclasses.dataclass
class State:
    """Everything a step changes: the param arena, the page buffers and the small state."""

    params: torch.Tensor
    pages: list[torch.Tensor]
    small: list[dict[str, Any]]

    def clone(self) -> State:
        small = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in self.small]
        return State(self.params.clone(), [p.clone() for p in self.pages], small)


def bind(pr: Problem, page: Page, buffer: torch.Tensor, params: torch.Tensor, grads: torch.Tensor,
         small: list[dict]) -> list[Segment]:
    segments = []
    for seg in page.segments:
        fields = {fp.field.name: buffer[fp.offset: fp.offset + fp.field.nbytes(seg.length)].view(fp.field.dtype)
                  for fp in seg.fields}
        param = pr.view(params, seg.tensor)[seg.start: seg.start + seg.length]
        grad = pr.view(grads, seg.tensor)[seg.start: seg.start + seg.length]
        segments.append(Segment(pr.infos[seg.tensor], seg.start, fields["master"] if pr.master else param,
                                grad.float() if pr.master else grad, fields, small[seg.tensor]))
    return segments


def initial_state(pr: Problem) -> State:
    """Fresh pages as the session makes them: init_fields, and the master copy from the arena."""
    params = pr.params.clone()
    small = [pr.algorithm.init_small_state(info, pr.hp) for info in pr.infos]
    pages = []
    for page in pr.pages:
        # Page.nbytes counts state bytes only: where a stateless segment (a factored Adafactor tensor
        # without master weights) comes first, the fields after it lie past it. The pager's buffers
        # are page_bytes long; these end at the last field.
        end = max([fp.offset + fp.field.nbytes(seg.length) for seg in page.segments for fp in seg.fields],
                  default=0)
        buffer = torch.full((max(end, 64),), 0xA5, dtype=torch.uint8)
        for s in bind(pr, page, buffer, params, torch.zeros_like(params), small):
            pr.algorithm.init_fields(s)
            if pr.master:
                s.param.copy_(pr.view(params, s.tensor.index)[s.start: s.start + s.length])
        pages.append(buffer)
    return State(params, pages, small)


# --- the CPU side: the CPU backend's calls ----------------------------------------------------------


def run_cpu(pr: Problem, state: State, steps: range) -> State:
    state = state.clone()
    algorithm, hp = pr.algorithm, pr.hp
    grads = torch.empty_like(state.params)
    for step in steps:
        grads.copy_(pr.grads[step])
        grads.mul_(pr.multiplier)  # the CPU backend scales the arena in place
        for i, info in enumerate(pr.infos):
            algorithm.begin_step(info, state.small[i], hp)
            algorithm.prepass(info, pr.view(state.params, i).view(info.shape), pr.view(grads, i).view(info.shape),
                              state.small[i], hp)
        for k in range(algorithm.passes):
            for page, buffer in zip(pr.pages, state.pages):
                segments = bind(pr, page, buffer, state.params, grads, state.small)
                algorithm.update(segments, hp, k)
                if pr.master:
                    for s in segments:
                        pr.view(state.params, s.tensor.index)[s.start: s.start + s.length].copy_(s.param)
            if k + 1 < algorithm.passes:
                for i, info in enumerate(pr.infos):
                    algorithm.between_passes(info, state.small[i], hp, k)
    return state


# --- the GPU side: cuda_runner's calls --------------------------------------------------------------


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().reshape(-1)
    return (t.view(RAW[t.dtype]) if t.dtype in RAW else t).numpy()


def unbits(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))
    return t.view(dtype) if dtype in RAW else t


def run_gpu(pr: Problem, state: State, steps: range, cupy: Any) -> State:
    state = state.clone()
    algorithm, hp = pr.algorithm, pr.hp
    cuda = cuda_runner.CudaAlgorithm(algorithm, pr.P, pr.infos[0].dtype, 0)
    d_params = cupy.asarray(bits(state.params))
    d_grads = cupy.asarray(bits(pr.grads[0]))
    d_pages = [cupy.asarray(buffer.numpy()) for buffer in state.pages]
    smalls = [cuda.device_small(info, state.small[i]) for i, info in enumerate(pr.infos)]
    tables = [cuda.segment_rows(page.segments, pr.offsets) for page in pr.pages]
    d_tables = [cuda_runner.upload(t) for t in tables]
    ids = cuda_runner.tensor_list(range(len(pr.infos)), [info.numel for info in pr.infos])
    tensors = cs.tensor_table(len(pr.infos))
    flags = cuda.flags(hp)
    for step in steps:
        d_grads.set(bits(pr.grads[step]))
        for i, info in enumerate(pr.infos):
            algorithm.begin_step(info, state.small[i], hp)
            cuda.tensor_row(tensors[i], info, hp, float(state.small[i]["step"]), smalls[i], pr.offsets[i],
                            pr.offsets[i], pr.multiplier)
        d_tensors = cuda_runner.upload(tensors)
        cuda.prepass(None, ids, d_tensors, d_params, d_grads)
        for k in range(cuda.passes):
            for table, d_table, d_page in zip(tables, d_tables, d_pages):
                cuda.page(None, k, d_table, len(table), cs.total_tiles(table), d_tensors, d_params, d_grads, d_page,
                          flags)
            cuda.between(None, k, ids, d_tensors, d_params, d_grads)
        cupy.cuda.Device(0).synchronize()
    state.params = unbits(cupy.asnumpy(d_params), pr.P)
    state.pages = [torch.from_numpy(np.array(cupy.asnumpy(d), copy=True)) for d in d_pages]
    for i in range(len(pr.infos)):
        cuda.copy_small_to_host(smalls[i], state.small[i])
    return state


# --- comparing ---------------------------------------------------------------------------------------


def gather(pr: Problem, state: State, i: int) -> dict[str, torch.Tensor]:
    """Tensor i's page fields, each as one flat tensor."""
    out: dict[str, list[torch.Tensor]] = {}
    for page, buffer in zip(pr.pages, state.pages):
        for seg in page.segments:
            if seg.tensor == i:
                for fp in seg.fields:
                    piece = buffer[fp.offset: fp.offset + fp.field.nbytes(seg.length)].view(fp.field.dtype)
                    out.setdefault(fp.field.name, []).append(piece)
    return {name: torch.cat(pieces) for name, pieces in out.items()}


def compare(pr: Problem, got: State, want: State) -> None:
    for i, info in enumerate(pr.infos):
        where = f"{pr.algorithm.name} {pr.pdtype}{' master' if pr.master else ''} tensor {i} {info.shape}"
        assert_close(pr.view(got.params, i), pr.view(want.params, i),
                     tolerance(pr.pdtype, pr.master, pr.P, "param"), f"{where} param")
        fields_got, fields_want = gather(pr, got, i), gather(pr, want, i)
        assert fields_got.keys() == fields_want.keys()
        for name, value in fields_want.items():
            if value.dtype == torch.uint8:
                assert_codes_close(fields_got[name], value, f"{where} {name}")
            else:
                assert_close(fields_got[name], value, tolerance(pr.pdtype, pr.master, value.dtype, "state"),
                             f"{where} {name}")
        if pr.master:  # the arena holds the rounded master copy
            assert torch.equal(pr.view(got.params, i), fields_got["master"].to(pr.P)), f"{where} rounding"
        for key, value in want.small[i].items():
            if isinstance(value, torch.Tensor) and not key.startswith("_") and value.numel() > 0:
                assert_close(got.small[i][key], value, tolerance(pr.pdtype, pr.master, value.dtype, "state"),
                             f"{where} small {key}")


def cases():
    for config, (name, _) in CONFIGS.items():
        for pdtype, master in MODES:
            yield pytest.param(config, pdtype, master, id=f"{config}-{pdtype}{'-master' if master else ''}")


# --- the tests (GPU) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    if getattr(cp, "STATED_EMULATED", False):
        pytest.skip("cupy is the CPU emulation")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device: the same for this test
        count = 0
    if count == 0:
        pytest.skip("no CUDA device")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("config,pdtype,master", list(cases()))
def test_kernels_match_the_cpu_module(cupy, config, pdtype, master):
    pr = make_problem(config, pdtype, master)
    start = initial_state(pr)
    compare(pr, run_gpu(pr, start, range(STEPS), cupy), run_cpu(pr, start, range(STEPS)))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["adamw", "sgd-momentum", "adamw8bit-amsgrad", "adafactor", "came", "slimadam"])
@pytest.mark.parametrize("pdtype,master", [("float32", False), ("bfloat16", True)])
def test_state_crosses_between_cpu_and_gpu(cupy, config, pdtype, master):
    """Pages and small state written by one side are continued by the other (state_dict export and
    import go through either)."""
    pr = make_problem(config, pdtype, master, steps=4)
    start = initial_state(pr)
    cpu = run_cpu(pr, start, range(4))
    compare(pr, run_gpu(pr, run_cpu(pr, start, range(2)), range(2, 4), cupy), cpu)
    compare(pr, run_cpu(pr, run_gpu(pr, start, range(2), cupy), range(2, 4)), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("pdtype", ["float32", "bfloat16", "float16"])
def test_gradstats(cupy, pdtype):
    P = DTYPES[pdtype]
    gen = torch.Generator().manual_seed(5)
    numels = [37, 64 * 96, 100_003, 1]
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end += -(-n // 32) * 32
    grads = torch.zeros(end, dtype=P)
    for n, off in zip(numels, offsets):
        grads[off: off + n] = (torch.randn(n, generator=gen) * 3).to(P)
    grads[offsets[1] + 17] = float("inf")
    grads[offsets[1] + 18] = float("nan")
    grads[offsets[2] + 99_999] = float("-inf")
    table = cs.tensor_table(len(numels))
    table["grad"], table["numel"] = offsets, numels
    ids_order = [2, 0, 3]  # outputs follow the order of ids, not of rows
    ids = cuda_runner.tensor_list(ids_order, [numels[i] for i in ids_order])
    stats = cuda_runner.GradStats(P)
    d_grads, d_table = cupy.asarray(bits(grads)), cuda_runner.upload(table)
    sumsq, bad = stats.gradstats(None, ids, d_table, d_grads, 0.125)
    again, _ = stats.gradstats(None, ids, d_table, d_grads, 0.125)
    sumsq, bad, again = cupy.asnumpy(sumsq), cupy.asnumpy(bad), cupy.asnumpy(again)
    for k, i in enumerate(ids_order):
        g = grads[offsets[i]: offsets[i] + numels[i]].double()
        finite = torch.isfinite(g)
        assert bad[k] == int((~finite).sum())
        if finite.all():
            # float64 sums of exact float64 squares: only the order of additions differs.
            assert sumsq[k] == pytest.approx(float(((g * 0.125) ** 2).sum()), rel=1e-12)
        else:
            assert not math.isfinite(sumsq[k])
    assert np.array_equal(sumsq.view(np.uint64), again.view(np.uint64))  # deterministic
    ids = cuda_runner.tensor_list([1], [numels[1]])
    _, bad = stats.gradstats(None, ids, d_table, d_grads, 1.0)
    assert int(cupy.asnumpy(bad)[0]) == 2
