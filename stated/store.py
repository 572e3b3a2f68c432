"""Jobs, sessions and their state: the daemon's core, below the wire and above the engine.

Every request is validated here before any memory is touched (DESIGN.md, "Isolation and bad input"):
counts, sizes, dtypes and hyperparameters, each problem raised as an error that names the field.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets

import torch

from stated import shm
from stated.backends.base import Backend
from stated.engine import Engine, StepResult
from stated.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from stated.inconsistency import Inconsistency
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.session import MASTER, MASTER_KEY, Session
from stated_client.wire import dtype_name
from stated_kernels import lookup
from stated_kernels.spec import Hyperparameters, TensorInfo

log = logging.getLogger("stated.store")

SUPPORTED_DTYPES = {torch.float32}
HALF_DTYPES = {torch.bfloat16, torch.float16}  # with master weights only
MAX_TENSORS_PER_REQUEST = 1 << 20
# cudaIpcMemHandle_t is 64 opaque bytes.
IPC_HANDLE_BYTES = 64
MAX_DEVICE_NAME = 64
MAX_JOB_NAME = 200


class Store:
    def __init__(self, backend: Backend, page_bytes: int, shm_mode: int = 0o600, shm_gid: int | None = None,
                 paging: Paging | None = None, cuda_backend=None):
        self.backend = backend
        # Makes the CUDA backend the first time a client registers CUDA tensors (CuPy loads only then);
        # None in a daemon without CUDA support.
        self._cuda_factory = cuda_backend
        self._cuda: Backend | None = None
        self.engine = Engine()
        self.page_bytes = page_bytes
        self.shm_mode = shm_mode
        self.shm_gid = shm_gid
        self.sessions: dict[str, Session] = {}
        self.by_job_rank: dict[tuple[str, int], str] = {}
        self.paging = paging or Paging(Metrics())

    # --- sessions -------------------------------------------------------------------------------

    def attach(self, job: str, rank: int, algorithm: str, pid: int, master_weights: bool = False) -> Session:
        if not job:
            raise InvalidArgument("job must be a non-empty name")
        if len(job) > MAX_JOB_NAME or any(c in job for c in "/\\\0\n"):
            raise InvalidArgument(f"job {job[:40]!r} must be at most {MAX_JOB_NAME} characters without "
                                  f"slashes, NUL or newlines")
        algo = lookup(algorithm)
        if algo is None:
            from stated_kernels import ALGORITHMS

            raise InvalidArgument(f"algorithm {algorithm!r} is not known; known: {', '.join(sorted(ALGORITHMS))}")
        if (job, rank) in self.by_job_rank:
            live = self.sessions[self.by_job_rank[(job, rank)]]
            raise AlreadyExists(f"job {job!r} rank {rank} is already attached (session {live.id}, pid {live.pid}); "
                                f"detach it or use another rank")
        session = Session(secrets.token_hex(8), secrets.token_bytes(16), job, rank, pid, algo,
                          self.page_bytes, self.shm_mode, self.shm_gid, master_weights)
        session.backend = self.backend  # until it registers CUDA tensors
        session.pager = self.paging.new_pager(session)
        self.sessions[session.id] = session
        self.by_job_rank[(job, rank)] = session.id
        return session

    def get(self, session_id: str, token: bytes) -> Session:
        """The session a call names, after checking its token (PERMISSION_DENIED changes nothing)."""
        if not session_id:
            raise InvalidArgument("session.id is empty; call Attach first")
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id} does not exist (detached, or its client died)")
        if not hmac.compare_digest(session.token, token):
            raise PermissionDenied(f"session.token does not match session {session_id}")
        return session

    def detach(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.by_job_rank.pop((session.job, session.rank), None)
        session.backend.close(session)
        self.paging.removed(session)
        session.close()

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            self.detach(session)

    # --- registration -------------------------------------------------------------------------

    def register(self, session: Session, groups: list[Hyperparameters],
                 tensors: list[tuple[tuple[int, ...], torch.dtype | None, int, str]], device: str = ""):
        """Adds tensors (shape, dtype, group within this request, name) and creates their arenas, or,
        for a CUDA `device` (its UUID), lays out the buffers the client will share."""
        device = self._check_device(session, device)
        if not groups:
            raise InvalidArgument("groups is empty: register at least one param group")
        if not tensors:
            raise InvalidArgument("tensors is empty: register at least one tensor")
        if len(tensors) > MAX_TENSORS_PER_REQUEST:
            raise InvalidArgument(f"tensors has {len(tensors)} entries, more than {MAX_TENSORS_PER_REQUEST}")
        for i, hp in enumerate(groups):
            problem = session.algorithm.validate(hp, where=f"groups[{i}].")
            if problem:
                raise InvalidArgument(problem)
        used = set()
        first_group, first_tensor = len(session.groups), len(session.tensors)
        infos = []
        for i, (shape, dtype, group, name) in enumerate(tensors):
            if dtype is None:
                raise InvalidArgument(f"tensors[{i}].dtype is unspecified")
            if dtype in HALF_DTYPES and not session.master:
                raise InvalidArgument(f"tensors[{i}].dtype {dtype_name(dtype)} needs master_weights: "
                                      f"attach with master_weights=True to keep an fp32 copy in the daemon")
            if dtype not in SUPPORTED_DTYPES | HALF_DTYPES:
                raise InvalidArgument(f"tensors[{i}].dtype {dtype_name(dtype)} is not supported; "
                                      f"supported: float32, and bfloat16 or float16 with master_weights")
            if session.dtype is not None and dtype != session.dtype or infos and dtype != infos[0].dtype:
                raise InvalidArgument(f"tensors[{i}].dtype {dtype} differs from the session's other tensors; "
                                      f"one session holds one dtype")
            if group >= len(groups):
                raise InvalidArgument(f"tensors[{i}].group is {group} but only {len(groups)} groups were sent")
            if any(d < 0 for d in shape):
                raise InvalidArgument(f"tensors[{i}].shape {list(shape)} has a negative size")
            used.add(group)
            infos.append(TensorInfo(first_tensor + i, tuple(shape), dtype, first_group + group, name))
        for i in range(len(groups)):
            if i not in used:
                raise InvalidArgument(f"groups[{i}] has no tensors: every param group needs at least one")
        element_size = infos[0].dtype.itemsize
        if not device:
            self._check_shm_room(2 * sum(t.numel for t in infos) * element_size)
        full = [{**session.algorithm.defaults(), **hp} for hp in groups]
        region, pages = session.add_region(full, infos, device)
        try:
            self.paging.added_pages(session, len(pages))
        except BaseException:
            session.drop_last_region()
            raise
        if device and session.backend is not self._cuda:
            session.backend = self._cuda
            self.paging.feed_device(session, self._cuda)
        return region, infos, first_group, sum(p.nbytes for p in pages)

    def _check_device(self, session: Session, device: str) -> str:
        """"" for shared memory, else a CUDA device UUID this daemon can serve (made ready here)."""
        device = "" if device in ("", "cpu") else device.removeprefix("GPU-")
        if len(device) > MAX_DEVICE_NAME or any(not (c.isalnum() or c == "-") for c in device):
            raise InvalidArgument(f"device {device[:MAX_DEVICE_NAME]!r} is not 'cpu' or a CUDA device UUID")
        if session.regions and session.regions[0].device != device:
            raise InvalidArgument(f"device {device or 'cpu'!r} differs from the session's "
                                  f"{session.regions[0].device or 'cpu'!r}; one session serves one device")
        if device and self._cuda is None:
            if self._cuda_factory is None:
                raise FailedPrecondition("this daemon serves CPU tensors only; start `stated serve` on a machine "
                                         "with a GPU and `pip install 'stated[cuda]'` for CUDA parameters")
            try:
                self._cuda = self._cuda_factory()
            except (ImportError, RuntimeError) as exc:
                raise FailedPrecondition(f"the daemon cannot use CUDA ({exc}); it needs a GPU and CuPy: "
                                         f"pip install 'stated[cuda]' where `stated serve` runs") from None
        return device

    def share_device_buffers(self, session: Session, region_index: int, device: str,
                             params: tuple[bytes, int, int], grads: tuple[bytes, int, int]) -> None:
        """Hands a CUDA region's buffers (IPC handle, offset, size) to the session's backend."""
        if not 0 <= region_index < len(session.regions):
            raise InvalidArgument(f"region is {region_index} but the session has {len(session.regions)} regions")
        region = session.regions[region_index]
        if not region.device:
            raise InvalidArgument(f"region {region_index} lives in shared memory; only CUDA regions take buffers")
        if device.removeprefix("GPU-") != region.device:
            raise InvalidArgument(f"device {device!r} is not the device region {region_index} was registered on "
                                  f"({region.device!r})")
        for name, (handle, _offset, size) in (("params", params), ("grads", grads)):
            if len(handle) != IPC_HANDLE_BYTES:
                raise InvalidArgument(f"{name}.handle has {len(handle)} bytes; a CUDA IPC handle has "
                                      f"{IPC_HANDLE_BYTES}")
            if size < region.arena_bytes:
                raise InvalidArgument(f"{name}.size_bytes is {size} but region {region_index} needs "
                                      f"{region.arena_bytes} bytes")
        session.backend.share(session, region_index, params, grads)

    @staticmethod
    def _check_shm_room(nbytes: int) -> None:
        stat = os.statvfs(shm.SHM_DIR)
        free = stat.f_bavail * stat.f_frsize
        if nbytes > free:
            raise ResourceExhausted(f"the arenas need {nbytes} bytes of shared memory but {shm.SHM_DIR} has "
                                    f"{free} bytes free")

    # --- steps ----------------------------------------------------------------------------------

    def step(self, session: Session, step: int, groups: list[Hyperparameters], has_grad: bytes,
             grad_scale: float = 0.0, max_grad_norm: float = 0.0) -> StepResult:
        self._check_consistent(session, f"step {step}")
        if not session.tensors:
            raise FailedPrecondition(f"session {session.id} has no registered tensors; call Register first")
        if step != session.steps + 1:
            raise InvalidArgument(f"step is {step} but the session's last step was {session.steps}; "
                                  f"steps must follow one another")
        missing = session.backend.ready(session)
        if missing:
            raise FailedPrecondition(missing)
        full = session.check_groups(groups)
        if len(has_grad) != len(session.tensors):
            raise InvalidArgument(f"has_grad has {len(has_grad)} bytes but the session has "
                                  f"{len(session.tensors)} registered tensors")
        for name, value in (("grad_scale", grad_scale), ("max_grad_norm", max_grad_norm)):
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} is {value}; it must be a finite number >= 0 (0 turns it off)")
        return self.engine.step(session, full, has_grad, grad_scale, max_grad_norm)

    @staticmethod
    def _check_consistent(session: Session, action: str) -> None:
        """Refuses `action` on a session a failure left half-applied (Note [half-applied steps])."""
        if session.inconsistent is not None:
            # No durable checkpoints exist yet; once they do, their step is the other way back.
            raise session.inconsistent.refusal(session, action, checkpoint_step=None)

    # --- state_dict -----------------------------------------------------------------------------

    def begin_export(self, session: Session) -> None:
        """Before export_tensor calls: state held on a device comes back to the host tier. A half-applied
        state is not exported (Note [half-applied steps])."""
        self._check_consistent(session, "state_dict()")
        self.engine.flush(session)

    def export_tensor(self, session: Session, index: int) -> dict[str, torch.Tensor] | None:
        """The tensor's state_dict entry with the reference's keys, or None if it has no state."""
        place, small = session.tensors[index], session.small[index]
        if not session.algorithm.has_state(small):
            return None
        flat = {f.name: torch.empty(f.count(place.info.numel), dtype=f.dtype) for f in place.fields}
        positions = dict(session.tensor_pages.get(index, []))

        def read(bound) -> None:
            seg = bound.segments[positions[bound.page]]
            for f in place.fields:
                begin = seg.start // f.per
                view = seg.fields[f.name]
                flat[f.name][begin: begin + view.numel()].copy_(view)

        self.engine.visit_pages(session, positions, read, dirty=False)
        master = flat.pop(MASTER.name, None)
        entry = session.algorithm.export_state(place.info, small, flat)
        if master is not None:
            entry[MASTER_KEY] = master.reshape(place.info.shape)
        return entry

    def reset_state(self, session: Session) -> None:
        """Back to the state before the first step: counters at zero, pages zeroed."""
        session.backend.invalidate(session)
        for place in session.tensors:
            session.small[place.info.index] = session.algorithm.init_small_state(
                place.info, session.groups[place.info.group])
        session.bindings.clear()  # they hold the old small-state dicts
        self.engine.reset_pages(session)

    def import_state(self, session: Session, entries: list[tuple[int, dict[str, torch.Tensor]]]) -> tuple[int, int]:
        """Loads state_dict entries all or nothing: every entry is checked before any state changes, then
        all state is reset (torch's load_state_dict replaces it whole) and the entries written.
        Returns (tensors, bytes) loaded. It makes an inconsistent session consistent again; one that fails
        after it began changing state leaves the session inconsistent (Note [half-applied steps])."""
        staged, seen = [], set()
        for index, entry in entries:
            if not 0 <= index < len(session.tensors):
                raise InvalidArgument(f"header.tensor is {index} but the session has {len(session.tensors)} tensors")
            if index in seen:
                raise InvalidArgument(f"header.tensor {index} appears twice in one ImportState stream")
            seen.add(index)
            place = session.tensors[index]
            small = session.algorithm.init_small_state(place.info, session.groups[place.info.group])
            fields = tuple(f for f in place.fields if f is not MASTER)
            try:
                flat = session.algorithm.import_state(place.info, small, entry, fields)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise InvalidArgument(str(exc)) from None
            if session.master:  # a state_dict without master copies (from torch) starts them from the arena
                master = entry.get(MASTER_KEY)
                if master is None and session.regions[place.region].device:
                    staged.append((index, small, flat))  # the backend copies it on the device (master_pending)
                    continue
                if master is None:
                    master = session.param_views[index]
                if master.numel() != place.info.numel:
                    raise InvalidArgument(f"state {MASTER_KEY!r} of tensor {index} has {master.numel()} elements, "
                                          f"expected {place.info.numel}")
                flat[MASTER.name] = master.reshape(-1).to(torch.float32)
            staged.append((index, small, flat))
        try:
            nbytes = self._replace_state(session, staged)
        except BaseException as exc:
            session.inconsistent = Inconsistency.of("load_state_dict", session.steps + 1, None, exc)
            raise
        session.inconsistent = None
        return len(staged), nbytes

    def _replace_state(self, session: Session, staged: list[tuple[int, dict, dict[str, torch.Tensor]]]) -> int:
        """Resets all state and writes the checked entries; returns the bytes written."""
        self.reset_state(session)
        for index, small, _flat in staged:
            session.small[index] = small
        session.bindings.clear()  # bound segments carry the small-state dicts just replaced
        return sum(self._write_fields(session, index, flat) for index, _small, flat in staged)

    def _write_fields(self, session: Session, index: int, flat: dict[str, torch.Tensor]) -> int:
        place = session.tensors[index]
        per = {f.name: f.per for f in place.fields}
        positions = dict(session.tensor_pages.get(index, []))

        def write(bound) -> None:
            seg = bound.segments[positions[bound.page]]
            if session.master and MASTER.name not in flat:
                session.master_pending.add(bound.page)
            for name, view in seg.fields.items():
                if name not in flat:
                    continue
                begin = seg.start // per[name]
                view.copy_(flat[name][begin: begin + view.numel()])

        self.engine.visit_pages(session, positions, write, dirty=True)
        return sum(t.numel() * t.element_size() for t in flat.values())
