"""What every algorithm module in stated_kernels provides, and the pieces the engine hands it.

An algorithm is described once, by an `Algorithm` object:

- its hyperparameters (`HyperSpec`): names as in the reference optimizer, defaults, and a check that
  returns a sentence naming the bad value;
- its state layout: elementwise fields that live in pages (`page_fields`) and small per-tensor state
  that stays resident (`init_small_state`);
- its CPU update over a list of `Segment`s, each a slice of one tensor that lies in one page;
- optional reductions over whole tensors before the page pass (`prepass`) and between passes;
- its CUDA kernels (`cuda`, a stated_kernels.cuda_spec.CudaSpec) with the per-step scalars, flags
  and resident buffers they take (`cuda_scalars`, `cuda_flags`, `cuda_small`);
- its state bytes per tensor for `stated plan` (`state_bytes`);
- its state_dict entry (`export_state` / `import_state`, the reference's keys).

How the rest reads it: the daemon's session and store call the layout and step methods, the CUDA
runner the `cuda*` members, the planner `state_bytes`, and the client packs a param group into the
wire's hyperparameters by `hyperparameters` (HyperSpec.key / index / none_as). A field's storage (fp32,
8-bit blockwise) is a format of that field: stated_kernels.formats.

Note [segments and pages]: a page is a slice of a session's flat parameter space, so one tensor can
span several pages and one page can hold several tensors. The engine cuts every page into segments
(one per tensor in it) and calls `update` with the segments of one page that share a param group, so
that a fused kernel can take them as one list. An update must give the same result whatever the
segmentation: that is what makes paging invisible to the numbers.

Note [step order]: one step of the engine calls, in this order:

1. for every tensor with a gradient: `begin_step` (the step counter), then `prepass` with the whole
   tensor's param and grad (reductions: norms, row and column means);
2. for pass_index in range(passes): for every page in order, `update(segments, hp, pass_index)` once
   per group present in the page (only segments of tensors with a gradient); then, if another pass
   follows, `between_passes` for every tensor with a gradient.

Tensors without a gradient are skipped entirely, as torch does. `hp` always holds every
hyperparameter (defaults filled in).

Note [empty tensors]: a tensor with no elements (a 0x5 parameter) steps as a no-op: its step is
counted, as torch.optim.AdamW counts it, and no state changes. Its reductions are skipped in `prepass`
and `between_passes`: a mean over an empty dimension is nan (came-pytorch writes that nan into the
5 column statistics of a 0x5 tensor) and torch.optim.Adafactor's RMS(theta) raises ZeroDivisionError.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stated_kernels.cuda_small import SmallPlan
    from stated_kernels.cuda_spec import CudaSpec

HyperValue = float | bool
Hyperparameters = dict[str, HyperValue]


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One elementwise state field kept in pages, by its state_dict key."""

    name: str
    dtype: torch.dtype
    # One stored value per `per` elements (8-bit absmax: one float per 256-element block).
    per: int = 1

    def count(self, elements: int) -> int:
        return -(-elements // self.per)

    def nbytes(self, elements: int) -> int:
        return self.count(elements) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class HyperSpec:
    """One hyperparameter: its name on the wire, its default, how to check a value, and where the
    client finds it in a torch-style param group."""

    name: str
    default: HyperValue | None
    is_flag: bool = False
    # Returns None when the value is fine, else a sentence naming what is wrong.
    check: Callable[[HyperValue], str | None] | None = None
    # The param-group key ("" = name) and, for a tuple-valued key, the position (betas[0] is beta1).
    key: str = ""
    index: int | None = None
    # What None in the param group is sent as (Adafactor's eps1=None is finfo(dtype).eps: -1).
    none_as: float | None = None
    # False: the client optimizer sets the value itself (Lion's init_lr), not a param-group key.
    in_group: bool = True

    @property
    def group_key(self) -> str:
        return self.key or self.name

    def replace(self, **changes: Any) -> HyperSpec:
        return dataclasses.replace(self, **changes)

    def validate(self, value: HyperValue, where: str) -> str | None:
        if self.is_flag:
            return None if isinstance(value, bool) else f"{where}{self.name} must be a bool, got {value!r}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{where}{self.name} must be a number, got {value!r}"
        problem = beyond_float32(value)
        if problem:
            return f"{where}{self.name} is {float(value)!r}: {problem}"
        if self.check is not None:
            problem = self.check(value)
            if problem:
                return f"{where}{self.name} {problem}"
        return None


# Note [float32 hyperparameters]: the kernels take hyperparameters, and the scalars they form from them
# (lr * weight_decay, lr / (1 - beta1)), as float32 (torch's fused CPU kernels, the CUDA kernels' hp rows).
# A value beyond float32's range is refused at validation, naming it: torch's single-tensor path raises
# "value cannot be converted to type float without overflow" for some of them, its fused kernels and ours
# would write inf or nan into the weights for all of them.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def beyond_float32(value: float) -> str | None:
    """Why `value` cannot reach a float32 kernel, or None (Note [float32 hyperparameters])."""
    if value != value:
        return "not a number; it must be finite"
    if abs(value) > FLOAT32_MAX:
        return f"above float32's largest finite value ({FLOAT32_MAX:.7g}); it must be finite as a float32"
    return None


def changed(table: Sequence[HyperSpec], *, drop: Sequence[str] = (), **defaults: HyperValue) -> tuple[HyperSpec, ...]:
    """A hyperparameter table derived from another (Adam's from AdamW's): the same checks, some
    entries dropped, some defaults changed."""
    return tuple(h.replace(default=defaults[h.name]) if h.name in defaults else h
                 for h in table if h.name not in drop)


def weight_decay(default: float | None) -> HyperSpec:
    """The weight decay every algorithm takes: >= 0 (one definition, so that no table forgets the check)."""
    return HyperSpec("weight_decay", default, check=non_negative)


def decay_scalar(hp: Hyperparameters) -> tuple[str, float]:
    """lr * weight_decay: decoupled weight decay multiplies the weights by one minus it."""
    return "lr * weight_decay", float(hp["lr"]) * float(hp["weight_decay"])


def non_negative(value: HyperValue) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def positive(value: HyperValue) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def unit_interval(value: HyperValue) -> str | None:
    """A decay rate such as beta: 0 <= value < 1."""
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A registered tensor as the algorithm sees it."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: int
    name: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class Segment:
    """A slice [start, start + length) of one tensor's flattened elements that lies in one page.

    `param` and `grad` are 1-D views into the arenas; `fields` maps each page field's name to a 1-D
    view of this segment's part of the page (length `FieldSpec.count(length)`); `small` is the
    tensor's resident per-tensor state, shared by all its segments.
    """

    tensor: TensorInfo
    start: int
    param: torch.Tensor
    grad: torch.Tensor
    fields: dict[str, torch.Tensor]
    small: dict[str, Any]

    @property
    def length(self) -> int:
        return self.param.numel()


class Algorithm:
    """Base of every algorithm spec. Subclasses set the class attributes and override the methods."""

    name: str = ""
    hyperparameters: tuple[HyperSpec, ...] = ()
    # Page passes per step. Most algorithms need one; CAME needs a second pass over its paged
    # first moment after the per-tensor statistics of the first pass are known.
    passes: int = 1
    # Segments of a tensor start at multiples of this many elements of the tensor (8-bit blocks).
    block_elements: int = 1
    # True when `update` of a slice of a segment (cut at a multiple of block_elements from its start)
    # reads and writes that slice's param, grad and fields alone, and per-tensor state only reads:
    # then slices of one page may run on different threads at once (Note [dynamic CPU scheduling]).
    independent_segments: bool = False
    # The CUDA kernels (stated_kernels.cuda_spec.CudaSpec); None: the algorithm runs on the CPU only.
    cuda: CudaSpec | None = None
    # Whether `stated plan` gives the algorithm a column (Adam's state is AdamW's).
    planned: bool = True

    # --- layout -------------------------------------------------------------------------------

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        """Elementwise fields of this tensor, stored in pages. `hp` is its group at registration."""
        raise NotImplementedError

    def init_small_state(self, tensor: TensorInfo, hp: Hyperparameters) -> dict[str, Any]:
        """Resident per-tensor state. Every algorithm keeps at least the step count."""
        return {"step": torch.zeros((), dtype=torch.float32)}

    def init_fields(self, segment: Segment) -> None:
        """Fills a fresh segment's fields; zeros unless the algorithm says otherwise."""
        for view in segment.fields.values():
            view.zero_()

    # --- the step -----------------------------------------------------------------------------

    def defaults(self) -> Hyperparameters:
        return {h.name: h.default for h in self.hyperparameters if h.default is not None}

    def validate(self, hp: Hyperparameters, where: str = "") -> str | None:
        """Returns a sentence naming the first bad or unknown hyperparameter, or None."""
        known = {h.name: h for h in self.hyperparameters}
        for name in hp:
            if name not in known:
                return f"{where}unknown hyperparameter {name!r} for {self.name}; known: {', '.join(sorted(known))}"
        for spec in self.hyperparameters:
            if spec.name not in hp:
                if spec.default is None:
                    return f"{where}{spec.name} is required for {self.name}"
                continue
            problem = spec.validate(hp[spec.name], where)
            if problem:
                return problem
        full = {**self.defaults(), **hp}
        problem = self.validate_combination(full, where)
        if problem:
            return problem
        for formula, value in self.formed_scalars(full):
            beyond = beyond_float32(value)
            if beyond:
                group = f"{where.rstrip('.')}: " if where else ""
                return (f"{group}{formula} is {value:.7g}, {beyond.split(';')[0]}: the update would not be "
                        f"finite; make {formula} smaller")
        return None

    def validate_combination(self, hp: Hyperparameters, where: str) -> str | None:
        """Checks that involve several hyperparameters (SGD's nesterov needs momentum)."""
        return None

    def formed_scalars(self, hp: Hyperparameters) -> Sequence[tuple[str, float]]:
        """The scalars the update forms from hyperparameters alone, by formula ("lr * weight_decay"), at
        the step where each is largest; each must be finite as a float32 (Note [float32 hyperparameters])."""
        return ()

    def begin_step(self, tensor: TensorInfo, small: dict[str, Any], hp: Hyperparameters) -> None:
        """Per tensor with a gradient, once per step before any pass (the step counter)."""
        small["step"] += 1

    def prepass(self, tensor: TensorInfo, param: torch.Tensor, grad: torch.Tensor,
                small: dict[str, Any], hp: Hyperparameters) -> None:
        """Reductions over the whole tensor before the page pass; `param`/`grad` have its shape."""

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        """The CPU update of one page's segments that share a param group."""
        raise NotImplementedError

    def between_passes(self, tensor: TensorInfo, small: dict[str, Any], hp: Hyperparameters,
                       pass_index: int) -> None:
        """Per tensor, after page pass `pass_index` and before the next one."""

    # --- CUDA (cuda/README.md lists what each kernel reads) ---------------------------------

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int,
                     dtype: str) -> Sequence[float]:
        """The leading entries of a tensor's hp row for one step, in float64 (cuda_tables rounds
        them): `step` is the small "step" after this step's increment, `dtype` the tensor's dtype
        name as the CPU module sees it."""
        raise NotImplementedError(f"{self.name} has no CUDA kernels")

    def cuda_flags(self, hp: Hyperparameters) -> int:
        """The `flags` of a group's page launches (cuda_spec.MAXIMIZE, ...)."""
        return 0

    def cuda_small(self, tensor: TensorInfo, kernel_state: torch.dtype, small: dict[str, Any]) -> SmallPlan:
        """The tensor's StTensor shape class and the resident buffers its kernels read
        (stated_kernels.cuda_small); none unless the algorithm keeps per-tensor state."""
        from stated_kernels.cuda_small import SmallPlan

        return SmallPlan()

    # --- planning -----------------------------------------------------------------------------

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        """Bytes of fp32 state one tensor gets (`stated plan`): by default its page fields under
        the default hyperparameters."""
        info = TensorInfo(0, tuple(shape), torch.float32, 0, name)
        return sum(f.nbytes(info.numel) for f in self.page_fields(info, self.defaults()))

    # --- state_dict ---------------------------------------------------------------------------

    def has_state(self, small: dict[str, Any]) -> bool:
        """Whether the tensor has state to export (torch omits params that never stepped)."""
        return float(small["step"]) > 0

    def export_state(self, tensor: TensorInfo, small: dict[str, Any],
                     paged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensor's state_dict entry with the reference's keys, from its resident state and its
        paged fields gathered into flat tensors (one per field, `FieldSpec.count(numel)` long)."""
        entry = {"step": small["step"].clone()}
        for name, flat in paged.items():
            entry[name] = flat.reshape(tensor.shape) if flat.numel() == tensor.numel else flat
        return entry

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        """Loads a state_dict entry: sets the resident state and returns each paged field as a flat
        tensor of its field dtype. Raises ValueError naming a missing or misshapen key."""
        if "step" not in entry:
            raise ValueError(f"state of tensor {tensor.index} has no 'step'")
        small["step"].fill_(float(entry["step"]))
        paged = {}
        for field in fields:
            if field.name not in entry:
                raise ValueError(f"state of tensor {tensor.index} has no {field.name!r}")
            value = entry[field.name]
            if value.numel() != field.count(tensor.numel):
                raise ValueError(
                    f"state {field.name!r} of tensor {tensor.index} has {value.numel()} elements, "
                    f"expected {field.count(tensor.numel)}"
                )
            paged[field.name] = value.reshape(-1).to(field.dtype)
        return paged
