"""A checkpoint's manifest: what it holds and how to check it, written atomically after its data.

Note [checkpoint order]
-----------------------
A checkpoint at step M of (job, rank) is four files in the rank's directory (stated.durability.job_files):
`M.pages` (pages, one 4096-aligned slot each), `M.params` (the param arenas), `M.small` (the per-tensor
small state and step counters) and `M.manifest`, which says for every page which step's `.pages` file
holds it and at which byte offset: a page unchanged since the previous checkpoint is not written again,
and the files it lives in are kept as long as a kept manifest names them. A resident session's `M.pages`
holds the pages that changed, one after the other; a paged session's is its state file frozen (Note
[frozen state files] in stated.paging.state_file, and stated.durability.checkpoint), whose spilled pages
were on disk already. The three data files are written and fsynced first (the frozen state file linked
into the directory); then the manifest goes to `M.manifest.tmp`, is fsynced, renamed to `M.manifest`,
and the directory is fsynced, which makes the link's name durable too. The rename is the commit: a
crash before it leaves the previous checkpoint the newest, with orphan data files that recovery removes;
a crash after it leaves the new one whole. The manifest carries a checksum of its own body, so a torn
or damaged manifest is told from a good one, and the checksum of every page and file, so torn data is
found when it is read. (A frozen state file's header is not covered: nothing reads it back.)
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
from typing import Any

import xxhash

from stated.durability.direct_file import storage_error as transfer_error
from stated.durability import job_files
from stated.paging.state_file_space import sync_directory
from stated.errors import DataLoss
from stated.paging.state_file import align_up

log = logging.getLogger("stated.durability.manifest")

FORMAT = 3
# Format 2 said a page's place in slots of its file, format 3 in bytes (a frozen state file has a header).
READABLE_FORMATS = (2, FORMAT)
SUFFIX = ".manifest"


@dataclasses.dataclass
class Manifest:
    job: str
    rank: int
    step: int
    algorithm: str
    master_weights: bool
    page_bytes: int
    # One entry per region: {"device", "arena_bytes", "groups": [hyperparameters], "tensors": [[shape,
    # dtype, group within the region, name]]}.
    regions: list[dict[str, Any]]
    page_checksums: list[int]
    # [step, offset] of every page: the `<step>.pages` file and the byte in it where the page starts.
    page_places: list[list[int]]
    params_checksums: list[int]  # one per region
    small_checksum: int
    small_bytes: int
    written: float
    path: str = ""
    owner: int | None = None  # the job's owner (Note [job owners] in stated.job_owners); None: nobody's

    @property
    def fingerprint(self) -> str:
        return layout_fingerprint(self.algorithm, self.master_weights, self.regions)

    @property
    def data_bytes(self) -> int:
        """Bytes on disk of what this checkpoint needs (pages in other steps' files included)."""
        return (len(self.page_checksums) * align_up(self.page_bytes)
                + sum(align_up(r["arena_bytes"]) for r in self.regions) + self.small_bytes)

    @property
    def page_files(self) -> set[int]:
        """The steps whose `.pages` files this checkpoint reads."""
        return {place[0] for place in self.page_places}

    def body(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("path")
        return {"format": FORMAT, **fields, "fingerprint": self.fingerprint}


def layout_fingerprint(algorithm: str, master: bool, regions: list[dict[str, Any]]) -> str:
    """A digest of what a trainer must register again to resume: algorithm, master weights, and every
    region's tensors (shapes, dtypes, groups, names) and device."""
    shape = [[r["device"], [t[:4] for t in r["tensors"]], len(r["groups"])] for r in regions]
    text = json.dumps([algorithm, master, shape], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _body_checksum(body: dict[str, Any]) -> int:
    return xxhash.xxh3_64_intdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Commits the checkpoint (Note [checkpoint order]); returns the manifest's path."""
    body = manifest.body()
    text = json.dumps({**body, "checksum": _body_checksum(body)}, sort_keys=True, indent=1)
    final = os.path.join(directory, f"{manifest.step}{SUFFIX}")
    temporary = final + ".tmp"
    data = text.encode()
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
        sync_directory(directory)
    except OSError as e:  # a full disk is RESOURCE_EXHAUSTED, EIO DATA_LOSS, each naming the file and bytes
        raise transfer_error(e, final, len(data), write=True) from e
    manifest.path = final
    return final


def _write_all(fd: int, data: bytes) -> None:
    """Writes every byte: a nearly full disk takes the first blocks and refuses the rest (a short write,
    then ENOSPC), and a manifest committed short is a torn one that the caller was told was durable."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def read_manifest(path: str) -> Manifest:
    """The manifest at `path`, checked whole; DataLoss names what is wrong with a torn or damaged one."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise DataLoss(f"checkpoint manifest {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
        raise DataLoss(f"checkpoint manifest {path} is not a format-{FORMAT} manifest")
    checksum = raw.pop("checksum", None)
    if checksum != _body_checksum(raw):
        raise DataLoss(f"checkpoint manifest {path} is damaged: its checksum does not match its contents")
    if raw.pop("format") == 2:
        try:
            slot = align_up(raw["page_bytes"])
            raw["page_places"] = [[step, index * slot] for step, index in raw["page_places"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataLoss(f"checkpoint manifest {path} has unreadable page places: {exc}") from None
    fingerprint = raw.pop("fingerprint")
    try:
        manifest = Manifest(**raw, path=path)
    except TypeError as exc:
        raise DataLoss(f"checkpoint manifest {path} is missing fields: {exc}") from None
    if manifest.fingerprint != fingerprint:
        raise DataLoss(f"checkpoint manifest {path} does not match its own layout fingerprint")
    return manifest


def param_offsets(arena_bytes: list[int]) -> list[int]:
    """Where each region's param arena (of `arena_bytes`) starts in the .params file, and its size last."""
    offsets = [0]
    for size in arena_bytes:
        offsets.append(offsets[-1] + align_up(size))
    return offsets


def expected_sizes(manifest: Manifest) -> dict[tuple[int, str], int]:
    """The bytes each data file (step, suffix) that the manifest's checkpoint reads must have at least."""
    slot = align_up(manifest.page_bytes)
    params = param_offsets([r["arena_bytes"] for r in manifest.regions])[-1]
    sizes = {(manifest.step, ".params"): params, (manifest.step, ".small"): manifest.small_bytes}
    for file_step, offset in manifest.page_places:
        key = (file_step, ".pages")
        sizes[key] = max(sizes.get(key, 0), offset + slot)
    return sizes


def check_files(manifest: Manifest, directory: str) -> None:
    """The data files exist and have the sizes the manifest says (a cut-short file is torn data)."""
    for (step, suffix), size in expected_sizes(manifest).items():
        path = job_files.data_path(directory, step, suffix)
        try:
            found = os.stat(path).st_size
        except FileNotFoundError:
            raise DataLoss(f"checkpoint file {path} is missing") from None
        if found < size:
            raise DataLoss(f"checkpoint file {path} is {found} bytes, expected {size}: it was cut short")


def committed_manifests(directory: str, whose: str, files: bool = True, exclude: int | None = None) -> list[Manifest]:
    """The manifests of the directory's committed checkpoints, newest first, each read whole and (with
    `files`) its data files checked; an unusable one is logged, naming `whose` checkpoint it is, and
    left out (for the caller to prune)."""
    manifests = []
    for step in job_files.committed_steps(directory):
        if step == exclude:
            continue
        try:
            manifest = read_manifest(job_files.data_path(directory, step, SUFFIX))
            if files:
                check_files(manifest, directory)
        except DataLoss as exc:
            log.error("checkpoint at step %d of %s is unusable, skipped: %s", step, whose, exc)
            continue
        manifests.append(manifest)
    return manifests


def prune_to(directory: str, kept: list[Manifest]) -> list[str]:
    """Removes every file of the directory but those the `kept` checkpoints read; returns them."""
    return job_files.prune(directory, keep={m.step for m in kept}, pages_of=set().union(*(m.page_files for m in kept)))
