"""The gRPC servicer: decode, validate, call the store, encode (STYLE.md point 8).

Heavy work (steps, state transfers) runs in a thread pool so the event loop keeps answering every other
session; one lock per session keeps that session's operations in order, whether they run on the event loop
or on a step channel thread (stated.server.session_lock). Errors raised by the core carry their status name
(stated.errors), which stated.server.status_codes turns into a gRPC code; anything else becomes INTERNAL
with the exception's text, is logged, and the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import torch

from stated import __version__
from stated.arena_memory import Duplicates
from stated.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from stated.limits import Limits, check_groups, check_tensors, seconds_text
from stated.metrics import Metrics
from stated.server.calls import is_set_within, run_to_end
from stated.server.credentials import Credentials
from stated.server.job_calls import JobCalls
from stated.server.session_lock import SessionLock
from stated.server.state_stream import Assembler
from stated.server.stats_calls import StatsCalls
from stated.server.status_codes import rpc
from stated.session import Session
from stated.store import Store
from stated.v1 import state_service_pb2 as pb
from stated.v1 import state_service_pb2_grpc as pb_grpc
from stated_kernels import ALGORITHMS
from stated_client.protocol import SHUTTING_DOWN
from stated_client.wire import CHUNK_BYTES, TORCH_DTYPES, state_chunks

log = logging.getLogger("stated.server.servicer")

# Tensors may be float32/bfloat16/float16/float64 on the wire (the store says which it supports);
# state fields may also be 8-bit codes.
DTYPES = {code: dtype for code, dtype in TORCH_DTYPES.items() if dtype != torch.uint8}
# Steps of sessions this small run on the event loop's thread: handing them to the thread pool costs more
# (about half a millisecond on two cores) than the step itself, and they block other sessions only briefly.
INLINE_STEP_PARAMETERS = 1 << 21
MAX_CHUNK_BYTES = 3 << 20  # below gRPC's 4 MiB message limit
# How long an Attach of a (job, rank) that is still live waits for it to end: a trainer restarted right
# after a kill -9 comes back before the daemon has read the end of the old one's Watch stream.
REATTACH_WAIT_SECONDS = 3.0
# The keepalive intervals a Watch may ask for (WatchRequest.keepalive_seconds).
KEEPALIVE_SECONDS = (0.05, 60.0)


def keepalive_interval(asked: float) -> float | None:
    """Seconds between a Watch stream's keepalives: what the client asked, within KEEPALIVE_SECONDS; None
    (no keepalives) when it asked for none."""
    if not asked > 0:
        return None
    return min(max(asked, KEEPALIVE_SECONDS[0]), KEEPALIVE_SECONDS[1])


def hyperparameters(msg: pb.GroupHyperparameters) -> dict:
    return {**dict(msg.scalars), **dict(msg.flags)}


class StateServicer(JobCalls, StatsCalls, pb_grpc.StateServiceServicer):
    def __init__(self, store: Store, metrics: Metrics, workers: int = 4, limits: Limits | None = None):
        self.store = store
        self.limits = limits or Limits()
        # Sessions that have not opened their Watch yet, and when they must have (time.monotonic()).
        self.unwatched: dict[str, float] = {}
        self.metrics = metrics
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stated-step")
        self.locks: dict[str, SessionLock] = {}
        self.closed: dict[str, asyncio.Event] = {}
        # Sessions whose trainer went away (their Watch broke), detached once the work under way ends.
        self.orphaned: set[str] = set()
        # The step channel's socket (stated.server.step_channel), told to clients at Attach; "" when none.
        self.step_socket = ""
        # Set when the daemon starts to shut down (stated.server.daemon), before any session is detached.
        self.stopping = False
        # Attach, detach, drop and retention's end change which (job, rank)s are live or retained: one at
        # a time, so that no two of them see a (job, rank) half-way from one to the other.
        self.jobs_lock = asyncio.Lock()
        # Who attaches (Note [job owners] in stated.job_owners): handed out by the step channel.
        self.credentials = Credentials()

    async def _run(self, fn, *args):
        return await run_to_end(self.pool, fn, *args)  # Note [work outlives its call]

    def _session(self, ref: pb.SessionRef) -> Session:
        self._check_serving()
        return self.store.get(ref.id, ref.token)

    def _check_serving(self) -> None:
        # From the start of shutdown every session call is refused as UNAVAILABLE: the sessions are being
        # detached, and NOT_FOUND would tell their clients that they never existed.
        if self.stopping:
            raise Unavailable(SHUTTING_DOWN)

    def _update_gauges(self) -> None:
        # A snapshot: step channel threads call this while the event loop attaches and detaches.
        sessions = list(self.store.sessions.values())
        self.metrics.sessions.set(len(sessions))
        self.metrics.state_bytes.set(sum(s.state_bytes for s in sessions))
        self.metrics.parameters.set(sum(s.parameters for s in sessions))
        by_algorithm: dict[str, list[int]] = {}
        for s in sessions:
            figures = by_algorithm.setdefault(s.algorithm.name, [0, 0])
            figures[0] += s.state_bytes
            figures[1] += s.parameters
        for name in ALGORITHMS:
            state, params = by_algorithm.get(name, (0, 0))
            self.metrics.bytes_per_parameter.labels(name).set(state / params if params else 0.0)
        pagers = [s.pager for s in sessions]
        self.metrics.resident_bytes.labels("host").set(sum(p.resident_bytes for p in pagers))
        self.metrics.resident_bytes.labels("disk").set(sum(p.disk_bytes for p in pagers))
        self.metrics.retained.set(len(self.store.keeper.held))

    # --- sessions ---------------------------------------------------------------------------------

    @rpc
    async def Attach(self, request: pb.AttachRequest, context) -> pb.AttachResponse:
        self._check_serving()
        uid = self.credentials.redeem(request.credential)
        await self._wait_for_end(request.job, request.rank)
        async with self.jobs_lock:
            self._check_unwatched_holder(request.job, request.rank)
            session = await run_to_end(self.pool, self.store.attach, request.job, request.rank, request.algorithm,
                                       request.pid, request.master_weights, request.resume, uid,
                                       abandoned=self._attach_abandoned)
            self.locks[session.id] = SessionLock()
            self.closed[session.id] = asyncio.Event()
            self.unwatched[session.id] = time.monotonic() + self.limits.watch_timeout
        resumed = bool(session.resume_left)
        log.info("attach job=%s rank=%d session=%s pid=%d uid=%s algorithm=%s%s%s", session.job, session.rank,
                 session.id, session.pid, "unknown" if uid is None else uid, session.algorithm.name,
                 " master_weights" if session.master else "",
                 f" resumed at step {session.steps}" if resumed else "")
        self._update_gauges()
        return pb.AttachResponse(session=pb.SessionRef(id=session.id, token=session.token),
                                 daemon_version=__version__, step_socket=self.step_socket, resumed=resumed,
                                 resumed_step=session.steps if resumed else 0,
                                 resumed_regions=session.resume_left)

    def _attach_abandoned(self, session: Session) -> None:
        """Its trainer went away before the Attach answered: a resume's state is retained again, a new
        session dropped (no Watch would ever end it)."""
        kept = self.store.detach(session, reason="its trainer went away before the attach answered")
        log.info("attach job=%s rank=%d: its trainer went away before the attach answered; %s", session.job,
                 session.rank, "retained" if kept else "dropped")

    async def _wait_for_end(self, job: str, rank: int) -> None:
        """If (job, rank) is live, waits a little for it to end (Watch breaking: its trainer died)."""
        session_id = self.store.by_job_rank.get((job, rank))
        event = self.closed.get(session_id) if session_id else None
        if event is not None and not await is_set_within(event, REATTACH_WAIT_SECONDS) and session_id in self.orphaned:
            await event.wait()  # its trainer is gone: its end waits only for the work under way

    def _check_unwatched_holder(self, job: str, rank: int) -> None:
        """A (job, rank) held by a session that never opened its Watch: refused, saying when it goes."""
        holder = self.store.by_job_rank.get((job, rank))
        deadline = self.unwatched.get(holder) if holder else None
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            raise AlreadyExists(f"job {job!r} rank {rank} is already attached (session {holder}, which has not "
                                f"opened its Watch yet); it is detached {left:.0f} s from now unless it does "
                                f"(--watch-timeout={seconds_text(self.limits.watch_timeout)})")

    async def reap_unwatched(self) -> None:
        """Note [unwatched sessions]: a session whose Watch did not open within --watch-timeout of its
        Attach has no trainer that the daemon could see die, so nothing would ever end it: it is
        detached (a resume's state is retained again), and counted."""
        now = time.monotonic()
        for session_id in [s for s, deadline in self.unwatched.items() if deadline <= now]:
            self.unwatched.pop(session_id, None)
            session = self.store.sessions.get(session_id)
            if session is None:
                continue
            self.metrics.unwatched_reaped.inc()
            await self.detach(session, f"it opened no Watch within --watch-timeout="
                                       f"{seconds_text(self.limits.watch_timeout)} of its attach")

    async def detach(self, session: Session, reason: str, keep: bool = False) -> None:
        lock = self.locks.get(session.id)
        if lock is None:
            return
        async with lock:
            if session.id not in self.store.sessions:
                return
            async with self.jobs_lock:
                kept = await self._run(self.store.detach, session, keep, reason)
        self.locks.pop(session.id, None)
        self.orphaned.discard(session.id)
        self.unwatched.pop(session.id, None)
        event = self.closed.pop(session.id, None)
        if event is not None:
            event.set()
        log.info("detach job=%s rank=%d session=%s reason=%s steps=%d%s", session.job, session.rank, session.id,
                 reason, session.steps, f" (retained: {kept.reason})" if kept else "")
        self._update_gauges()

    @rpc
    async def Detach(self, request: pb.DetachRequest, context) -> pb.DetachResponse:
        await self.detach(self._session(request.session), "closed with keep" if request.keep else "client",
                          keep=request.keep)
        return pb.DetachResponse()

    @rpc
    async def Watch(self, request: pb.WatchRequest, context):
        """Open for the session's life, with keepalives when asked (Note [liveness] in
        stated_client.liveness); ends when the session is detached, with UNAVAILABLE when the daemon stops."""
        session = self._session(request.session)
        closed = self.closed[session.id]
        self.unwatched.pop(session.id, None)
        interval = keepalive_interval(request.keepalive_seconds)
        await context.write(pb.WatchResponse(attached=True))
        try:
            while not await is_set_within(closed, interval):
                await context.write(pb.WatchResponse(keepalive=True))
        finally:
            if session.id in self.store.sessions and not closed.is_set():
                # The stream broke while the session was live: its client is gone, its state stays retained
                # once the work under way ends (Note [work outlives its call] in stated.server.calls).
                self.orphaned.add(session.id)
                await asyncio.shield(self.detach(session, f"its trainer (pid {session.pid}) died", keep=True))
        if self.stopping:
            raise Unavailable(SHUTTING_DOWN)

    # --- registration and steps ------------------------------------------------------------------

    @rpc
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        session = self._session(request.session)
        check_tensors(self.limits, len(request.tensors))  # before anything is built of it
        async with self.locks[session.id]:
            check_groups(self.limits, len(session.regions))
            resumed = bool(session.resume_left)
            region, infos, first_group, state_bytes = await self._run(self._register, session, request)
        self._update_gauges()
        placements = [pb.TensorPlacement(index=info.index, offset_bytes=session.tensors[info.index].offset_bytes)
                      for info in infos]
        return pb.RegisterResponse(arena_bytes=region.arena_bytes,
                                   placements=placements, first_group=first_group, state_bytes=state_bytes,
                                   region=session.regions.index(region), resumed=resumed)

    def _register(self, session: Session, request: pb.RegisterRequest):
        """Register's work, on the thread pool: even the decoding of a large one would hold up the event
        loop, and with it every other session's calls."""
        groups = [hyperparameters(g) for g in request.groups]
        tensors = []
        for i, t in enumerate(request.tensors):
            if t.dtype not in DTYPES:
                raise InvalidArgument(f"tensors[{i}].dtype is {'unspecified' if t.dtype == 0 else t.dtype}; "
                                      f"send one of float32, bfloat16, float16")
            tensors.append((tuple(t.shape), DTYPES[t.dtype], t.group, t.name))
        return self.store.register(session, groups, tensors, request.device)

    @rpc
    async def ShareDeviceBuffers(self, request: pb.ShareDeviceBuffersRequest, context) -> pb.ShareDeviceBuffersResponse:
        session = self._session(request.session)
        buffers = [(b.handle, b.offset_bytes, b.size_bytes) for b in (request.params, request.grads)]
        async with self.locks[session.id]:
            await self._run(self.store.share_device_buffers, session, request.region, request.device, *buffers)
        return pb.ShareDeviceBuffersResponse()

    @rpc
    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        return await self.apply_step(request.session.id, request.session.token, request)

    async def apply_step(self, session_id: str, token: bytes, request: pb.StepRequest) -> pb.StepResponse:
        """Step, from gRPC's Step, on the event loop; raises ServiceError."""
        session, lock, groups = self._step_session(session_id, token, request)
        await lock.acquire()
        handed = False
        try:
            self._check_attached(session)
            if session.parameters <= INLINE_STEP_PARAMETERS:
                reply = self._step_locked(session, request, groups)
            else:
                reply = await self._run(self._step_locked, session, request, groups)
            handed = self._checkpoint_behind(session, lock)
            return reply
        finally:
            if not handed:
                lock.release()

    def step_blocking(self, session_id: str, token: bytes, request: pb.StepRequest) -> pb.StepResponse:
        """Step, from a step channel thread (stated.server.step_channel), with no hop through the event loop;
        raises ServiceError."""
        session, lock, groups = self._step_session(session_id, token, request)
        lock.take()
        handed = False
        try:
            self._check_attached(session)
            reply = self._step_locked(session, request, groups)
            handed = self._checkpoint_behind(session, lock)
            return reply
        finally:
            if not handed:
                lock.release()

    def send_arenas(self, session_id: str, token: bytes, region_index: int, send) -> None:
        """Hands region `region_index`'s arena sizes and descriptors to `send(nbytes, fds)`, from a step channel
        thread: copies of the descriptors taken under the session's lock (a failed Register closes its
        region's), sent after it, so that a client that never reads blocks only its own connection."""
        session, lock = self._session_and_lock(session_id, token)
        with lock:
            self._check_attached(session)
            region = session.host_region(region_index)
            copies = Duplicates([region.params, region.grads])
        with copies:
            send(region.arena_bytes, copies.fds)

    def _step_session(self, session_id: str, token: bytes, request: pb.StepRequest):
        return *self._session_and_lock(session_id, token), [hyperparameters(g) for g in request.groups]

    def _session_and_lock(self, session_id: str, token: bytes) -> tuple[Session, SessionLock]:
        """The session of a step-channel request, and its lock; NOT_FOUND while it detaches (UNAVAILABLE
        when the daemon is stopping)."""
        self._check_serving()
        session = self.store.get(session_id, token)
        lock = self.locks.get(session.id)
        if lock is None:
            self._check_serving()
            raise NotFound(f"session {session.id} is detaching")
        return session, lock

    def _check_attached(self, session: Session) -> None:
        if session.id not in self.store.sessions:
            self._check_serving()
            raise NotFound(f"session {session.id} was detached while its step waited")

    def _step_locked(self, session: Session, request: pb.StepRequest, groups: list[dict]) -> pb.StepResponse:
        """The step itself, under the session's lock, on whichever thread holds it."""
        result = self.store.step(session, request.step, groups, request.has_grad,
                                 request.grad_scale, request.max_grad_norm)
        self.metrics.step_duration.observe(result.seconds)
        self.metrics.steps.inc()
        self.metrics.stall_seconds.inc(result.stall_seconds)
        self._update_gauges()
        return pb.StepResponse(seconds=result.seconds, stall_seconds=result.stall_seconds,
                               page_faults=result.page_faults, tensors_updated=result.tensors_updated,
                               grad_norm=result.grad_norm, found_inf=result.found_inf)

    # --- state_dict ------------------------------------------------------------------------------

    @rpc
    async def ExportState(self, request: pb.ExportStateRequest, context):
        session = self._session(request.session)
        chunk = request.chunk_bytes or CHUNK_BYTES
        if chunk > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_bytes is {chunk}, more than the limit of {MAX_CHUNK_BYTES}")
        async with self.locks[session.id]:
            await self._run(self.store.begin_export, session)
            for index in range(len(session.tensors)):
                entry = await self._run(self.store.export_tensor, session, index)
                if entry is None:
                    continue
                step = float(entry.pop("step", 0.0))
                await context.write(pb.ExportStateResponse(
                    header=pb.TensorStateHeader(tensor=index, step=step, fields=list(entry))))
                for name, value in entry.items():
                    for message in state_chunks(index, name, value, chunk):
                        await context.write(pb.ExportStateResponse(chunk=message))

    @rpc
    async def ImportState(self, request_iterator, context) -> pb.ImportStateResponse:
        # The whole stream is assembled and checked before any state changes (all or nothing).
        session, entries, assembler = None, [], None
        async for request in request_iterator:
            if session is None:
                session = self._session(request.session)
                assembler = Assembler(session)  # checks each message against the session's tensors
            kind = request.WhichOneof("item")
            done = assembler.header(request.header) if kind == "header" else (
                assembler.chunk(request.chunk) if kind == "chunk" else None)
            if done is not None:
                entries.append(done)
        if session is None:
            raise InvalidArgument("the ImportState stream was empty; its first message must name the session")
        last = assembler.finish()
        if last is not None:
            entries.append(last)
        async with self.locks[session.id]:
            tensors, nbytes = await self._run(self.store.import_state, session, entries)
        return pb.ImportStateResponse(tensors=tensors, bytes=nbytes)

    def end_watches(self) -> None:
        """Ends every Watch stream (with UNAVAILABLE once stopping): the daemon is going away."""
        for event in self.closed.values():
            event.set()

    def close(self) -> None:
        self.end_watches()
        self.store.close_all()
        self.pool.shutdown(wait=True)
