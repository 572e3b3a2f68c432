"""The daemon's limits: what one client may make it hold, each a `stated serve` flag, each refusal naming it.

Anyone who can reach the socket can attach, so each resource a request makes the daemon hold has a bound
that is checked before the resource is taken: sessions, step channel connections (and so their
threads), tensors per Register, bytes per job, the size of a step channel frame, the time a step channel
connection may take to authenticate or stay silent, and the time an attached session has to open its
Watch. `Limits` holds the values (built from the flags by stated.cli); the `check_*` functions raise the
project's errors (stated.errors) with a sentence that names the flag, its value and what to do.

Note [limits and their defaults]
--------------------------------
The defaults are far above what a real node needs, so that no training run meets them, and low enough
that one client cannot take the daemon down for the others:

- 1024 sessions: a node runs a few trainers per GPU; a session is one optimizer of one process.
- 1024 step channel connections: one per session; each holds one thread (Note [step channel threads]).
- 65536 tensors per Register: the largest models have a few thousand parameter tensors per rank (a
  mixture of experts with every expert a tensor, tens of thousands); a Register of 65536 takes seconds.
- 1024 param groups per session: a group per layer (layer-wise learning rates) of the deepest models is
  a few hundred; each CPU group's arenas hold two of the daemon's file descriptors.
- bytes per job: by default the machine's memory (with --host-memory, its memory plus the size of the
  --state-dir file system, where pages beyond the budget live): a job that promises more cannot be held.
- 10 s to authenticate: a client sends its SessionRef right after it connects.
- 1 h idle on an authenticated step channel connection: a trainer may pause between steps for a long
  evaluation or checkpoint; the client reconnects when the daemon closed its idle line
  (stated_client.step_line), so the only cost of the timeout is one reconnect.
- 30 s to open Watch after Attach: the client opens it right after Attach answers.
"""

from __future__ import annotations

import dataclasses
import math
import os

from stated.errors import InvalidArgument, ResourceExhausted
from stated.sizes import format_bytes

DEFAULT_MAX_SESSIONS = 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_TENSORS_PER_REGISTER = 1 << 16
DEFAULT_MAX_GROUPS_PER_SESSION = 1024
DEFAULT_STEP_AUTH_TIMEOUT = 10.0
DEFAULT_STEP_IDLE_TIMEOUT = 3600.0
DEFAULT_WATCH_TIMEOUT = 30.0
# A step frame carries one has_grad byte per tensor and each group's hyperparameters (a few dozen named
# scalars): this much per group, and this much besides.
STEP_FRAME_BYTES_PER_GROUP = 4 << 10
STEP_FRAME_BASE_BYTES = 64 << 10
# gRPC calls at once beyond one Watch per session: room for each session's call under way and tools.
EXTRA_RPCS = 64


def machine_bytes(state_dir: str = "", paged: bool = False) -> int:
    """--max-job-bytes' default: the machine's memory, plus the --state-dir file system's size when state
    is paged there (--host-memory)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if paged and state_dir:
        try:
            stat = os.statvfs(state_dir if os.path.isdir(state_dir) else os.path.dirname(state_dir) or ".")
            total += stat.f_blocks * stat.f_frsize
        except OSError:
            pass  # the daemon refuses the directory itself at start, naming it
    return total


@dataclasses.dataclass(frozen=True)
class Limits:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_tensors_per_register: int = DEFAULT_MAX_TENSORS_PER_REGISTER
    max_groups_per_session: int = DEFAULT_MAX_GROUPS_PER_SESSION
    max_job_bytes: float = math.inf  # stated.cli passes machine_bytes(); inf: no cap
    step_auth_timeout: float = DEFAULT_STEP_AUTH_TIMEOUT
    step_idle_timeout: float = DEFAULT_STEP_IDLE_TIMEOUT
    watch_timeout: float = DEFAULT_WATCH_TIMEOUT

    @property
    def max_concurrent_rpcs(self) -> int:
        """gRPC's maximum_concurrent_rpcs: a Watch per session lasts the session's life, so the bound is
        sessions and then room for their calls (beyond it gRPC answers RESOURCE_EXHAUSTED)."""
        return 2 * self.max_sessions + EXTRA_RPCS


def seconds_text(seconds: float) -> str:
    return "forever" if math.isinf(seconds) else f"{seconds:g}s"


def check_sessions(limits: Limits, held: int) -> None:
    """Before a new session: `held` live sessions and retained ones in memory."""
    if held >= limits.max_sessions:
        raise ResourceExhausted(f"the daemon holds {held} sessions (live, and retained in memory), the most "
                                f"--max-sessions={limits.max_sessions} allows; detach sessions or `stated drop` "
                                f"retained jobs, or start the daemon with a higher --max-sessions")


def connections_refusal(limits: Limits, open_now: int) -> ResourceExhausted | None:
    """The refusal of a new step channel connection when `open_now` are open; None when it may open."""
    if open_now < limits.max_connections:
        return None
    return ResourceExhausted(f"the step channel has {open_now} connections open, the most "
                             f"--max-connections={limits.max_connections} allows; this one steps over gRPC")


def check_tensors(limits: Limits, count: int) -> None:
    """Before anything of a Register is built: its number of tensors."""
    if count > limits.max_tensors_per_register:
        raise InvalidArgument(f"Register has {count} tensors, over --max-tensors-per-register="
                              f"{limits.max_tensors_per_register}; register them in several param groups' "
                              f"calls (add_param_group), or start the daemon with a higher limit")


def check_groups(limits: Limits, held: int) -> None:
    """Before a Register makes a session's next param group (its region, and a CPU region's two arena
    descriptors)."""
    if held >= limits.max_groups_per_session:
        raise ResourceExhausted(f"the session already has {held} param groups, the most --max-groups-per-session="
                                f"{limits.max_groups_per_session} allows; put tensors with the same hyperparameters "
                                f"in one group, or start the daemon with a higher limit")


def check_job_bytes(limits: Limits, job: str, held: int, adding: int) -> None:
    """Before a Register's arenas and pages are made: the job holds `held` bytes and asks for `adding`."""
    if held + adding > limits.max_job_bytes:
        raise ResourceExhausted(
            f"job {job!r} would hold {format_bytes(held + adding)} of optimizer state and arenas "
            f"({format_bytes(held)} held, {format_bytes(adding)} in this Register), over --max-job-bytes="
            f"{format_bytes(int(limits.max_job_bytes))}; start the daemon with a higher --max-job-bytes")


def step_frame_limit(tensors: int, groups: int) -> int:
    """The largest StepRequest frame a session of this many tensors and groups sends."""
    return STEP_FRAME_BASE_BYTES + tensors + STEP_FRAME_BYTES_PER_GROUP * groups
