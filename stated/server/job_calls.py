"""The servicer's calls about jobs rather than steps: Checkpoint, Drop, retention's end, the checkpoints
--checkpoint-every takes behind a step, and those of a shutdown (stated.server.servicer inherits them)."""

from __future__ import annotations

import logging

from stated.server.job_table import retained_stats
from stated.server.session_lock import SessionLock
from stated.server.shutdown import checkpoint_all
from stated.server.status_codes import rpc
from stated.session import Session
from stated.v1 import state_service_pb2 as pb

log = logging.getLogger("stated.server.servicer")


class JobCalls:
    """Needs the servicer's store, metrics, pool, locks, jobs_lock and helpers, and StatsCalls'
    check_may_drop."""

    async def expire(self) -> None:
        """Drops every retained (job, rank) whose --retain ran out."""
        async with self.jobs_lock:
            for entry in self.store.keeper.expired():
                log.info("retention ran out for job=%s rank=%d (step %d): dropped", entry.job, entry.rank, entry.step)
                await self._run(self.store.forget, entry)
        self._update_gauges()

    @rpc
    async def Drop(self, request: pb.DropRequest, context) -> pb.DropResponse:
        self._check_serving()
        self.check_may_drop(request)  # before anything that would tell whether the job exists
        rank = request.rank if request.HasField("rank") else None
        async with self.jobs_lock:
            stats = {(e.job, e.rank): retained_stats(self.store, e) for e in self.store.keeper.held.values()}
            gone = await self._run(self.store.drop, request.job, rank)
        for entry in gone:
            log.info("dropped job=%s rank=%d (%s at step %d)", entry.job, entry.rank, entry.state, entry.step)
        self._update_gauges()
        return pb.DropResponse(dropped=[stats[(e.job, e.rank)] for e in gone])

    @rpc
    async def Checkpoint(self, request: pb.CheckpointRequest, context) -> pb.CheckpointResponse:
        session = self._session(request.session)
        async with self.locks[session.id]:
            self._check_attached(session)
            written = await self._run(self._checkpoint, session)
        if written is None:  # durable already, unchanged since
            return pb.CheckpointResponse(step=session.durable.step, manifest=session.durable.path)
        return pb.CheckpointResponse(step=written.manifest.step, bytes_written=written.bytes,
                                     seconds=written.seconds, manifest=written.manifest.path)

    async def make_durable(self, seconds: float) -> tuple[int, int]:
        """At shutdown: checkpoints what changed since its last checkpoint (stated.server.shutdown)."""
        return await checkpoint_all(self, seconds)

    def _checkpoint_behind(self, session: Session, lock: SessionLock) -> bool:
        """Note [checkpoints behind the step]: when --checkpoint-every says this step is checkpointed,
        the step's reply goes back at once and the checkpoint is written on the thread pool while the
        session's lock stays held, so that it overlaps the trainer's next forward and backward (which
        read the parameters, as the checkpoint does, and write only gradients), and the next step waits
        for it. Returns whether the lock was handed to that checkpoint."""
        if not self.store.checkpoint_due(session):
            return False
        self.pool.submit(self._checkpoint_then_release, session, lock)
        return True

    def _checkpoint_then_release(self, session: Session, lock: SessionLock) -> None:
        try:
            if session.id in self.store.sessions:
                self._checkpoint(session)
        except Exception as exc:  # noqa: BLE001 - the previous checkpoint stays; the next one tries again
            log.error("job %r rank %d: the checkpoint of step %d (--checkpoint-every %d) failed; the step stands: %s",
                      session.job, session.rank, session.steps, self.store.checkpoint_every, exc)
        finally:
            lock.release()

    def _checkpoint(self, session: Session):
        """A checkpoint, counted and logged (the session's lock is held)."""
        try:
            written = self.store.checkpoint(session)
        except Exception:
            self.metrics.checkpoints.labels("failed").inc()
            raise
        if written is not None:
            self.metrics.checkpoints.labels("written").inc()
            self.metrics.checkpoint_seconds.observe(written.seconds)
            self.metrics.checkpoint_bytes.inc(written.bytes)
            log.info("checkpoint job=%s rank=%d step=%d: %d bytes in %.2f s", session.job, session.rank,
                     written.manifest.step, written.bytes, written.seconds)
        return written

