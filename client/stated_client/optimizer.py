"""The client optimizer: a torch.optim.Optimizer whose state lives in the stated daemon.

On construction it attaches a session and registers every param group: the daemon creates a param and
a grad arena for the group, and every parameter becomes a view of the param arena. At `step()` each
gradient is copied into the grad arena unless it is already a view of it, and is left as a view, so that
with `zero_grad(set_to_none=False)` no copy happens in steady state. The step itself is one round
trip over the step channel (stated_client.step_line), or one gRPC call when there is none.

CUDA parameters work the same way with device memory (stated_client.device_buffers: two flat buffers
per group, shared over CUDA IPC); before each Step the client waits for the device's current stream.
FSDP2's shards are mirrored instead (Note [sharded parameters] in stated_client.step_inputs).

Clipping (`max_grad_norm=`) and GradScaler's unscaling happen in the daemon's pre-pass (Note [gradient
checks] in stated.backends.base), which skips a step with inf or nan gradients as GradScaler does.

state_dict() and load_state_dict() speak torch's own format: the state is fetched from (or sent to)
the daemon and packed by torch.optim.Optimizer itself, so checkpoints move between stated and torch.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import warnings
import weakref
from typing import Any

import torch

from stated.v1 import state_service_pb2 as pb
from stated_client import arena_receiving, arenas, device_buffers, fork_guard, step_inputs
from stated_client.connection import connect
from stated_client.errors import InvalidArgumentError, NotCopyableError, StatedError
from stated_client.held_state import HeldState
from stated_client.identity import default_job, resolve_rank
from stated_client.session_end import close_session as _close_session
from stated_client.step_line import StepLine
from stated_client.wire import WIRE_DTYPES, gather_state, state_chunks

_instances = itertools.count(1)
# Runs the checkpoints asked for with wait=False, while the trainer goes on.
_background = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="stated-checkpoint")

# GradScaler hands itself to optimizers whose step() takes `grad_scaler` (so that it makes no inf-check
# pass over the gradients itself) and warns that this contract will change; the daemon relies on it.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _check_options(defaults: dict[str, Any], max_grad_norm) -> None:
    for flag in ("capturable", "differentiable"):
        if defaults.get(flag):
            raise InvalidArgumentError(f"{flag}=True is not supported by stated: the update runs in the daemon")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < float("inf")):
        raise InvalidArgumentError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")


def _count_groups(params) -> tuple[Any, int]:
    """`params` (an iterable made a list, as torch.optim.Optimizer makes it) and how many param groups it
    holds: a list of dicts is one group each, anything else one group."""
    if isinstance(params, torch.Tensor):
        return params, 1  # torch refuses it, with its own message
    params = list(params)
    return params, len(params) if params and isinstance(params[0], dict) else 1


class StatedOptimizer(fork_guard.Owned, torch.optim.Optimizer):
    """Base of the client optimizers. Subclasses set `algorithm` and `_hyperparameters(group)`."""

    algorithm = ""
    # GradScaler: step() takes the scale and reports found-inf itself (see step()).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], *, address: str | None = None, job: str | None = None,
                 rank: int | None = None, master_weights: bool = False, max_grad_norm: float | None = None,
                 resume: bool = False):
        _check_options(defaults, max_grad_norm)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        # Global L2 norm of the unscaled gradients at the last step (None unless clipping or a
        # GradScaler asked the daemon to compute it), and whether that step was skipped for inf/nan.
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        self._rank = resolve_rank(rank)
        self._connection = connect(address)
        # A forked child's copy raises at every use and detaches nothing (Note [forked children]).
        self._owner = fork_guard.own(self)
        self._job = job or default_job(next(_instances))
        self._master_weights = bool(master_weights)
        reply = self._connection.call("Attach", pb.AttachRequest(
            job=self._job, rank=self._rank, algorithm=self.algorithm, pid=os.getpid(), resume=bool(resume),
            master_weights=self._master_weights, credential=self._connection.credential()))
        self._session = reply.session
        # The step the daemon's retained state holds, which this optimizer continues from; None when
        # resume was not asked or nothing was retained for (job, rank).
        self.resumed_step: int | None = reply.resumed_step if reply.resumed else None
        self._resume_regions = reply.resumed_regions if reply.resumed else 0
        self._keep = [False]
        try:
            # Held open for the session's life: if this process dies the daemon sees the stream break, and
            # its keepalives tell this process that the daemon lives (stated_client.liveness).
            self._watch = self._connection.watch(self._session)
        except BaseException:
            _close_session(self._connection, self._session)  # a refused Watch leaves nothing attached
            raise
        self._step_socket = reply.step_socket  # where the arenas come from (stated_client.arena_receiving)
        self._step_line = StepLine.open(reply.step_socket, self._session, self._watch)
        self._finalizer = weakref.finalize(self, _close_session, self._connection, self._session, self._watch,
                                           self._step_line, self._keep)
        self._params: list[torch.Tensor] = []
        self._grad_views: list[torch.Tensor] = []
        self._mirrors = step_inputs.Mirrors()  # FSDP2's shards (Note [sharded parameters])
        self._arenas: list[torch.Tensor] = []
        self._device: torch.device | None = None
        self._step_number = self.resumed_step or 0
        self._checkpointing: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        # While resuming, the groups are the retained ones registered again: none may be added beyond them
        # (the daemon would take it for a new group and the retained state would change).
        self._resuming = self.resumed_step is not None
        params, self._groups_asked = _count_groups(params)
        try:
            super().__init__(params, defaults)
            self.state = HeldState(self._step_number > 0)  # a resumed optimizer holds state
            if len(self.param_groups) != self._resume_regions and self.resumed_step is not None:
                raise self._groups_mismatch()
            self._resuming = False
        except BaseException:
            # A refused group (bad lr, float64 params, ...) must not leave the session attached until
            # garbage collection: the traceback keeps `self` alive, and a retry with the same job and
            # rank would be refused as already attached. A resume that fails keeps the retained state.
            self._keep[0] = self.resumed_step is not None
            self._finalizer()
            raise

    def _groups_mismatch(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"resume of job {self._job!r} rank {self._rank}: the retained state has {self._resume_regions} param "
            f"groups, this optimizer {self._groups_asked}; build it with the param groups it had (the retained "
            f"state is kept)")

    # --- identity --------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def address(self) -> str:
        return self._connection.target

    @property
    def job(self) -> str:
        return self._job

    def close(self, keep: bool = False) -> None:
        """Detaches from the daemon now. Parameters stay usable; the optimizer does not. The daemon drops
        the state and its checkpoints, or with `keep` retains them (for `stated serve --retain`) for an
        optimizer made later with resume=True. A step or checkpoint under way in another thread ends first;
        one called after is refused as closed. In a forked child it releases nothing: the session is the
        parent's (Note [forked children])."""
        if os.getpid() != self._owner:
            return
        pending, self._checkpointing = self._checkpointing, None
        if pending is not None:
            concurrent.futures.wait([pending])  # its error, if any, is for whoever asked; close goes on
        with self._lock:
            self._keep[0] = bool(keep)
            self._finalizer()

    def checkpoint(self, wait: bool = True) -> int:
        """Makes the optimizer's current state durable in the daemon (under its --state-dir): pages,
        parameters, per-tensor state, hyperparameters and step counters. Returns the step it holds;
        after a crash of the trainer or the daemon, resume=True continues from there.

        With wait=False it returns at once and the checkpoint is written while the trainer computes
        its next forward and backward (which must not change the parameters in place); the next
        step(), state_dict(), load_state_dict() or checkpoint() waits for it and raises its error."""
        self._check_owner()
        self._wait_for_checkpoint()
        request = pb.CheckpointRequest(session=self._session)
        if wait:
            with self._lock:
                return self._connection.call("Checkpoint", request, timeout=None).step
        self._checkpointing = _background.submit(self._connection.call, "Checkpoint", request, None)
        return self._step_number

    def _wait_for_checkpoint(self) -> None:
        pending, self._checkpointing = self._checkpointing, None
        if pending is not None:
            pending.result()

    def __deepcopy__(self, memo):
        raise NotCopyableError(f"{type(self).__name__} cannot be copied: it holds a live session with the stated "
                               f"daemon. Save opt.state_dict() instead and load it into a new optimizer.")

    def __copy__(self):
        return self.__deepcopy__({})

    def __reduce_ex__(self, protocol):
        raise NotCopyableError(f"{type(self).__name__} cannot be pickled: it holds a live session with the stated "
                               f"daemon. Pickle opt.state_dict() instead (torch.save(opt.state_dict(), path)).")

    # --- registration ----------------------------------------------------------------------------

    def _hyperparameters(self, group: dict[str, Any]) -> pb.GroupHyperparameters:
        raise NotImplementedError

    def _tensor_name(self, name: str) -> str:
        """The name a tensor is registered under (SlimAdam appends its per-name rule)."""
        return name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_owner()
        if self._resuming and len(self.param_groups) >= self._resume_regions:
            raise self._groups_mismatch()
        super().add_param_group(param_group)
        self._register(self.param_groups[-1])

    def _register(self, group: dict[str, Any]) -> None:
        params = group["params"]
        names = group.get("param_names") or [""] * len(params)
        device = self._check_device(params)
        step_inputs.check_algorithm(self, params)
        shards = [step_inputs.local(p.detach()) for p in params]  # a plain parameter is its own "shard"
        uuid = device_buffers.device_uuid(device) if device.type == "cuda" else ""
        specs = [pb.TensorSpec(shape=list(t.shape), dtype=WIRE_DTYPES[p.dtype], group=0, name=self._tensor_name(name))
                 for p, t, name in zip(params, shards, names)]
        try:
            reply = self._connection.call("Register", pb.RegisterRequest(
                session=self._session, groups=[self._hyperparameters(group)], tensors=specs,
                device=uuid))
            if uuid:
                if reply.resumed:
                    raise InvalidArgumentError("resume=True serves CPU parameters; CUDA parameters cannot resume yet")
                param_arena = device_buffers.allocate(reply.arena_bytes, device)
                grad_arena = device_buffers.allocate(reply.arena_bytes, device)
            else:
                param_arena, grad_arena = arena_receiving.receive(self._step_socket, self._session, reply.region,
                                                                  reply.arena_bytes, self._connection.timeout)
        except StatedError:
            self.param_groups.pop()  # the group was never registered: leave the optimizer as it was
            raise
        self._arenas += [param_arena, grad_arena]
        for p, shard, placement in zip(params, shards, reply.placements):
            if placement.index != len(self._params):
                raise StatedError(f"the daemon placed tensor {placement.index}, expected {len(self._params)}")
            sharded = step_inputs.is_sharded(p)
            view = arenas.view(param_arena, placement.offset_bytes, shard)
            if not reply.resumed:  # resumed: the model takes the daemon's parameters
                view.copy_(shard)
            elif sharded:
                shard.copy_(view)
            if sharded:
                self._mirrors.add(p, view)
            else:
                self._mirrors.bind(p, view)
            grad_view = arenas.view(grad_arena, placement.offset_bytes, shard)
            if p.grad is not None:
                grad_view.copy_(step_inputs.local(p.grad))
                if not sharded:
                    p.grad = grad_view
            self._params.append(p)
            self._grad_views.append(grad_view)
        if uuid:
            # The daemon reads the buffers from its own streams: the copies above must be finished.
            torch.cuda.current_stream(device).synchronize()
            self._connection.call("ShareDeviceBuffers", pb.ShareDeviceBuffersRequest(
                session=self._session, region=reply.region, device=uuid,
                params=device_buffers.ipc_buffer(param_arena), grads=device_buffers.ipc_buffer(grad_arena)))

    def _check_device(self, params: list[torch.Tensor]) -> torch.device:
        """The one device of this optimizer's parameters (CPU, or one CUDA device)."""
        for p in params:
            if p.dtype not in WIRE_DTYPES or p.dtype == torch.uint8:
                raise InvalidArgumentError(f"a parameter has dtype {p.dtype}, which stated cannot optimize")
            if p.device.type not in ("cpu", "cuda"):
                raise InvalidArgumentError(f"a parameter is on {p.device}; stated serves CPU and CUDA parameters")
            if self._device is None:
                self._device = p.device
            if p.device != self._device:
                raise InvalidArgumentError(f"parameters are on {self._device} and {p.device}; one stated optimizer "
                                           f"serves one device (create one per device)")
        return self._device or torch.device("cpu")

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The gradients are views of the grad arena, which a forked child shares with its parent.
        self._check_owner()
        super().zero_grad(set_to_none)

    # --- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """One step in the daemon. With a GradScaler (`scaler.step(opt)` passes itself as
        `grad_scaler`), the daemon unscales the gradients, checks them for inf/nan and skips the step if
        it finds any; the result goes back to the scaler for its `update()`."""
        self._check_owner()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._wait_for_checkpoint()
        max_grad_norm = self.max_grad_norm
        self._mirrors.adopt_rebound()  # Note [rebound parameters] in stated_client.step_inputs
        if self._mirrors:  # scaling and clipping across the ranks (Note [sharded parameters])
            skip, self.last_grad_norm = step_inputs.prepare_sharded(self, self._params, grad_scaler, max_grad_norm)
            grad_scaler = max_grad_norm = None
            self._mirrors.into_arena()
        else:
            skip = step_inputs.unscaled_and_found_inf(self, grad_scaler)
        if skip:  # torch skips a step whose unscale_ found inf or nan, and so do we
            self.last_step_skipped = True
            return loss
        scaler_state = grad_scaler._per_optimizer_states[id(self)] if grad_scaler is not None else None
        grad_scale = float(grad_scaler.get_scale()) if scaler_state and scaler_state["stage"].name != "UNSCALED" else 0.0
        has_grad = step_inputs.gather_gradients(self._params, self._grad_views, self._mirrors.mirrored)
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        with self._lock:
            self._step_number += 1
            request = pb.StepRequest(
                session=self._session, step=self._step_number,
                groups=[self._hyperparameters(g) for g in self.param_groups], has_grad=bytes(has_grad),
                grad_scale=grad_scale, max_grad_norm=max_grad_norm or 0.0)
            try:
                self._connection.check_open()
                reply = self._step_line.step(request) if self._step_line is not None else None
                if reply is None:  # no channel, or it closed and does not open again (Note [idle step lines])
                    reply = self._connection.call("Step", request)
            except StatedError:
                self._step_number -= 1
                raise
        self._mirrors.from_arena()
        self.state.held = True  # Note in stated_client.held_state
        self.last_step_skipped = reply.found_inf
        if not self._mirrors:
            self.last_grad_norm = reply.grad_norm if (grad_scale or self.max_grad_norm) else None
        if scaler_state is not None and grad_scale:
            scale = grad_scaler._scale
            scaler_state["found_inf_per_device"][scale.device] = torch.full(
                (1,), float(reply.found_inf), dtype=torch.float32, device=scale.device)
        return loss

    # --- state_dict ------------------------------------------------------------------------------

    def _export(self) -> dict[int, dict[str, torch.Tensor]]:
        return gather_state(self._connection.stream("ExportState", pb.ExportStateRequest(session=self._session)))

    def state_dict(self) -> dict[str, Any]:
        self._check_owner()
        self._wait_for_checkpoint()
        exported = self._export()
        self.state = HeldState(True, {self._params[i]: step_inputs.placed_like(self._params[i], self._state_entry(entry))
                                      for i, entry in exported.items()})
        try:
            return super().state_dict()
        finally:
            self.state = HeldState(self._step_number > 0)

    def _state_entry(self, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for algorithms whose torch state differs from the wire's (SGD has no step)."""
        return entry

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_owner()
        self._wait_for_checkpoint()
        # torch casts every floating state tensor to its parameter's dtype: keep fp32 master copies out
        # of that (Note [master weights] in stated.session).
        masters = {k: v["master_param"] for k, v in state_dict.get("state", {}).items()
                   if isinstance(v, dict) and "master_param" in v}
        if masters:
            state_dict = {**state_dict, "state": {k: {n: t for n, t in v.items() if n != "master_param"}
                                                  for k, v in state_dict["state"].items()}}
        super().load_state_dict(state_dict)
        loaded, self.state = self.state, HeldState(True)
        ids = [p for group in self.param_groups for p in group["params"]]
        for key, master in masters.items():
            loaded[ids[int(key)]]["master_param"] = master
        index = {id(p): i for i, p in enumerate(self._params)}

        def messages():
            yield pb.ImportStateRequest(session=self._session)
            for p, entry in loaded.items():
                i = index[id(p)]
                fields = {k: step_inputs.local(v) for k, v in entry.items() if k != "step" and isinstance(v, torch.Tensor)}
                step = float(entry["step"]) if "step" in entry else 0.0
                yield pb.ImportStateRequest(header=pb.TensorStateHeader(tensor=i, step=step, fields=list(fields)))
                for name, value in fields.items():
                    try:
                        chunks = list(state_chunks(i, name, value))
                    except ValueError as exc:
                        raise InvalidArgumentError(str(exc)) from None
                    for chunk in chunks:
                        yield pb.ImportStateRequest(chunk=chunk)

        self._connection.call("ImportState", messages())

