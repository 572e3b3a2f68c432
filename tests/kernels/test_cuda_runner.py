"""cuda_runner without a GPU: every CPU page field has exactly one kernel slot, the small buffers are the
CPU module's small state, and the tables and per-step scalars hold what cuda/README.md says."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import stated_kernels
from stated.layout import cut_pages, place_tensors
from stated.session import MASTER
from stated_kernels import cuda_spec
from stated_kernels import cuda_tables as cs
from stated_kernels.cuda_runner import CudaAlgorithm
from stated_kernels.cuda_small import DeviceSmall
from stated_kernels.slimadam import slim_plan
from stated_kernels.spec import TensorInfo

TENSORS = [  # (name, shape): 0-D, 1-D, 2-D, 3-D and 4-D, quantized and not, every SlimAdam kind
    ("scale", ()),
    ("ln_f.weight", (37,)),
    ("h.0.attn.q_proj.weight", (64, 96)),
    ("h.0.mlp.c_fc.weight", (3, 40, 72)),
    ("bias", (8192,)),
    ("experts.w|compress_dims=0,2", (4, 6, 10)),
    ("conv1.weight", (8, 3, 4, 4)),
]
CONFIGS = {  # algorithm -> hyperparameter sets that change the field set
    "adamw": [{}, {"amsgrad": True}],
    "adam": [{}, {"amsgrad": True}],
    "sgd": [{}, {"momentum": 0.9}],
    "lion": [{}],
    "adamw8bit": [{}, {"amsgrad": True}],
    "adafactor": [{}],
    "came": [{"lr": 1e-3}],
    "slimadam": [{"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}],
}
# (param dtype, master weights): the dtype the algorithm sees is float32 with master weights.
MODES = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
         (torch.float16, True)]


def cases():
    for name, configs in CONFIGS.items():
        for k, hp in enumerate(configs):
            for param, master in MODES:
                yield pytest.param(name, hp, param, master, id=f"{name}-{k}-{str(param)[6:]}{'-master' if master else ''}")


def setup(name, hp, param, master):
    algorithm = stated_kernels.lookup(name)
    hp = {**algorithm.defaults(), **hp}
    dtype = torch.float32 if master else param
    infos = [TensorInfo(i, shape, dtype, 0, label) for i, (label, shape) in enumerate(TENSORS)]
    fields = [algorithm.page_fields(info, hp) + ((MASTER,) if master else ()) for info in infos]
    return algorithm, hp, infos, fields, CudaAlgorithm(algorithm, param, dtype, 0)


@pytest.mark.parametrize("name,hp,param,master", list(cases()))
def test_every_cpu_field_has_one_slot(name, hp, param, master):
    algorithm, hp, infos, fields, cuda = setup(name, hp, param, master)
    for info, place in zip(infos, fields):
        slots = cuda.field_slots(place)
        assert len(slots) == len(cuda.cuda.slots)
        assert sorted(s for s in slots if s is not None) == sorted(f.name for f in place), info.name
        if master:
            assert slots[-1] == "master"


@pytest.mark.parametrize("name,hp,param,master", list(cases()))
def test_small_buffers_are_the_cpu_small_state(name, hp, param, master):
    algorithm, hp, infos, fields, cuda = setup(name, hp, param, master)
    for info in infos:
        small = algorithm.init_small_state(info, hp)
        plan = cuda.small_plan(info, small)
        resident = {k for k, v in small.items() if isinstance(v, torch.Tensor) and k != "step" and not k.startswith("_")}
        keyed = {s.key: s for s in plan.slots if s.key is not None}
        assert set(keyed) == resident, info.name
        for key, slot in keyed.items():
            assert (small[key].dtype, small[key].numel()) == (slot.dtype, slot.count), key
        assert len({s.slot for s in plan.slots}) == len(plan.slots) and all(0 <= s.slot < cs.N_SMALL for s in plan.slots)


def shape_class(plan):
    return plan.kind, plan.rows, plan.cols, plan.lead


def test_shape_classes():
    assert shape_class(slim_plan((8, 3, 4, 4), (1,), torch.float32)) == (1, 3, 16, 8)  # [outer, mid, inner] = (lead, rows, cols)
    assert shape_class(slim_plan((64, 96), (0, 1), torch.float32)) == (1, 6144, 1, 1)
    assert shape_class(slim_plan((2, 3, 4, 5), (1, 2), torch.float32)) == (1, 12, 5, 2)  # one run of two dims
    plan = slim_plan((4, 6, 10), (0, 2), torch.float32)
    assert shape_class(plan) == (2, 40, 1, 6)  # kind 2: lead = nu entries, rows = the K count
    assert plan.slots[1].const == (3, 0b101, 4, 6, 10)
    plan = slim_plan((2, 3, 4, 5), (0, 3), torch.float32)
    assert plan.slots[1].const == (3, 0b101, 2, 12, 5)
    with pytest.raises(ValueError, match="runs"):
        slim_plan((2,) * 9, (0, 2, 4, 6, 8), torch.float32)
    adafactor = CudaAlgorithm(stated_kernels.lookup("adafactor"), torch.float32, torch.float32)
    info = TensorInfo(0, (3, 40, 72), torch.float32, 0)
    plan = adafactor.small_plan(info, stated_kernels.lookup("adafactor").init_small_state(info, {}))
    assert shape_class(plan) == (1, 40, 72, 3)
    eight = CudaAlgorithm(stated_kernels.lookup("adamw8bit"), torch.float32, torch.float32)
    assert eight.small_plan(TensorInfo(0, (64, 96), torch.float32, 0), {}).kind == 1
    assert eight.small_plan(TensorInfo(0, (3, 40, 72), torch.float32, 0), {}).kind == 0  # 8640 % 256 != 0


def test_unknown_or_mistyped_fields_are_named():
    from stated_kernels.spec import FieldSpec

    cuda = CudaAlgorithm(stated_kernels.lookup("adamw"), torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="'bogus'"):
        cuda.field_slots((FieldSpec("bogus", torch.bfloat16),))
    with pytest.raises(ValueError, match="'exp_avg' is torch.float32"):
        cuda.field_slots((FieldSpec("exp_avg", torch.float32),))
    with pytest.raises(ValueError, match="no CUDA kernels for parameters float32 with state bfloat16"):
        CudaAlgorithm(stated_kernels.lookup("adamw"), torch.float32, torch.bfloat16)
    # CAME's state is float32 whatever the parameter: bf16 tensors get float state kernels.
    came = CudaAlgorithm(stated_kernels.lookup("came"), torch.bfloat16, torch.bfloat16)
    assert came.S == "float32"


def test_mismatched_small_state_is_named():
    cuda = CudaAlgorithm(stated_kernels.lookup("came"), torch.float32, torch.float32)
    info = TensorInfo(3, (8, 5), torch.float32, 0)
    small = stated_kernels.lookup("came").init_small_state(info, {"lr": 1e-3})
    small["exp_avg_res_col"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'exp_avg_res_col' of tensor 3"):
        cuda.small_plan(info, small)


def test_segment_rows_follow_the_page_layout():
    algorithm = stated_kernels.lookup("adamw")
    hp = {**algorithm.defaults(), "amsgrad": True}
    infos = [TensorInfo(i, shape, torch.float32, 0) for i, shape in enumerate([(37,), (64, 96), (5000,)])]
    placed = [(info, algorithm.page_fields(info, hp) + (MASTER,)) for info in infos]
    pages = cut_pages(placed, 32 << 10, algorithm.block_elements, 0, 0)
    assert len(pages) > 2 and any(len(p.segments) > 1 for p in pages)
    offsets, _ = place_tensors([dataclasses.replace(i, dtype=torch.bfloat16) for i in infos], 2)
    elements = [o // 2 for o in offsets]
    cuda = CudaAlgorithm(algorithm, torch.bfloat16, torch.float32)
    seen = {i: 0 for i in range(len(infos))}
    for page in pages:
        # tensor 1 sits in row 70 of some larger table
        table = cuda.segment_rows(page.segments, elements, tensor_rows={0: 0, 1: 70, 2: 2})
        assert table.dtype == cs.SEGMENT_DTYPE and len(table) == len(page.segments)
        tile = 0
        for row, seg in zip(table, page.segments):
            assert row["param"] == row["grad"] == elements[seg.tensor] + seg.start
            assert (row["length"], row["start"]) == (seg.length, seg.start)
            assert row["tensor"] == {0: 0, 1: 70, 2: 2}[seg.tensor]
            assert row["tile0"] == tile
            tile += math.ceil(seg.length / cs.TILE)
            by_name = {p.field.name: p.offset for p in seg.fields}
            assert list(row["field"][:4]) == [by_name["exp_avg"], by_name["exp_avg_sq"], by_name["max_exp_avg_sq"],
                                              by_name["master"]]
            assert list(row["field"][4:]) == [-1] * (cs.MAX_FIELDS - 4)
            assert seen[seg.tensor] == seg.start
            seen[seg.tensor] += seg.length
        assert cs.total_tiles(table) == tile
    assert seen == {i: info.numel for i, info in enumerate(infos)}


def test_tensor_row_packs_shape_small_pointers_and_scalars():
    algorithm = stated_kernels.lookup("adafactor")
    cuda = CudaAlgorithm(algorithm, torch.bfloat16, torch.bfloat16)
    info = TensorInfo(2, (3, 40, 72), torch.bfloat16, 0)
    hp = {**algorithm.defaults(), "weight_decay": 0.1}
    plan = cuda.small_plan(info, algorithm.init_small_state(info, hp))
    pointers = [0x1000, 0x2000, 0x3000, 0x4000, 0, 0, 0, 0]
    table = cs.tensor_table(4)
    cuda.tensor_row(table[2], info, hp, 5.0, DeviceSmall(plan, {}, pointers), 640, 1280, grad_multiplier=0.25)
    row = table[2]
    assert (row["param"], row["grad"], row["numel"]) == (640, 1280, 8640)
    assert (row["kind"], row["rows"], row["cols"], row["lead"]) == (1, 40, 72, 3)
    assert list(row["small"]) == pointers
    assert row["hp"][cs.GRAD_SCALE] == np.float32(0.25)
    expected, flags = cs.host_scalars("adafactor", hp, 5.0, numel=8640, ndim=3, dtype=torch.bfloat16,
                                      grad_multiplier=0.25)
    assert np.array_equal(row["hp"], expected) and flags == 0
    assert np.all(table["numel"][[0, 1, 3]] == 0)  # other rows untouched


def test_host_scalars_by_hand():
    f32 = np.float32
    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "amsgrad": True,
          "maximize": True}
    row, flags = cs.host_scalars("adamw", hp, 3)
    assert flags == cuda_spec.MAXIMIZE | cuda_spec.AMSGRAD | cuda_spec.DECOUPLED
    assert list(row[:8]) == [f32(0.1), f32(0.999), f32(1 - 0.999), f32(1e-8), f32(0.01), f32(1 - 1e-5),
                             f32(-1e-3 / (1 - 0.9**3)), f32(math.sqrt(1 - 0.999**3))]
    assert row[cs.GRAD_SCALE] == 1.0
    assert cs.host_scalars("adam", hp, 3)[1] == cuda_spec.MAXIMIZE | cuda_spec.AMSGRAD

    lion = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "decoupled_weight_decay": True,
            "init_lr": 2e-3}
    row, flags = cs.host_scalars("lion", lion, 1)
    assert flags == 0 and row[0] == f32(1 - 1e-3 * (0.1 / 2e-3)) and row[5] == f32(-1e-3)

    sgd = {"lr": 0.1, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.0, "nesterov": False, "maximize": False}
    assert list(cs.host_scalars("sgd", sgd, 1)[0][:5]) == [f32(-0.1), f32(0.9), f32(0.75), 0.0, 1.0]
    assert cs.host_scalars("sgd", sgd, 2)[0][4] == 0.0

    # Adafactor: torch's eps1 None is finfo(dtype).eps of the dtype the CPU module sees; rho, eps2 and d
    # travel as float64 in two floats.
    ada = {"lr": 1e-2, "beta2_decay": -0.8, "eps1": -1.0, "eps2": 1e-3, "d": 1.0, "weight_decay": 0.0,
           "maximize": True}
    row, flags = cs.host_scalars("adafactor", ada, 4, dtype=torch.bfloat16)
    assert flags == cuda_spec.MAXIMIZE
    assert row[0] == f32(4**-0.8) and row[1] == f32(2**-7) and row[2] == f32(2**-14)
    assert float(row[5]) + float(row[6]) == pytest.approx(min(1e-2, 0.5), rel=1e-14)
    assert float(row[7]) + float(row[8]) == pytest.approx(1e-3, rel=1e-14)
    assert cs.host_scalars("adafactor", ada, 4, dtype="float32")[0][1] == f32(2**-23)

    # AdamW8bit: bias corrections from float32 tensors, as the CPU module computes them.
    eight = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False}
    row, flags = cs.host_scalars("adamw8bit", eight, 7)
    step = torch.tensor(7.0)
    assert flags == 0
    assert row[5] == (1 - 0.9**step).item()
    assert row[6] == np.sqrt(f32((1 - 0.999**step).item()))
    assert row[1] == (torch.tensor(1e-3, dtype=torch.float32) * 0.01).item()
    assert (row[7], row[8]) == (0.0, 0.0)

    came = {"lr": 2e-4, "eps1": 1e-30, "eps2": 1e-16, "clip_threshold": 1.0, "beta1": 0.9, "beta2": 0.999,
            "beta3": 0.9999, "weight_decay": 0.5}
    row, _ = cs.host_scalars("came", came, 1, numel=6144)
    assert row[10] == f32(-0.5 * 2e-4) and row[12] == f32(math.sqrt(6144))

    slim = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    assert cs.host_scalars("slimadam", slim, 2, ndim=1)[0][7] == 0.0  # no decay below 2 dims
    row, _ = cs.host_scalars("slimadam", slim, 2, ndim=2, grad_multiplier=0.5)
    assert list(row[6:10]) == [f32(1 - 1e-4), f32(0.1), f32(1 - 0.81), f32(1 - 0.9025)]
    assert row[cs.GRAD_SCALE] == 0.5


def test_importing_the_runner_needs_no_cupy():
    code = "import sys, stated_kernels.cuda_runner; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
