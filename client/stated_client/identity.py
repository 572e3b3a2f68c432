"""Who an optimizer is to the daemon: its job's name and its rank, from the arguments or the environment."""

from __future__ import annotations

import os
import sys

from stated_client.errors import InvalidArgumentError
from stated_client.protocol import MAX_RANK


def default_job() -> str:
    """STATED_JOB, else torchrun's run id, else the script's name and this process's id."""
    job = os.environ.get("STATED_JOB") or os.environ.get("TORCHELASTIC_RUN_ID")
    if job and job != "none":
        return job
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{script or 'python'}-{os.getpid()}"


def resolve_rank(rank: int | None) -> int:
    """`rank`, else $RANK, else 0; anything that is not a whole number from 0 to MAX_RANK is refused,
    naming where it came from."""
    where, value = ("rank", rank) if rank is not None else ("$RANK", os.environ.get("RANK", "0"))
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, float) or not 0 <= number <= MAX_RANK:
        raise InvalidArgumentError(f"{where} is {value!r}; a rank is a whole number from 0 to {MAX_RANK}")
    return number
