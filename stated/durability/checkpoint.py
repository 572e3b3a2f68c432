"""Writing a session's checkpoint, and loading one into a session built with the same layout.

Note [checkpoint order] in stated.durability.manifest says which files and in what order. The session's
lock is held throughout (the servicer takes it): no step changes a page, a parameter or a counter while
they are written, so the checkpoint is exactly the state after its step. The pages that changed since
the session's last checkpoint (`Session.changed_pages`, all of them the first time) are written; the
others stay where the last checkpoint has them. A resident session writes them to a new `.pages` file,
each with its checksum computed on a second thread while the first writes it, so the disk, not the
CPU, sets the pace. A paged session writes only those of them its state file does not hold as they
are, into the state file, and then freezes that file as the checkpoint's `.pages` (Note [frozen state
files] in stated.paging.state_file): its spilled pages, on disk already, are neither read nor written.
The parameters and the small state are written every time.

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
directory lists right after its checkpoint returns is exactly its KEEP newest checkpoints (and the
`.pages` files they still read).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import errno
import io
import logging
import os
import threading
import time

import torch

from stated.durability import job_files
from stated.durability.direct_file import DirectFile
from stated.durability.manifest import Manifest, committed_manifests, param_offsets, prune_to, write_manifest
from stated.errors import DataLoss, Unavailable
from stated.paging.state_file import checksum_of
from stated.paging.state_file_space import align_up
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


class CheckpointAbandoned(Unavailable):
    """A checkpoint given up half-way because the daemon is shutting down and out of time."""

    def __init__(self, session: Session):
        super().__init__(f"the checkpoint of job {session.job!r} rank {session.rank} at step {session.steps} was "
                         f"given up: the daemon is shutting down and --shutdown-timeout ran out; the previous "
                         f"checkpoint stays whole")


def write_checkpoint(session: Session, engine, state_dir: str, abandon: threading.Event | None = None) -> Written:
    """Writes and commits the checkpoint of the session's current step, then prunes older ones. A
    failure (disk full, EIO, an unusable state directory) removes what it wrote and leaves the committed
    checkpoints as they were; the data files' failures are refusals that name them, the directory's and
    the manifest's plain OSErrors (the store says what to do). `abandon`, once set, makes it give up at
    its next page (CheckpointAbandoned)."""
    abandon = abandon or threading.Event()
    start = time.perf_counter()
    directory = job_files.rank_directory(state_dir, session.job, session.rank, create=True)
    _settle_removal(directory)
    step = session.steps
    kept = _committed(session, directory, exclude=step)
    # A checkpoint of this same step (state loaded since) is replaced: the others stay to fall back to.
    prune_to(directory, kept)
    previous = session.durable if session.durable is not None and session.durable.step != step else None
    if previous is not None and previous.path not in {m.path for m in kept}:
        previous = None  # its files are gone (dropped by hand?): write every page
    regions = describe_regions(session)
    try:
        sums, places, nbytes = _write_pages(session, engine, directory, step, previous, abandon)
        if abandon.is_set():
            raise CheckpointAbandoned(session)
        param_sums = _write_params(session, job_files.data_path(directory, step, ".params"))
        small = _small_state_bytes(session)
        small_file = DirectFile.create(job_files.data_path(directory, step, ".small"), len(small))
        try:
            small_file.write_at(0, small, len(small))
        finally:
            small_file.finish()
        manifest = Manifest(session.job, session.rank, step, session.algorithm.name, session.master,
                            session.page_bytes, regions, sums, places, param_sums, checksum_of(small), len(small),
                            time.time(), owner=session.owner)
        write_manifest(directory, manifest)
    except BaseException:
        prune_to(directory, kept)
        raise
    session.changed_pages.clear()
    _remove_older(directory, _committed(session, directory)[: job_files.KEEP])
    nbytes += _param_offsets(session)[-1] + len(small)
    return Written(manifest, nbytes, time.perf_counter() - start)


def _committed(session: Session, directory: str, exclude: int | None = None) -> list[Manifest]:
    """The rank's committed checkpoints, newest first, as far as their manifests read back (their data
    files are checked when they are read: a damaged one is left out, to be pruned)."""
    return committed_manifests(directory, f"job {session.job!r} rank {session.rank}", files=False, exclude=exclude)


def _remove_older(directory: str, kept: list[Manifest]) -> None:
    """Removes the committed checkpoints not `kept`: small ones at once, large ones' manifests now and
    their data files on the background thread (Note [removing old checkpoints])."""
    steps = {m.step for m in kept}
    old = [step for step in job_files.committed_steps(directory) if step not in steps]
    if _data_bytes(directory, old) < BACKGROUND_BYTES:
        prune_to(directory, kept)
        return
    for step in old:
        os.unlink(job_files.data_path(directory, step, ".manifest"))
    _removing[directory] = _remover.submit(_prune_quietly, directory, kept)


def _data_bytes(directory: str, steps: list[int]) -> int:
    total = 0
    for step in steps:
        for suffix in job_files.DATA_SUFFIXES:
            try:
                total += os.stat(job_files.data_path(directory, step, suffix)).st_size
            except FileNotFoundError:
                pass
    return total


def _prune_quietly(directory: str, kept: list[Manifest]) -> None:
    try:
        prune_to(directory, kept)
    except OSError as exc:  # the job was dropped meanwhile: its directory went with everything in it
        log.debug("removing old checkpoint files in %s: %s", directory, exc)


def _settle_removal(directory: str) -> None:
    """Waits until the removal started by the directory's previous checkpoint is done."""
    pending = _removing.pop(directory, None)
    if pending is not None:
        pending.result()


def _write_pages(session: Session, engine, directory: str, step: int, previous: Manifest | None,
                 abandon: threading.Event) -> tuple[list[int], list[list[int]], int]:
    """Puts the pages that changed since `previous` into `<step>.pages` (Note [checkpoint order]);
    returns every page's checksum and [step, offset], and the bytes written."""
    sums, places, changed = _carried_over(session, previous)
    if engine.can_freeze(session):
        try:
            return _freeze_pages(session, engine, directory, step, sums, places, changed, abandon)
        except OSError as exc:  # a full disk is DiskSpaceError, no OSError: it fails the checkpoint
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            _warn_copying(directory, exc)
    return _copy_pages(session, engine, directory, step, sums, places, changed, abandon)


def _carried_over(session: Session, previous: Manifest | None) -> tuple[list[int], list[list[int]], list[int]]:
    """Every page's checksum and place as far as `previous` still holds it, and the pages it does not
    (changed since, or new), in order."""
    count = len(session.table)
    sums, places = [0] * count, [[0, 0]] * count
    if previous is None:
        return sums, places, list(range(count))
    changed = []
    for page in range(count):
        if page not in session.changed_pages and page < len(previous.page_places):
            sums[page], places[page] = previous.page_checksums[page], previous.page_places[page]
        else:
            changed.append(page)
    return sums, places, changed


def _copy_pages(session: Session, engine, directory: str, step: int, sums: list[int], places: list[list[int]],
                changed: list[int], abandon: threading.Event) -> tuple[list[int], list[list[int]], int]:
    """A resident session's way: the changed pages, one after the other, into a new `<step>.pages`,
    each checksummed on a second thread while the first writes it."""
    slot = align_up(session.page_bytes)
    offset = {page: i * slot for i, page in enumerate(changed)}
    out = DirectFile.create(job_files.data_path(directory, step, ".pages"), len(changed) * slot)
    try:
        def write(bound) -> None:
            if abandon.is_set():
                raise CheckpointAbandoned(session)
            data = bound.buffer[: session.page_bytes]
            hashing = _hasher.submit(checksum_of, data.numpy())
            out.write_at(offset[bound.page], data, session.page_bytes)
            sums[bound.page], places[bound.page] = hashing.result(), [step, offset[bound.page]]

        engine.read_all_pages(session, write, changed)
    except BaseException:
        out.close()
        raise
    out.finish()
    return sums, places, len(changed) * slot


def _freeze_pages(session: Session, engine, directory: str, step: int, sums: list[int], places: list[list[int]],
                  changed: list[int], abandon: threading.Event) -> tuple[list[int], list[list[int]], int]:
    """A paged session's way (Note [frozen state files] in stated.paging.state_file): the changed pages
    its state file does not hold as they are (resident pages changed since they were last written,
    mostly) are written to it, and it is frozen as `<step>.pages`. Spilled pages are not read at all."""
    def check() -> None:
        if abandon.is_set():
            raise CheckpointAbandoned(session)

    placed, written = engine.freeze_pages(session, changed, job_files.data_path(directory, step, ".pages"), check)
    for page, (checksum, offset) in placed.items():
        sums[page], places[page] = checksum, [step, offset]
    return sums, places, written * align_up(session.page_bytes)


# A state file cannot be linked into the checkpoint directory: another file system (a mount or a
# symlink under --state-dir), or one without hard links. Its checkpoints copy the pages instead.
_NO_LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP)
_warned_copying: set[str] = set()


def _warn_copying(directory: str, exc: OSError) -> None:
    root = os.path.dirname(os.path.dirname(directory))
    if root not in _warned_copying:
        _warned_copying.add(root)
        log.warning("the state files cannot be linked into %s (%s): paged checkpoints there copy every "
                    "changed page, spilled ones read back from disk, instead of freezing the state file",
                    root, exc.strerror or exc)


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


def _param_offsets(session: Session) -> list[int]:
    return param_offsets([region.arena_bytes for region in session.regions])


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
    step = manifest.step
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

    files = {file_step: DirectFile.open(job_files.data_path(directory, file_step, ".pages"))
             for file_step in sorted(manifest.page_files)}
    try:
        def read(bound) -> None:
            file_step, offset = manifest.page_places[bound.page]
            data, source = bound.buffer[: manifest.page_bytes], files[file_step]
            source.read_at(offset, data, manifest.page_bytes)
            if checksum_of(data.numpy()) != manifest.page_checksums[bound.page]:
                raise DataLoss(f"page {bound.page} in checkpoint file {source.path} is damaged: its checksum "
                               f"does not match the manifest")

        engine.visit_pages(session, range(len(session.table)), read, dirty=True)
    finally:
        for source in files.values():
            source.close()
    session.small[:] = small
    session.bindings.clear()  # bound segments carry the small-state dicts just replaced
    session.master_pending.clear()
    session.changed_pages.clear()  # every page is as the checkpoint has it
    session.steps = step
