"""What a step takes from the trainer: gradients into the grad arena, and parameters that are shards of a DTensor.

Note [sharded parameters]
-------------------------
With FSDP2 (`fully_shard`) every parameter is a DTensor whose local tensor, a rank's shard, lives in
FSDP's own flat buffer: that buffer is what FSDP all-gathers before each forward, and its gradients
arrive as new DTensors after each backward. So a shard cannot become a view of the arena as a plain
parameter does. Each rank registers its local shards (their local shapes; an uneven or empty shard is
a tensor like any other) and mirrors them: before a step the local gradients are copied into the grad
arena (the copy a plain parameter makes when its gradient is not a view of the arena), and after it
the updated arena values are copied back into the local shards. A shard changed outside the optimizer
(load_state_dict on the model, say: its version counter moves, or FSDP gives the parameter a new local
tensor) is copied into the arena first.

Clipping and loss scaling need the gradients of every rank: with sharded parameters the client does
them itself, with torch's own functions on the DTensors (GradScaler.unscale_, clip_grad_norm_, which
reduce across the mesh), before the copy; the daemon then steps unscaled, unclipped gradients. The
algorithm must be elementwise (AdamW, Adam, SGD, Lion): the others keep state shaped by the whole
tensor (Adafactor's and CAME's row and column factors, SlimAdam's compressed dimensions, AdamW8bit's
256-element blocks of the flattened tensor), which a shard does not have, and are refused by name.

Note [rebound parameters]
-------------------------
A plain parameter becomes a view of the param arena (`p.data = view`), but some wrappers give their
parameters storage of their own again: FSDP1 with `use_orig_params=True` points each one at its part of
a FlatParameter at every forward and backward (first copying a parameter whose storage changed into the
FlatParameter, so the values survive; the next step's updates, made in the arena, would not). A step
therefore checks that each plain parameter is still its arena view; one that is not is mirrored from then
on like a shard. Its gradient stays where the wrapper put it (copied, not rebound, since FSDP1 writes a
moved gradient back too). Such a parameter is a rank's part of a flat buffer, so the daemon's norm of it
would not be the global one: `max_grad_norm=` is refused and the wrapper's own `clip_grad_norm_` named.
"""

from __future__ import annotations

import sys

import torch

from stated_client import arenas
from stated_client.errors import InvalidArgumentError


def dtensor_type():
    """torch's DTensor class, or None when nothing made one: no DTensor exists before its module is
    loaded, so this never imports it (an import in a forked child can abort it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor) -> bool:
    kind = dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (this rank's shard), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def placed_like(param: torch.Tensor, entry: dict) -> dict:
    """A state_dict entry of `param` with its tensors of the shard's shape as DTensors placed as `param`
    is (torch.optim's state under FSDP2 is DTensors too, which torch.distributed.checkpoint reshards);
    "step" and the entries of plain parameters stay as they are."""
    if not is_sharded(param):
        return entry
    shape, kind = tuple(param.to_local().shape), dtensor_type()
    return {k: kind.from_local(v, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                               stride=param.stride())
            if k != "step" and isinstance(v, torch.Tensor) and tuple(v.shape) == shape else v
            for k, v in entry.items()}


def check_algorithm(optimizer, params) -> None:
    """Refuses sharded parameters for an algorithm whose state needs the whole tensor."""
    if getattr(optimizer, "elementwise", False) or not any(is_sharded(p) for p in params):
        return
    name = type(optimizer).__name__
    raise InvalidArgumentError(
        f"stated.{name} keeps state shaped by each whole tensor, which a shard of an FSDP2 (fully_shard) "
        f"parameter is not; use stated.AdamW, Adam, SGD or Lion with fully_shard, or keep whole tensors on "
        f"each rank with DDP or ZeroRedundancyOptimizer(optimizer_class=stated.{name})")


class Mirrors:
    """The sharded and rebound parameters with their arena views (Notes [sharded parameters], [rebound
    parameters]), and the plain parameters that are arena views still. A parameter's local tensor is
    looked up at each use: FSDP2's load_state_dict gives the parameter a new one."""

    def __init__(self):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, list]] = []  # (parameter, arena view, [shard, version])
        self.bound: list[tuple[torch.Tensor, torch.Tensor]] = []  # (plain parameter, the arena view it is)
        self.mirrored: set[int] = set()  # ids of the mirrored parameters
        self.rebound = False  # whether some plain parameter is mirrored

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def add(self, param: torch.Tensor, view: torch.Tensor) -> None:
        shard = local(param.detach())
        self.pairs.append((param, view, [shard, shard._version]))
        self.mirrored.add(id(param))

    def bind(self, param: torch.Tensor, view: torch.Tensor) -> None:
        """A plain parameter becomes its arena view."""
        param.data = view
        self.bound.append((param, view))

    def adopt_rebound(self) -> None:
        """Plain parameters given other storage since they were bound are mirrored from now on (their
        values copied into the arena by the next into_arena)."""
        if not self.bound or all(arenas.is_view_of(p.detach(), view) for p, view in self.bound):
            return
        kept = []
        for param, view in self.bound:
            if arenas.is_view_of(param.detach(), view):
                kept.append((param, view))
            else:
                self.pairs.append((param, view, [None, -1]))
                self.mirrored.add(id(param))
                self.rebound = True
        self.bound = kept

    def into_arena(self) -> None:
        """Shards changed since the last step (by anything but this optimizer, or replaced) into the arena."""
        for param, view, seen in self.pairs:
            shard = local(param.detach())
            if shard is not seen[0] or shard._version != seen[1]:
                if shard.shape != view.shape:
                    raise InvalidArgumentError(
                        f"a parameter registered with shape {tuple(view.shape)} has shape {tuple(shard.shape)} "
                        f"at this step; stated steps each parameter at the shape it had when the optimizer was "
                        f"created (with FSDP1, create it after wrapping the model and step outside forward)")
                view.copy_(shard)
                seen[:] = [shard, shard._version]

    def from_arena(self) -> None:
        """The stepped values back into the shards FSDP gathers from."""
        for param, view, seen in self.pairs:
            shard = local(param.detach())
            shard.copy_(view)
            seen[:] = [shard, shard._version]


def unscaled_and_found_inf(optimizer, grad_scaler) -> bool:
    """Whether the trainer already called `scaler.unscale_(optimizer)` (to clip, say) and it found inf or
    nan: torch then skips the step."""
    if grad_scaler is None:
        return False
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    return state["stage"].name == "UNSCALED" and any(float(v.sum()) for v in state["found_inf_per_device"].values())


def prepare_sharded(optimizer, params: list[torch.Tensor], grad_scaler, max_grad_norm: float | None):
    """Loss scaling and clipping on the DTensors, as torch does them (Note [sharded parameters]).
    Returns (skip, grad norm): skip when GradScaler found inf or nan on this rank."""
    norm = None
    if max_grad_norm and optimizer._mirrors.rebound:
        raise InvalidArgumentError(
            "max_grad_norm= needs the norm over every rank, and this optimizer's parameters are parts of a "
            "wrapper's flat buffers (FSDP1: FullyShardedDataParallel with use_orig_params=True); leave "
            "max_grad_norm unset and call the wrapper's own model.clip_grad_norm_(max_norm) before step()")
    if grad_scaler is not None:
        if grad_scaler._per_optimizer_states[id(optimizer)]["stage"].name != "UNSCALED":
            grad_scaler.unscale_(optimizer)
        if unscaled_and_found_inf(optimizer, grad_scaler):
            return True, None
    if max_grad_norm:
        with_grad = [p for p in params if p.grad is not None]
        total = torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm, foreach=True)
        norm = float(total.full_tensor() if is_sharded(total) else total)
    return False, norm


def gather_gradients(params: list[torch.Tensor], grad_views: list[torch.Tensor], mirrored: set[int]) -> bytearray:
    """Each gradient into its place in the grad arena, where it is not there already: a plain parameter's
    gradient then becomes that view (so later backward passes write into the arena), a mirrored one's is
    copied. Returns the has_grad bytes of a StepRequest."""
    has_grad = bytearray(len(params))
    for i, (p, grad_view) in enumerate(zip(params, grad_views)):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise InvalidArgumentError("stated does not support sparse gradients")
        g_local = local(g)
        if not arenas.is_view_of(g_local, grad_view):
            grad_view.copy_(g_local)
            if id(p) not in mirrored:
                p.grad = grad_view
        has_grad[i] = 1
    return has_grad
