"""What the daemon's jobs hold in memory, for the limits on sessions and bytes per job (stated.limits).

A session is in memory while it is live and while its trainer is gone but its state is retained in memory;
a recovered job (its state only on disk, read at resume) holds nothing yet.
"""

from __future__ import annotations

import dataclasses

import torch

from stated.session import Session
from stated_kernels.spec import Hyperparameters, TensorInfo


def sessions_in_memory(store) -> list[Session]:
    """Live sessions, then those retained in memory."""
    return [*store.sessions.values(), *(e.session for e in store.keeper.held.values() if e.session is not None)]


def job_bytes(store, job: str) -> int:
    """Bytes of state and shared-memory arenas the job's sessions hold, live and retained in memory."""
    return sum(s.state_bytes + sum(2 * r.arena_bytes for r in s.regions if not r.device)
               for s in sessions_in_memory(store) if s.job == job)


def promised_state(session: Session, full: list[Hyperparameters], infos: list[TensorInfo], first_group: int) -> int:
    """The state bytes a Register's tensors will hold (their paged fields, with a master copy), counted
    before any page is made."""
    total = 0
    for info in infos:
        if session.master:  # as Session.add_region lays them out (Note [master weights])
            info = dataclasses.replace(info, dtype=torch.float32)
        fields = session.algorithm.page_fields(info, full[info.group - first_group])
        total += sum(f.nbytes(info.numel) for f in fields) + (4 * info.numel if session.master else 0)
    return total
