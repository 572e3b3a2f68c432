"""Who an optimizer is to the daemon: its job's name and its rank, from the arguments or the environment.

Note [one job per run]
----------------------
Every rank of a distributed run must land in the same job (one name, ranks 0..N-1), on every node, and
a restarted run must find its name again so that `resume=True` finds the retained state. The name comes
from the first of these that the process has:

1. `job=` or $STATED_JOB: the user's own name.
2. torchrun's run id ($TORCHELASTIC_RUN_ID, the `--rdzv-id`), shared by all ranks and kept by elastic
   restarts; "none" (torchrun's static rendezvous, the default) is no id and falls through.
3. SLURM: a step of several tasks (`srun`: $SLURM_STEP_NUM_TASKS above 1) is named after
   $SLURM_JOB_ID and $SLURM_STEP_ID, which a requeued job keeps. A single task, or a process that srun
   did not start (the batch script itself, a shell in `salloc`), is not: two of those are two runs.
4. A rendezvous address: $MASTER_ADDR and $MASTER_PORT with $WORLD_SIZE above 1 (torchrun's static
   rendezvous, and torch.multiprocessing launches that init with env://): the same for every rank of the
   run and for its restarts, and no two runs can listen on one port at once.
5. torch.distributed, when it is initialised (any init method) with more than one rank: rank 0 names the
   job after its script and pid and publishes the name in the process group's store, where the other
   ranks read it.
6. Otherwise the script's name and this process's pid: one process, one job.

The rank is `rank=`, else $RANK, else torch.distributed's rank when it is initialised, else
$SLURM_PROCID, else 0.
"""

from __future__ import annotations

import logging
import os
import sys

from stated_client.errors import InvalidArgumentError
from stated_client.protocol import MAX_RANK

log = logging.getLogger("stated.client")

# How long a rank waits for rank 0 to publish the job's name (5 above): rank 0 may still be loading its
# model; torch's own collectives wait 10 minutes by default.
NAME_WAIT_SECONDS = 600.0
_logged = False


def default_job(instance: int = 1) -> str:
    """The job's name when `job=` is not given (Note [one job per run]); `instance` counts the stated
    optimizers this process made (the second is "<name>-2": every rank makes them in the same order).
    Says once per process, at INFO on the stated.client logger, which name it uses and why."""
    name, source = _named(instance)
    name = name if instance == 1 else f"{name}-{instance}"
    global _logged
    if not _logged:
        _logged = True
        log.info("stated: this process is job %r (from %s)", name, source)
    return name


def _named(instance: int) -> tuple[str, str]:
    env = os.environ
    if env.get("STATED_JOB"):
        return env["STATED_JOB"], "$STATED_JOB"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return env["TORCHELASTIC_RUN_ID"], "torchrun's $TORCHELASTIC_RUN_ID"
    script = _script()
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and _count(env.get("SLURM_STEP_NUM_TASKS")) > 1:
        return f"{script}-slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}", "$SLURM_JOB_ID and $SLURM_STEP_ID"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT") and _count(env.get("WORLD_SIZE")) > 1:
        return (f"{script}-{env['MASTER_ADDR']}-{env['MASTER_PORT']}",
                "the rendezvous address ($MASTER_ADDR, $MASTER_PORT)")
    shared = _from_process_group(script, instance)
    if shared is not None:
        return shared, "rank 0, through torch.distributed's store"
    return f"{script}-{os.getpid()}", "the script's name and this process's id"


def _script() -> str:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script or "python"


def _count(text: str | None) -> int:
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


def _process_group():
    """torch.distributed's default group when it is initialised with more than one rank, else None."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist


def _from_process_group(script: str, instance: int) -> str | None:
    """Rank 0's name, published in the default group's store (5 in Note [one job per run])."""
    dist = _process_group()
    if dist is None:
        return None
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    key = f"stated/job/{instance}"
    if dist.get_rank() == 0:
        name = f"{script}-{os.getpid()}"
        store.set(key, name)
        return name
    import datetime

    store.wait([key], datetime.timedelta(seconds=NAME_WAIT_SECONDS))
    return store.get(key).decode()


def resolve_rank(rank: int | None) -> int:
    """`rank`, else $RANK, else torch.distributed's rank, else $SLURM_PROCID, else 0; anything that is
    not a whole number from 0 to MAX_RANK is refused, naming where it came from."""
    if rank is not None:
        where, value = "rank", rank
    elif "RANK" in os.environ:
        where, value = "$RANK", os.environ["RANK"]
    elif _process_group() is not None:
        where, value = "torch.distributed's rank", _process_group().get_rank()
    elif "SLURM_PROCID" in os.environ:
        where, value = "$SLURM_PROCID", os.environ["SLURM_PROCID"]
    else:
        where, value = "the default rank", 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, float) or not 0 <= number <= MAX_RANK:
        raise InvalidArgumentError(f"{where} is {value!r}; a rank is a whole number from 0 to {MAX_RANK}")
    return number
