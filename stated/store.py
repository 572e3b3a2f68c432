"""Jobs, sessions and their state: the daemon's core, below the wire and above the engine.

Every request is validated here before any memory is touched (DESIGN.md, "Isolation and bad input"):
counts, sizes, dtypes and hyperparameters, each problem raised as an error that names the field.
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import secrets
import threading

import torch

from stated import job_accounting, job_owners
from stated.backends.base import Backend
from stated.durability import job_files
from stated.durability import resume as resuming
from stated.durability.checkpoint import Written, write_checkpoint
from stated.durability.keeper import Keeper, Retained
from stated.durations import DEFAULT_RETAIN_SECONDS
from stated.engine import Engine, StepResult
from stated.limits import Limits, check_job_bytes, check_sessions
from stated.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                           ResourceExhausted, ServiceError)
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.paging.state_file import MAX_NAME_BYTES, NEXT_SUFFIX, RANK_NAME_BYTES, encoded_job_name
from stated.session import Session
from stated.state_transfer import StateTransfer
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


def check_job_name(job: str) -> None:
    """Refuses a job name the daemon cannot use: its state file and checkpoint directory are named after it."""
    if not job:
        raise InvalidArgument("job must be a non-empty name")
    if len(job) > MAX_JOB_NAME or any(c in job for c in "/\\\0\n"):
        raise InvalidArgument(f"job {job[:40]!r} must be at most {MAX_JOB_NAME} characters without "
                              f"slashes, NUL or newlines")
    # The longest name made of it: a state file's next generation, `<job>.<rank>.next.state`.
    name_bytes = len(encoded_job_name(job).encode()) + RANK_NAME_BYTES + len(NEXT_SUFFIX)
    if name_bytes > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"job {job[:40]!r} is too long as a file name: its state file and checkpoints are named after it, "
            f"percent-encoded (a space, '%' or other sign takes 3 bytes, a letter outside ASCII 6 or more), "
            f"which takes {name_bytes} bytes of the {MAX_NAME_BYTES} a file name may have; choose a shorter name")


class Store(StateTransfer):
    def __init__(self, backend: Backend, page_bytes: int,
                 paging: Paging | None = None, cuda_backend=None, state_dir: str = "",
                 retain_seconds: float = DEFAULT_RETAIN_SECONDS, checkpoint_every: int = 0,
                 limits: Limits | None = None):
        self.backend = backend
        self.limits = limits or Limits()
        # Makes the CUDA backend the first time a client registers CUDA tensors (CuPy loads only then);
        # None in a daemon without CUDA support.
        self._cuda_factory = cuda_backend
        self._cuda: Backend | None = None
        self.engine = Engine()
        self.page_bytes = page_bytes
        self.sessions: dict[str, Session] = {}
        self.by_job_rank: dict[tuple[str, int], str] = {}
        self.paging = paging or Paging(Metrics())
        self.state_dir = state_dir
        self.checkpoint_every = checkpoint_every
        self.keeper = Keeper(state_dir, retain_seconds)
        # Set when a shutdown's --shutdown-timeout ran out: a checkpoint under way gives up at its next page.
        self.abandon = threading.Event()

    # --- sessions -------------------------------------------------------------------------------

    def attach(self, job: str, rank: int, algorithm: str, pid: int, master_weights: bool = False,
               resume: bool = False, uid: int | None = None) -> Session:
        """A new session for (job, rank), or with `resume` the one it retains (its `resume_left` regions
        to register again); retained state without `resume` is refused, naming both ways out. `uid` is the
        trainer's user, from its credential (Note [job owners] in stated.job_owners), None when unknown."""
        check_job_name(job)
        owner = job_owners.owner_of(self, job)
        if not job_owners.may_take(uid, owner):
            raise job_owners.owner_refusal(job, uid, owner)
        algo = lookup(algorithm)
        if algo is None:
            from stated_kernels import ALGORITHMS

            raise InvalidArgument(f"algorithm {algorithm!r} is not known; known: {', '.join(sorted(ALGORITHMS))}")
        if (job, rank) in self.by_job_rank:
            live = self.sessions[self.by_job_rank[(job, rank)]]
            raise AlreadyExists(f"job {job!r} rank {rank} is already attached (session {live.id}, pid {live.pid}); "
                                f"detach it or use another rank")
        held = self.keeper.held.get((job, rank))
        if held is not None and not resume:
            raise FailedPrecondition(
                f"job {job!r} rank {rank} has retained state at step {held.step} ({held.reason}); pass "
                f"resume=True to continue from it, or run `stated drop {job}` to start over")
        if held is not None:
            session = resuming.retained_session(self, held, algo, pid, master_weights)
        else:
            check_sessions(self.limits, len(job_accounting.sessions_in_memory(self)))
            session = self.new_session(job, rank, algo, pid, master_weights)
        session.owner = owner if owner is not None else uid  # root resuming a user's job leaves it theirs
        self.sessions[session.id] = session
        self.by_job_rank[(job, rank)] = session.id
        return session

    def new_session(self, job: str, rank: int, algo, pid: int, master_weights: bool) -> Session:
        session = Session(secrets.token_hex(8), secrets.token_bytes(16), job, rank, pid, algo,
                          self.page_bytes, master_weights)
        session.backend = self.backend  # until it registers CUDA tensors
        session.pager = self.paging.new_pager(session)
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

    def detach(self, session: Session, keep: bool = False, reason: str = "closed") -> Retained | None:
        """Ends a live session: its state is dropped with its checkpoints, or with `keep` (and always for
        a resume not finished) retained for --retain. Returns the retained entry, if any."""
        if self.sessions.pop(session.id, None) is None:
            return None
        self.by_job_rank.pop((session.job, session.rank), None)
        if keep and session.on_device:
            log.info("job %r rank %d has CUDA parameters, whose buffers die with their trainer: not retained",
                     session.job, session.rank)
            keep = False
        if keep or session.resume_left:
            if session.resume_left:
                reason = f"a resume gave up with {session.resume_left} param groups not registered"
            session.resume_left = 0
            return self.keeper.retain(session, reason)
        self.close_session(session)
        self._remove_checkpoints(session.job, session.rank)
        return None

    def close_session(self, session: Session) -> None:
        session.backend.close(session)
        self.paging.removed(session)
        session.close()

    def _remove_checkpoints(self, job: str, rank: int) -> None:
        if self.state_dir:
            job_files.remove_rank(self.state_dir, job, rank)

    def drop(self, job: str, rank: int | None = None) -> list[Retained]:
        """Removes the retained state of the job (or of one rank of it): memory and checkpoints."""
        if not job:
            raise InvalidArgument("job must be a non-empty name")
        live = [r for (j, r) in self.by_job_rank if j == job and (rank is None or r == rank)]
        if rank is not None and live:
            session = self.sessions[self.by_job_rank[(job, rank)]]
            raise FailedPrecondition(f"job {job!r} rank {rank} is live (session {session.id}, pid {session.pid}); "
                                     f"its trainer ends it with opt.close()")
        gone = [e for (j, r), e in list(self.keeper.held.items()) if j == job and (rank is None or r == rank)]
        if not gone:
            what = f"job {job!r}" + ("" if rank is None else f" rank {rank}")
            tail = f" (ranks {sorted(live)} are live)" if live else ""
            raise NotFound(f"{what} holds no retained state{tail}; `stated jobs` lists what the daemon holds")
        for entry in gone:
            self.forget(entry)
        return gone

    def forget(self, entry: Retained) -> None:
        """Removes a retained entry for good (dropped, or its retention ran out); it is listed until its
        memory and files are gone."""
        if entry.session is not None:
            self.close_session(entry.session)
        self._remove_checkpoints(entry.job, entry.rank)
        self.keeper.take(entry.job, entry.rank)

    def close_all(self) -> None:
        """At shutdown: every session and retained state leaves memory; checkpoints stay on disk."""
        for session in list(self.sessions.values()):
            self.sessions.pop(session.id, None)
            self.close_session(session)
        self.by_job_rank.clear()
        for entry in list(self.keeper.held.values()):
            if entry.session is not None:
                self.close_session(entry.session)
        self.keeper.held.clear()

    # --- durability -----------------------------------------------------------------------------

    def checkpoint(self, session: Session) -> Written | None:
        """Makes the session's current state durable (None: it already is, unchanged since)."""
        self._check_consistent(session, "checkpoint()")
        self._check_resumed(session, "checkpoint()")
        if not self.state_dir:
            raise FailedPrecondition("this daemon has no --state-dir: start `stated serve --state-dir DIR` "
                                     "for checkpoints")
        if session.on_device:
            raise FailedPrecondition("checkpoints of CUDA parameters are not supported yet; CPU sessions only")
        if not session.changed_since_durable and session.durable is not None:
            return None
        try:
            written = write_checkpoint(session, self.engine, self.state_dir, self.abandon)
        except OSError as exc:  # the data files' errors are refusals already; the directory's and manifest's not
            raise self._checkpoint_failure(session, exc) from None
        session.durable, session.changed_since_durable = written.manifest, False
        return written

    def _checkpoint_failure(self, session: Session, exc: OSError) -> ServiceError:
        """A checkpoint's file-system error as a refusal that names the path and what to do."""
        kind = ResourceExhausted if exc.errno in (errno.ENOSPC, errno.EDQUOT) else FailedPrecondition
        last = "none" if session.durable is None else f"step {session.durable.step}"
        return kind(f"checkpoint of job {session.job!r} rank {session.rank} at step {session.steps} failed: "
                    f"{exc.strerror or exc}: {exc.filename or self.state_dir}; the job stays at its last checkpoint "
                    f"({last}). --state-dir {self.state_dir} must be a directory this daemon can write, with room "
                    f"for the checkpoint: put that right and checkpoint again")

    @staticmethod
    def has_news(session: Session) -> bool:
        """Whether the session holds state a checkpoint should make durable: changed since its last
        checkpoint, consistent, and not half-way through a resume."""
        return session.changed_since_durable and session.inconsistent is None and not session.resume_left

    def checkpoint_due(self, session: Session) -> bool:
        """Whether --checkpoint-every asks for a checkpoint of the session's last step (one that can be
        taken: a state dir, a CPU session with news)."""
        return bool(self.checkpoint_every and self.state_dir and session.steps % self.checkpoint_every == 0
                    and self.has_news(session) and not session.on_device)

    @staticmethod
    def _check_resumed(session: Session, action: str) -> None:
        if session.resume_left:
            raise FailedPrecondition(f"{action} before the resume is complete: {session.resume_left} of the "
                                     f"retained param groups are still to be registered")

    # --- registration -------------------------------------------------------------------------

    def register(self, session: Session, groups: list[Hyperparameters],
                 tensors: list[tuple[tuple[int, ...], torch.dtype | None, int, str]], device: str = ""):
        """Adds tensors (shape, dtype, group within this request, name) and creates their arenas, or,
        for a CUDA `device` (its UUID), lays out the buffers the client will share."""
        device = self._check_device(session, device)
        if session.resume_left:
            return resuming.register_again(session, groups, tensors, device)
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
        full = [{**session.algorithm.defaults(), **hp} for hp in groups]
        arenas = 0 if device else 2 * sum(t.numel for t in infos) * element_size
        check_job_bytes(self.limits, session.job, job_accounting.job_bytes(self, session.job),
                        arenas + job_accounting.promised_state(session, full, infos, first_group))
        region, pages = session.add_region(full, infos, device)
        try:
            self.paging.added_pages(session, len(pages))
        except BaseException:
            session.drop_last_region()
            raise
        if device and session.backend is not self._cuda:
            session.backend = self._cuda
            self.paging.feed_device(session, self._cuda)
        session.changed_since_durable = True
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

    # --- steps ----------------------------------------------------------------------------------

    def step(self, session: Session, step: int, groups: list[Hyperparameters], has_grad: bytes,
             grad_scale: float = 0.0, max_grad_norm: float = 0.0) -> StepResult:
        self._check_consistent(session, f"step {step}")
        self._check_resumed(session, f"step {step}")
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
        session.changed_since_durable = True
        return self.engine.step(session, full, has_grad, grad_scale, max_grad_norm)

    @staticmethod
    def _check_consistent(session: Session, action: str) -> None:
        """Refuses `action` on a session a failure left half-applied (Note [half-applied steps])."""
        if session.inconsistent is not None:
            checkpoint_step = None if session.durable is None else session.durable.step
            raise session.inconsistent.refusal(session, action, checkpoint_step=checkpoint_step)
