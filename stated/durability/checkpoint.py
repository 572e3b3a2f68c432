"""Writing a session's checkpoint, and loading one into a session built with the same layout.

Note [checkpoint order] in stated.durability.manifest says which files and in what order. The session's
lock is held throughout (the servicer takes it): no step changes a page, a parameter or a counter while
they are written, so the checkpoint is exactly the state after its step. Every page is written, each
with its checksum computed on a second thread while the first writes it, so the disk, not the CPU,
sets the pace; a paged session's pages are read ahead from its state file as in a step.

Note [removing old checkpoints]
-------------------------------
Unlinking the data files of a checkpoint that goes takes time in proportion to their size: 0.3 s for
the 2.4 GB of a 200M AdamW job on ext4 mounted with `discard` (bench/checkpoint.py), a third of its
checkpoint's time. So once a checkpoint is committed, of those that go (when BACKGROUND_BYTES or more)
only the manifests are removed at once, so that every reader sees the KEEP newest from then on; their
data files, orphans from that moment, are unlinked on a background thread. The next checkpoint of the
same rank waits for that first (it is the only writer of the directory); a crash in between leaves
orphans that recovery removes (stated.durability.keeper), as it removes those of a checkpoint that
never committed. Smaller removals (well under 0.15 s) are done at once, as before: what a small job's
directory lists right after its checkpoint returns is exactly its KEEP newest checkpoints.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import io
import logging
import os
import time

import torch

from stated.durability import job_files
from stated.durability.direct_file import DirectFile
from stated.durability.manifest import Manifest, write_manifest
from stated.errors import DataLoss
from stated.paging.state_file import align_up, checksum_of
from stated.session import Session
from stated_client.wire import dtype_name

log = logging.getLogger("stated.durability.checkpoint")

_hasher = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stated-checksum")
# Note [removing old checkpoints]: the removal still running in each rank directory.
_remover = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stated-checkpoint-remove")
_removing: dict[str, cf.Future] = {}
BACKGROUND_BYTES = 1 << 30  # Note [removing old checkpoints]


def describe_regions(session: Session) -> list[dict]:
    """The layout of the session's regions as a manifest holds it."""
    regions = []
    for region in session.regions:
        places = [session.tensors[i] for i in region.tensors]
        first_group = min(p.info.group for p in places)
        groups = sorted({p.info.group for p in places})
        regions.append({
            "device": region.device, "arena_bytes": region.arena_bytes,
            "groups": [_plain(session.groups[g]) for g in groups],
            "tensors": [[list(p.info.shape), dtype_name(session.dtype), p.info.group - first_group, p.info.name]
                        for p in places],
        })
    return regions


def _plain(hp: dict) -> dict:
    return {k: v for k, v in hp.items() if isinstance(v, (bool, int, float, str)) or v is None}


class Written:
    """What one checkpoint wrote: its manifest and the bytes and seconds it took."""

    def __init__(self, manifest: Manifest, nbytes: int, seconds: float):
        self.manifest, self.bytes, self.seconds = manifest, nbytes, seconds


def write_checkpoint(session: Session, engine, state_dir: str) -> Written:
    """Writes and commits the checkpoint of the session's current step, then prunes older ones. A
    failure (disk full, EIO) removes what it wrote and leaves the committed checkpoints as they were."""
    start = time.perf_counter()
    directory = job_files.rank_directory(state_dir, session.job, session.rank, create=True)
    _settle_removal(directory)
    step = session.steps
    committed = job_files.committed_steps(directory)
    # A checkpoint of this same step (state loaded since) is replaced: the others stay to fall back to.
    job_files.prune(directory, keep=set(committed) - {step})
    slot = align_up(session.page_bytes)
    regions = describe_regions(session)
    try:
        page_sums = _write_pages(session, engine, job_files.data_path(directory, step, ".pages"), slot)
        param_sums = _write_params(session, job_files.data_path(directory, step, ".params"))
        small = _small_state_bytes(session)
        small_file = DirectFile.create(job_files.data_path(directory, step, ".small"), len(small))
        try:
            small_file.write_at(0, small, len(small))
        finally:
            small_file.finish()
        manifest = Manifest(session.job, session.rank, step, session.algorithm.name, session.master,
                            session.page_bytes, regions, page_sums, param_sums, checksum_of(small), len(small),
                            time.time())
        write_manifest(directory, manifest)
    except BaseException:
        job_files.prune(directory, keep=set(committed) - {step})
        raise
    _remove_older(directory, keep=set(job_files.committed_steps(directory)[: job_files.KEEP]))
    return Written(manifest, manifest.data_bytes, time.perf_counter() - start)


def _remove_older(directory: str, keep: set[int]) -> None:
    """Removes the committed checkpoints not in `keep`: small ones at once, large ones' manifests now and
    their data files on the background thread (Note [removing old checkpoints])."""
    old = [step for step in job_files.committed_steps(directory) if step not in keep]
    if _data_bytes(directory, old) < BACKGROUND_BYTES:
        job_files.prune(directory, keep)
        return
    for step in old:
        os.unlink(job_files.data_path(directory, step, ".manifest"))
    _removing[directory] = _remover.submit(_prune_quietly, directory, keep)


def _data_bytes(directory: str, steps: list[int]) -> int:
    total = 0
    for step in steps:
        for suffix in job_files.DATA_SUFFIXES:
            try:
                total += os.stat(job_files.data_path(directory, step, suffix)).st_size
            except FileNotFoundError:
                pass
    return total


def _prune_quietly(directory: str, keep: set[int]) -> None:
    try:
        job_files.prune(directory, keep)
    except OSError as exc:  # the job was dropped meanwhile: its directory went with everything in it
        log.debug("removing old checkpoint files in %s: %s", directory, exc)


def _settle_removal(directory: str) -> None:
    """Waits until the removal started by the directory's previous checkpoint is done."""
    pending = _removing.pop(directory, None)
    if pending is not None:
        pending.result()


def _write_pages(session: Session, engine, path: str, slot: int) -> list[int]:
    sums = [0] * len(session.table)
    out = DirectFile.create(path, len(session.table) * slot)
    try:
        def write(bound) -> None:
            data = bound.buffer[: session.page_bytes]
            hashing = _hasher.submit(checksum_of, data.numpy())
            out.write_at(bound.page * slot, data, session.page_bytes)
            sums[bound.page] = hashing.result()

        engine.read_all_pages(session, write)
    except BaseException:
        out.close()
        raise
    out.finish()
    return sums


def _write_params(session: Session, path: str) -> list[int]:
    offsets = _param_offsets(session)
    out = DirectFile.create(path, offsets[-1])
    sums = []
    try:
        for region, offset in zip(session.regions, offsets):
            arena = region.params.tensor
            hashing = _hasher.submit(checksum_of, arena.numpy())
            out.write_at(offset, arena, region.arena_bytes)
            sums.append(hashing.result())
    except BaseException:
        out.close()
        raise
    out.finish()
    return sums


def _param_offsets(session_or_manifest) -> list[int]:
    """Where each region's param arena starts in the .params file, and the file's size last."""
    sizes = [r.arena_bytes if hasattr(r, "arena_bytes") else r["arena_bytes"] for r in session_or_manifest.regions]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + align_up(size))
    return offsets


def _small_state_bytes(session: Session) -> bytes:
    small = [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in s.items()}
             for s in session.small]
    buffer = io.BytesIO()
    torch.save({"small": small}, buffer)
    return buffer.getvalue()


def load_checkpoint(session: Session, engine, manifest: Manifest) -> None:
    """Fills a session built from `manifest`'s layout with its state: pages, parameters, small state,
    step counters. Every byte is checked against its checksum; DataLoss names the first that fails."""
    directory = job_files.rank_directory_of(manifest.path)
    step, slot = manifest.step, align_up(manifest.page_bytes)
    small_file = DirectFile.open(job_files.data_path(directory, step, ".small"))
    try:
        raw = bytearray(manifest.small_bytes)
        small_file.read_at(0, raw, manifest.small_bytes)
    finally:
        small_file.close()
    if checksum_of(raw) != manifest.small_checksum:
        raise DataLoss(f"checkpoint file {small_file.path} is damaged: its checksum does not match the manifest")
    small = torch.load(io.BytesIO(bytes(raw)), weights_only=True)["small"]
    if len(small) != len(session.small):
        raise DataLoss(f"checkpoint file {small_file.path} holds {len(small)} tensors, the manifest {len(session.small)}")

    params = DirectFile.open(job_files.data_path(directory, step, ".params"))
    try:
        for index, (region, offset) in enumerate(zip(session.regions, _param_offsets(session))):
            arena = region.params.tensor
            params.read_at(offset, arena, region.arena_bytes)
            if checksum_of(arena.numpy()) != manifest.params_checksums[index]:
                raise DataLoss(f"checkpoint file {params.path} is damaged: the parameters of region {index} "
                               f"do not match their checksum")
    finally:
        params.close()

    pages = DirectFile.open(job_files.data_path(directory, step, ".pages"))
    try:
        def read(bound) -> None:
            data = bound.buffer[: manifest.page_bytes]
            pages.read_at(bound.page * slot, data, manifest.page_bytes)
            if checksum_of(data.numpy()) != manifest.page_checksums[bound.page]:
                raise DataLoss(f"page {bound.page} in checkpoint file {pages.path} is damaged: its checksum "
                               f"does not match the manifest")

        engine.visit_pages(session, range(len(session.table)), read, dirty=True)
    finally:
        pages.close()
    session.small[:] = small
    session.bindings.clear()  # bound segments carry the small-state dicts just replaced
    session.master_pending.clear()
    session.steps = step


def expected_sizes(manifest: Manifest) -> dict[str, int]:
    """The bytes each data file of the manifest's checkpoint must have at least."""
    return {".pages": len(manifest.page_checksums) * align_up(manifest.page_bytes),
            ".params": _param_offsets(manifest)[-1], ".small": manifest.small_bytes}
