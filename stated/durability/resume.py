"""Resuming a retained (job, rank): the session a trainer re-attaches to, and its registrations again.

A retained session in memory is handed over as it is, under a new id and token. A recovered job (its
state only on disk), or one whose in-memory state is half-applied, is built from its newest checkpoint
that reads back whole: every byte is checked against the manifest's checksums while it is loaded, and a
damaged checkpoint makes way for the one before it. The trainer then registers its param groups again,
each checked against the retained layout (the first difference is named); the retained arenas, pages
and state serve them.
"""

from __future__ import annotations

import logging
import secrets

import torch

from stated.durability.checkpoint import load_checkpoint
from stated.durability.keeper import Retained
from stated.errors import DataLoss, FailedPrecondition, InvalidArgument
from stated.session import Session
from stated_client.wire import WIRE_DTYPES, dtype_name
from stated_kernels.spec import Hyperparameters, TensorInfo

log = logging.getLogger("stated.durability.resume")

_DTYPE_BY_NAME = {dtype_name(d): d for d in WIRE_DTYPES}


def retained_session(store, held: Retained, algo, pid: int, master_weights: bool) -> Session:
    """The retained session of `held`, under a new id and token (a half-applied one, or a recovered
    job, is built from its newest checkpoint that reads back whole)."""
    for what, kept, asked in (("algorithm", held.algorithm, algo.name),
                              ("master_weights", (held.session.master if held.session else
                                                  held.manifest.master_weights), master_weights)):
        if kept != asked:
            raise InvalidArgument(f"resume of job {held.job!r} rank {held.rank}: the retained state has "
                                  f"{what} {kept!r}, this optimizer {asked!r}")
    session = held.session
    if session is None or session.inconsistent is not None:
        session = _from_checkpoints(store, held, algo, pid)
        if held.session is not None:
            store.close_session(held.session)
    else:
        session.id, session.token, session.pid = secrets.token_hex(8), secrets.token_bytes(16), pid
    store.keeper.take(held.job, held.rank)
    session.resume_left = len(session.regions)
    return session


def _from_checkpoints(store, held: Retained, algo, pid: int) -> Session:
    """A session built and filled from the newest of `held`'s checkpoints that reads back whole."""
    manifests = store.keeper.fallbacks(held) if store.state_dir else []
    if not manifests:
        why = held.session.inconsistent.describe() if held.session is not None else "its checkpoint is gone"
        raise FailedPrecondition(f"job {held.job!r} rank {held.rank} cannot be resumed: {why}, and no "
                                 f"checkpoint reads back whole; run `stated drop {held.job}` to start over")
    problems = []
    for manifest in manifests:
        if manifest.page_bytes != store.page_bytes:
            problems.append(f"the checkpoint at step {manifest.step} has {manifest.page_bytes}-byte pages; "
                            f"this daemon runs with --page-size {store.page_bytes}")
            continue
        session = store.new_session(held.job, held.rank, algo, pid, manifest.master_weights)
        try:
            for region in manifest.regions:
                groups = [{**algo.defaults(), **g} for g in region["groups"]]
                first_tensor, first_group = len(session.tensors), len(session.groups)
                infos = [TensorInfo(first_tensor + i, tuple(shape), _DTYPE_BY_NAME[dtype], first_group + g, name)
                         for i, (shape, dtype, g, name) in enumerate(region["tensors"])]
                _region, pages = session.add_region(groups, infos, region["device"])
                store.paging.added_pages(session, len(pages))
            load_checkpoint(session, store.engine, manifest)
        except DataLoss as exc:
            store.close_session(session)
            log.error("resume of job %r rank %d: %s; trying an older checkpoint", held.job, held.rank, exc)
            problems.append(str(exc))
            continue
        except BaseException:
            store.close_session(session)
            raise
        session.durable, session.changed_since_durable = manifest, False
        return session
    raise DataLoss(f"job {held.job!r} rank {held.rank} cannot be resumed: " + "; ".join(problems)
                   + f"; run `stated drop {held.job}` to start over")


def register_again(session: Session, groups: list[Hyperparameters],
                    tensors: list[tuple[tuple[int, ...], torch.dtype | None, int, str]], device: str):
    """A resuming trainer registers a retained region: it must have the layout it had (the first
    difference is named); the region, its arenas and its state are the retained ones."""
    index = len(session.regions) - session.resume_left
    region = session.regions[index]
    places = [session.tensors[i] for i in region.tensors]
    first_group = min(p.info.group for p in places)
    where = f"resume of job {session.job!r} rank {session.rank}, param group {index}"
    kept_groups = len({p.info.group for p in places})
    if len(groups) != kept_groups:
        raise InvalidArgument(f"{where}: {len(groups)} groups sent, the retained state has {kept_groups}")
    if len(tensors) != len(places):
        raise InvalidArgument(f"{where}: {len(tensors)} tensors sent, the retained state has {len(places)}")
    if device != region.device:
        raise InvalidArgument(f"{where}: device {device or 'cpu'!r}, the retained state has "
                              f"{region.device or 'cpu'!r}")
    for i, ((shape, dtype, group, name), place) in enumerate(zip(tensors, places)):
        kept = (tuple(place.info.shape), session.dtype, place.info.group - first_group, place.info.name)
        for what, asked, had in zip(("shape", "dtype", "group", "name"), (tuple(shape), dtype, group, name), kept):
            if asked != had:
                raise InvalidArgument(f"{where}: tensors[{i}].{what} is {_shown(asked)}, the retained state "
                                      f"has {_shown(had)}")
    for i, hp in enumerate(groups):
        problem = session.algorithm.validate(hp, where=f"groups[{i}].")
        if problem:
            raise InvalidArgument(problem)
    session.check_groups(session.groups[:first_group] + [{**session.algorithm.defaults(), **hp} for hp in groups]
                         + session.groups[first_group + len(groups):])
    session.resume_left -= 1
    infos = [p.info for p in places]
    return region, infos, first_group, sum(session.table[p].page.nbytes for p in region.pages)


def _shown(value) -> str:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
