"""`stated plan`: how much memory training needs per GPU and per node, for every optimizer side by side.

The arithmetic is the standard one (ZeRO paper, section 3): per parameter, weights and gradients in the
training precision, plus fp32 master weights under mixed precision, plus the optimizer's state. For
mixed-precision AdamW that is 2 + 2 + 4 + 8 = 16 bytes, 112 GB for 7B parameters, before activations.
State sizes per tensor come from stated.tools.model_size; this module applies precision and sharding, decides
what fits, recommends a configuration and prints it.

Note [planner units]: every figure is printed in decimal GB (10^9 bytes), the unit of the published
figures (112 GB for 7B under AdamW). Input sizes take either decimal (GB) or binary (GiB) units.

Note [planner sharding]: `--shard state` (the default) is ZeRO-1 / FSDP-with-replicated-weights: each of
the N data-parallel GPUs keeps 1/N of the optimizer state and of the master weights, and a full copy of
the weights and gradients. `grads` (ZeRO-2) also splits gradients, `full` (ZeRO-3 / FSDP FULL_SHARD)
splits everything, `none` (plain DDP) splits nothing. When stated pages the state, the master weights
and state of a node's GPUs move to that node's daemon, so the host holds GPUs-per-node times one GPU's
share.
"""

from __future__ import annotations

import dataclasses
import decimal
import os
import re
import textwrap

from stated import sizes
from stated.tools.model_size import ALGORITHMS, Model, ModelError, from_count, model_state_bytes

GB = 10**9
GiB = 2**30
DEFAULT_HIDDEN = 4096
DEFAULT_GPU_MEMORY = 80 * GiB
DEFAULT_RESERVE = 0.10

# bytes per parameter of (weights, gradients, master weights); mixed precision keeps an fp32 master copy.
PRECISIONS = {"fp32": (4, 4, 0), "bf16": (2, 2, 4), "fp16": (2, 2, 4)}
SHARDS = {  # which parts are split across the GPUs (Note [planner sharding])
    "none": frozenset(),
    "state": frozenset({"master", "state"}),
    "grads": frozenset({"master", "state", "grads"}),
    "full": frozenset({"weights", "master", "state", "grads"}),
}
_SHARD_WORDS = {
    "none": "(DDP): nothing split, every GPU holds everything",
    "state": "(ZeRO-1): state and master weights split across GPUs; weights, gradients replicated",
    "grads": "(ZeRO-2): state, master weights and gradients split; weights replicated",
    "full": "(ZeRO-3 / FSDP full shard): everything split across GPUs",
}
# Tried in this order while state stays in the training process; after them, stated's paging.
_IN_PROCESS_ORDER = ("adamw", "adamw8bit", "adafactor")


class PlanError(ModelError):
    """Bad input to the planner, naming the flag."""


@dataclasses.dataclass(frozen=True)
class Footprint:
    weights: int
    master: int
    grads: int
    state: int

    @property
    def total(self) -> int:
        return self.weights + self.master + self.grads + self.state

    def sharded(self, shard: str, gpus: int) -> Footprint:
        split = SHARDS[shard]
        return Footprint(**{k: -(-v // gpus) if k in split else v for k, v in dataclasses.asdict(self).items()})


@dataclasses.dataclass(frozen=True)
class Recommendation:
    algorithm: str
    paged: bool  # state on host and disk with stated, rather than on the GPU
    fits: bool
    gpu_bytes: int  # per GPU
    host_bytes: int = 0  # per node, for stated
    disk_bytes: int = 0  # per node, for stated
    text: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    model: Model
    precision: str
    gpus: int
    nodes: int
    gpu_memory: int
    gpu_budget: int  # gpu_memory less the reserve for activations and the CUDA context
    host_memory: int  # per node
    disk: int | None  # per node; None = not limited
    shard: str
    whole: dict[str, Footprint]  # one copy of everything, before sharding
    per_gpu: dict[str, Footprint]  # state in the training process
    paged_node: dict[str, int]  # with stated: master weights + state of one node's GPUs, on host and disk
    recommendation: Recommendation

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    def fits_gpu(self, algorithm: str) -> bool:
        return self.per_gpu[algorithm].total <= self.gpu_budget

    @property
    def paged_gpu(self) -> int:
        """Per GPU with stated: weights and gradients only (the same for every algorithm)."""
        f = self.per_gpu["adamw"]
        return f.weights + f.grads


def parse_count(text: str, flag: str = "--params") -> int:
    """'7B', '1.3B', '350M', '70e9', '125000000', '1_000' -> an exact integer (decimal, no float error)."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][0-9]{1,2})?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise PlanError(flag, f"{text!r} is not a parameter count (examples: 7B, 1.3B, 350M, 70e9, 125000000)")
    value = decimal.Decimal(m.group(1).replace("_", "").replace(",", ""))
    value *= 10 ** {"": 0, "k": 3, "m": 6, "b": 9, "t": 12}[m.group(2).lower()]
    if value != value.to_integral_value() or value <= 0:
        raise PlanError(flag, f"{text!r} is not a positive whole number of parameters")
    return int(value)


def parse_size(text: str, flag: str, minimum: int = 1) -> int:
    """'80GiB', '512GB', '1.5TB' -> bytes, spelled as every stated flag spells sizes (stated.sizes)."""
    try:
        value = sizes.parse_size(text)
    except ValueError as e:
        raise PlanError(flag, str(e)) from None
    if value < minimum:
        raise PlanError(flag, f"{text!r} must be at least {minimum} bytes")
    return value


def host_total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gb(n: int) -> str:
    return f"{n / GB:,.2f} GB"


def plan(model: Model | int, *, precision: str = "bf16", gpus: int = 1, nodes: int = 1,
         gpu_memory: int = DEFAULT_GPU_MEMORY, reserve: float | int = DEFAULT_RESERVE,
         host_memory: int | None = None, disk: int | None = None, shard: str = "state",
         hidden: int = DEFAULT_HIDDEN) -> Plan:
    """The memory plan. `model` is a Model or a bare parameter count (then shaped by `hidden`);
    `reserve` is a fraction of `gpu_memory` (float) or bytes (int) kept for activations and the CUDA
    context; `host_memory` and `disk` are per node, host_memory defaulting to this machine's RAM."""
    if precision not in PRECISIONS:
        raise PlanError("--precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if shard not in SHARDS:
        raise PlanError("--shard", f"{shard!r} is not one of {', '.join(SHARDS)}")
    if gpus < 1:
        raise PlanError("--gpus", f"must be at least 1, got {gpus}")
    if nodes < 1 or gpus % nodes:
        raise PlanError("--nodes", f"must be at least 1 and divide --gpus {gpus}, got {nodes}")
    if hidden < 1:
        raise PlanError("--hidden", f"must be at least 1, got {hidden}")
    if gpu_memory <= 0:
        raise PlanError("--gpu-memory", f"must be more than zero bytes, got {gpu_memory}")
    reserve_bytes = int(gpu_memory * reserve) if isinstance(reserve, float) else reserve
    if not 0 <= reserve_bytes < gpu_memory:
        got = f"{reserve:.0%}" if isinstance(reserve, float) else gb(reserve)
        raise PlanError("--reserve", f"must be at least 0 and less than --gpu-memory, got {got}")
    if isinstance(model, int):
        model = from_count(model, hidden, f"{model:,} parameters")
    host_memory = host_total_memory() if host_memory is None else host_memory

    w, g, master = PRECISIONS[precision]
    n, trainable = model.params, model.trainable
    whole = {a: Footprint(weights=w * n, master=master * trainable, grads=g * trainable,
                          state=model_state_bytes(a, model)) for a in ALGORITHMS}
    per_gpu = {a: f.sharded(shard, gpus) for a, f in whole.items()}
    per_node = gpus // nodes
    paged_node = {a: per_node * (f.master + f.state) for a, f in per_gpu.items()}
    p = Plan(model, precision, gpus, nodes, gpu_memory, gpu_memory - reserve_bytes, host_memory, disk, shard,
             whole, per_gpu, paged_node, Recommendation("", False, False, 0))
    return dataclasses.replace(p, recommendation=recommend(p))


def recommend(p: Plan) -> Recommendation:
    """fp32 AdamW in process if it fits, else AdamW8bit, else Adafactor, else AdamW paged by stated
    (exact AdamW; the GPU keeps only weights and gradients)."""
    for a in _IN_PROCESS_ORDER:
        if p.fits_gpu(a):
            used = p.per_gpu[a].total
            return Recommendation(a, False, True, used, text=(
                f"{a} with its state on the GPU: {gb(used)} of the {gb(p.gpu_budget)} budget per GPU."))
    gpu, need = p.paged_gpu, p.paged_node["adamw"]
    if gpu > p.gpu_budget:
        text = (f"weights and gradients alone need {gb(gpu)} per GPU, over the {gb(p.gpu_budget)} budget, "
                f"even with stated holding the state. Use more GPUs")
        if p.shard != "full":
            full = plan(p.model, precision=p.precision, gpus=p.gpus, nodes=p.nodes, gpu_memory=p.gpu_memory,
                        reserve=p.gpu_memory - p.gpu_budget, host_memory=p.host_memory, disk=p.disk,
                        shard="full").recommendation
            text += (f", or --shard full, with which: {full.text.rstrip('.')}" if full.fits else " or --shard full")
        return Recommendation("adamw", True, False, gpu, need, need, text=text + ".")
    host = min(need, p.host_memory)
    text = (f"adamw with stated paging its state: {gb(gpu)} per GPU (weights and gradients); per node "
            f"stated holds {gb(need)} of master weights and state, with a host budget of {gb(host)} "
            f"(stated serve --host-memory) and {gb(need)} of disk for its state files (every page has a "
            f"slot there, which is also the checkpoint).")
    if need > host:
        text += f" Each step reads and writes about {gb(need - host)} from disk: faster NVMe or more RAM helps."
    fits = p.disk is None or p.disk >= need
    if not fits:
        text += f" Does not fit: --disk gives {gb(p.disk)}, the state files need {gb(need)}."
    return Recommendation("adamw", True, fits, gpu, host, need, text)


def _table(title: str, rows: list[tuple[str, list[str]]]) -> list[str]:
    header = [title] + list(ALGORITHMS)
    body = [[label] + cells for label, cells in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:], widths[1:])]).rstrip()

    return [line(header), "-" * len(line(header))] + [line(r) for r in body]


def _cell(n: int) -> str:
    """GB with two decimals; a nonzero figure that would print as 0.00 prints as <0.01."""
    return "<0.01" if 0 < n < GB / 200 else f"{n / GB:,.2f}"


def _footprint_rows(fs: dict[str, Footprint]) -> list[tuple[str, list[str]]]:
    return [(label, [_cell(getattr(fs[a], key)) for a in ALGORITHMS]) for label, key in (
        ("weights", "weights"), ("master weights", "master"), ("gradients", "grads"),
        ("optimizer state", "state"), ("total", "total"))]


def render(p: Plan) -> str:
    """The plan as readable text: a header of inputs and assumptions, three tables, a recommendation."""
    m = p.model
    out = [f"stated plan for {m.params:,} parameters ({m.params / 1e9:.2f} B) from {m.source}"]
    if m.trainable != m.params:
        out.append(f"  {m.trainable:,} trainable; frozen parameters get no gradients, master copy or state")
    out += [
        "  precision: " + ("fp32 weights, gradients and state" if p.precision == "fp32" else
                           f"{p.precision} mixed (weights and gradients {p.precision}, master weights and state fp32)"),
        f"  GPUs: {p.gpus} x {gb(p.gpu_memory)} on {p.nodes} node{'s' * (p.nodes > 1)}, less "
        f"{gb(p.gpu_memory - p.gpu_budget)} reserved for activations: budget {gb(p.gpu_budget)} per GPU",
        f"  sharding: --shard {p.shard} {_SHARD_WORDS[p.shard]}",
        f"  host memory per node: {gb(p.host_memory)}; disk per node: "
        f"{gb(p.disk) if p.disk is not None else 'not limited'}",
    ]
    out += [f"  assumption: {a}" for a in m.assumptions]
    out += ["  units: GB = 10^9 bytes; activations are not included", ""]
    whole = _footprint_rows(p.whole)
    whole.append(("bytes per parameter", [f"{p.whole[a].total / m.params:.2f}" for a in ALGORITHMS]))
    out += _table("One copy of the model, GB", whole) + [""]
    gpu = _footprint_rows(p.per_gpu)
    gpu.append((f"fits in {gb(p.gpu_budget)}", ["yes" if p.fits_gpu(a) else "no" for a in ALGORITHMS]))
    out += _table("Per GPU, state on the GPU, GB", gpu) + [""]
    k = p.gpus_per_node
    paged = [("per GPU: weights + gradients", [_cell(p.paged_gpu)] * len(ALGORITHMS)),
             ("per node: master weights", [_cell(k * p.per_gpu[a].master) for a in ALGORITHMS]),
             ("per node: optimizer state", [_cell(k * p.per_gpu[a].state) for a in ALGORITHMS]),
             ("per node: total, host or disk", [_cell(p.paged_node[a]) for a in ALGORITHMS]),
             (f"all in host memory ({gb(p.host_memory)})",
              ["yes" if p.paged_node[a] <= p.host_memory else "no" for a in ALGORITHMS])]
    out += _table("State paged by stated, GB", paged) + [""]
    r = p.recommendation
    out += textwrap.wrap(("Recommendation: " if r.fits else "No configuration fits: ") + r.text, 100,
                         subsequent_indent="  ")
    return "\n".join(out) + "\n"
