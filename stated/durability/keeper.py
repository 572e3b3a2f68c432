"""The (job, rank)s the daemon holds with no trainer attached: retained in memory, or recovered from disk.

A (job, rank) is *live* while a trainer is attached (the store's sessions). It is *retained* when its
trainer died (its Watch stream broke), closed with keep=True, or gave up a resume half-way: the session
stays in memory, pages, arenas and all, for --retain. It is *recovered* when a restarted daemon found its
last checkpoint: only the manifest is read at start-up, the pages when a trainer resumes it. Retention
running out, `stated drop` or a clean close removes the state and its checkpoints; nothing else does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from stated.durability import job_files
from stated.durability.manifest import Manifest, committed_manifests, prune_to
from stated.session import Session

log = logging.getLogger("stated.durability.keeper")


@dataclasses.dataclass
class Retained:
    job: str
    rank: int
    session: Session | None  # in memory; None for a recovered job (its state is on disk)
    manifest: Manifest | None  # its newest committed checkpoint, if any
    deadline: float  # time.monotonic() when it is dropped; math.inf: never
    reason: str

    @property
    def state(self) -> str:
        return "retained" if self.session is not None else "recovered"

    @property
    def step(self) -> int:
        return self.session.steps if self.session is not None else self.manifest.step

    @property
    def algorithm(self) -> str:
        return self.session.algorithm.name if self.session is not None else self.manifest.algorithm


class Keeper:
    def __init__(self, state_dir: str, retain_seconds: float):
        self.state_dir = state_dir
        self.retain_seconds = retain_seconds
        self.held: dict[tuple[str, int], Retained] = {}

    def deadline(self) -> float:
        return time.monotonic() + self.retain_seconds if math.isfinite(self.retain_seconds) else math.inf

    def retain(self, session: Session, reason: str) -> Retained:
        entry = Retained(session.job, session.rank, session, session.durable, self.deadline(), reason)
        self.held[(session.job, session.rank)] = entry
        return entry

    def take(self, job: str, rank: int) -> Retained | None:
        return self.held.pop((job, rank), None)

    def expired(self, now: float | None = None) -> list[Retained]:
        """Every entry whose retention ran out (the store's `forget` takes them out)."""
        now = time.monotonic() if now is None else now
        return [e for e in self.held.values() if e.deadline <= now]

    def seconds_left(self, entry: Retained) -> float:
        return -1.0 if math.isinf(entry.deadline) else max(0.0, entry.deadline - time.monotonic())

    # --- recovery -------------------------------------------------------------------------------------

    def recover(self) -> list[Retained]:
        """At start-up: every rank directory's newest checkpoint whose manifest checks out becomes a
        recovered entry; files of uncommitted or damaged checkpoints are removed. Pages are not read."""
        if not self.state_dir:
            return []
        found = []
        for job, rank, directory in job_files.scan(self.state_dir):
            good = committed_manifests(directory, f"job {job!r} rank {rank}")
            kept = good[: job_files.KEEP]
            removed = prune_to(directory, kept)
            if removed:
                log.info("removed %d files of unfinished or damaged checkpoints of job %r rank %d", len(removed),
                         job, rank)
            if not good:
                job_files.remove_rank(self.state_dir, job, rank)
                continue
            entry = Retained(job, rank, None, good[0], self.deadline(), "recovered after a daemon restart")
            self.held[(job, rank)] = entry
            found.append(entry)
        return found

    def fallbacks(self, entry: Retained) -> list[Manifest]:
        """The committed checkpoints of an entry, newest first, each read and checked again."""
        directory = job_files.rank_directory(self.state_dir, entry.job, entry.rank)
        return committed_manifests(directory, f"job {entry.job!r} rank {entry.rank}")
