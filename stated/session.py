"""One attached trainer process (job, rank): its tensors, arenas, per-tensor state and pages.

A session owns the arenas it created for its tensors: one param and one grad arena per Register call, a
"region", each an anonymous memory file whose descriptor only the session's own trainer is sent
(stated.arena_memory); a region on a CUDA device has no arenas here, for the client shares its device
buffers with the session's CUDA backend. It also owns the resident per-tensor state of the algorithm, and its page table. The
pager decides where pages live and moves them; the engine runs steps over them, binding each page it
gets from the pager to that buffer for the backend.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from stated import arena_memory, layout
from stated.errors import InvalidArgument
from stated.inconsistency import Inconsistency
from stated.layout import Page, TensorPlace
from stated.paging.page_table import PageEntry, PageTable
from stated.paging.pager import Pager
from stated_kernels.spec import Algorithm, FieldSpec, Hyperparameters, Segment, TensorInfo

# Note [master weights]: with master_weights, the arenas hold bf16/fp16 parameters and gradients while
# every page also holds an fp32 copy of its parameters (this field). The algorithm sees only fp32: its
# segments' `param` is the master copy and the backend hands it fp32 gradients; after each update the
# backend writes the rounded parameters back into the arena. The master copy is taken from the arena when
# a page is first touched, and travels in state_dict as "master_param".
MASTER = FieldSpec("master", torch.float32)
MASTER_KEY = "master_param"

log = logging.getLogger("stated.session")


@dataclasses.dataclass
class Region:
    params: arena_memory.Segment | None  # None on a CUDA device
    grads: arena_memory.Segment | None
    tensors: range
    pages: range
    device: str = ""  # "" for host memory (arenas), else the CUDA device's UUID
    arena_bytes: int = 0  # bytes of each of the region's param and grad buffers


@dataclasses.dataclass
class Binding:
    """A page's segments bound to one buffer, grouped by param group for the kernel calls: what the
    engine hands a backend for each page it got from the pager."""

    page: int
    buffer: torch.Tensor
    buffer_ptr: int
    segments: list[Segment]
    by_group: dict[int, list[Segment]]
    # The CPU backend's pieces of each group (stated.backends.cpu_workers), cut at first use.
    pieces: dict[int, list[list[Segment]]] = dataclasses.field(default_factory=dict)


class Session:
    pager: Pager  # set by the store at Attach, before any other use (stated.paging.daemon_paging)

    def __init__(self, session_id: str, token: bytes, job: str, rank: int, pid: int,
                 algorithm: Algorithm, page_bytes: int, master_weights: bool = False):
        self.id = session_id
        self.token = token
        self.job = job
        self.rank = rank
        self.pid = pid
        self.algorithm = algorithm
        self.master = master_weights
        self.page_bytes = page_bytes
        self.created = time.time()
        self.groups: list[Hyperparameters] = []
        self.tensors: list[TensorPlace] = []
        self.regions: list[Region] = []
        self.small: list[dict[str, Any]] = []
        self._step_counts = torch.zeros(0)  # see step_counters
        self._step_views: list[torch.Tensor] = []
        self.param_views: list[torch.Tensor] = []
        self.grad_views: list[torch.Tensor] = []
        self.table = PageTable()
        self.bindings: dict[int, Binding] = {}
        # One tensor per group, to check that a step's hyperparameters keep the group's state layout.
        self.group_sample: dict[int, TensorPlace] = {}
        # For state_dict: the pages (and segment positions in them) that hold each tensor.
        self.tensor_pages: dict[int, list[tuple[int, int]]] = {}
        self.steps = 0
        # Set when a step or an import failed half-way (Note [half-applied steps] in stated.inconsistency).
        self.inconsistent: Inconsistency | None = None
        self._state_bytes = (-1, 0)
        self.step_seconds = 0.0
        self.stall_seconds = 0.0
        self.dtype: torch.dtype | None = None
        self.closed = False
        self.owner: int | None = None  # the uid that owns the job (Note [job owners] in stated.job_owners)
        # Pages (of CUDA regions) whose master field the backend must still fill from the parameters, and
        # for which of the page's tensors (a load_state_dict that brings a tensor's master takes it out).
        self.master_pending: dict[int, set[int]] = {}
        # The backend that runs this session's steps (set by the store: CPU, or CUDA once it registers
        # CUDA tensors).
        self.backend = None
        # Durability (stated.durability): the newest committed checkpoint, whether the state changed
        # since, and how many regions a resuming trainer has still to register again.
        self.durable = None
        self.changed_since_durable = True
        self.changed_pages: set[int] = set()  # pages whose state changed since the last checkpoint
        self.resume_left = 0

    # --- registration -----------------------------------------------------------------------

    @property
    def on_device(self) -> bool:
        """Whether the session's parameters live on a CUDA device (its buffers are the client's)."""
        return any(region.device for region in self.regions)

    @property
    def parameters(self) -> int:
        return sum(t.info.numel for t in self.tensors)

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state: every paged field at its exact size, plus resident per-tensor
        vectors (factored statistics). Scalars (step counts, running sums) are bookkeeping, and page
        alignment padding is not state; `page_bytes_held` counts that. Cached: it changes only when
        tensors are added or removed (gauges read it after every step)."""
        key = len(self.tensors)
        if self._state_bytes[0] != key:
            self._state_bytes = (key, self._count_state_bytes())
        return self._state_bytes[1]

    def _count_state_bytes(self) -> int:
        total = 0
        for place, small in zip(self.tensors, self.small):
            total += sum(f.nbytes(place.info.numel) for f in place.fields)
            total += sum(v.numel() * v.element_size() for v in small.values()
                         if isinstance(v, torch.Tensor) and v.numel() > 1)
        return total

    @property
    def page_bytes_held(self) -> int:
        return self.table.state_bytes()

    def add_region(self, groups: list[Hyperparameters], infos: list[TensorInfo],
                   device: str = "") -> tuple[Region, list[Page]]:
        """Creates the arenas and pages for new tensors. `infos` carry session-wide indices and
        session-wide group numbers; `groups` are the new groups, already validated. With a CUDA
        `device` no arenas are created: the parameters stay in the client's device buffers."""
        element_size = infos[0].dtype.itemsize
        offsets, arena_bytes = layout.place_tensors(infos, element_size)
        all_groups = self.groups + groups
        placed = []
        for info, offset in zip(infos, offsets):
            if self.master:  # the algorithm works on the fp32 master copy (Note [master weights])
                info = dataclasses.replace(info, dtype=torch.float32)
            fields = self.algorithm.page_fields(info, all_groups[info.group]) + ((MASTER,) if self.master else ())
            placed.append(TensorPlace(info, len(self.regions), offset, fields))
        pages = layout.cut_pages([(p.info, p.fields) for p in placed], self.page_bytes,
                                 self.algorithm.block_elements, len(self.regions), len(self.table))
        params = grads = None
        if not device:
            params, grads = arena_memory.create_pair(arena_bytes)
        region = Region(params, grads, range(len(self.tensors), len(self.tensors) + len(infos)),
                        range(len(self.table), len(self.table) + len(pages)), device, arena_bytes)
        self.groups.extend(groups)
        self.regions.append(region)
        for place, arena_info in zip(placed, infos):
            nbytes = place.info.numel * element_size
            span = slice(place.offset_bytes, place.offset_bytes + nbytes)
            if device:  # shapes without memory: any use on the host fails loudly
                self.param_views.append(torch.empty(place.info.numel, dtype=arena_info.dtype, device="meta"))
                self.grad_views.append(torch.empty(place.info.numel, dtype=arena_info.dtype, device="meta"))
            else:
                self.param_views.append(params.tensor[span].view(arena_info.dtype))
                self.grad_views.append(grads.tensor[span].view(arena_info.dtype))
            self.small.append(self.algorithm.init_small_state(place.info, all_groups[place.info.group]))
            self.tensors.append(place)
            self.group_sample.setdefault(place.info.group, place)
        self.table.extend(pages)
        self.changed_pages.update(p.index for p in pages)
        for page in pages:
            for position, seg in enumerate(page.segments):
                self.tensor_pages.setdefault(seg.tensor, []).append((page.index, position))
        self.dtype = infos[0].dtype
        return region, pages

    def host_region(self, index: int) -> Region:
        """Region `index`, whose arenas a trainer asks for (stated.server.step_channel)."""
        if not 0 <= index < len(self.regions):
            raise InvalidArgument(f"region is {index} but the session has {len(self.regions)} regions")
        region = self.regions[index]
        if region.params is None:
            raise InvalidArgument(f"region {index} lives on CUDA device {region.device}: its buffers are the "
                                  f"trainer's, it has no arenas to send")
        return region

    def drop_last_region(self) -> None:
        """Undoes the last add_region (its pages could not be given room on disk)."""
        region = self.regions.pop()
        for index in region.tensors:
            self.tensor_pages.pop(index, None)
        for group, place in list(self.group_sample.items()):
            if place.info.index in region.tensors:
                del self.group_sample[group]
        groups = {self.tensors[i].info.group for i in region.tensors}
        del self.tensors[region.tensors.start:], self.small[region.tensors.start:]
        del self.param_views[region.tensors.start:], self.grad_views[region.tensors.start:]
        del self.table.entries[region.pages.start:]
        del self.groups[min(groups):]
        self._close_region(region)

    # --- binding pages to buffers -----------------------------------------------------------

    def bind(self, entry: PageEntry, buffer: torch.Tensor) -> Binding:
        """The page's segments with field views cut from `buffer` (cached while the buffer stays)."""
        ptr = buffer.data_ptr()
        cached = self.bindings.get(entry.page.index)
        if cached is not None and cached.buffer_ptr == ptr:
            return cached
        segments, by_group = [], {}
        for seg in entry.page.segments:
            place = self.tensors[seg.tensor]
            fields = {
                fp.field.name: buffer[fp.offset: fp.offset + fp.field.nbytes(seg.length)].view(fp.field.dtype)
                for fp in seg.fields
            }
            param = self.param_views[seg.tensor][seg.start: seg.start + seg.length]
            s = Segment(place.info, seg.start, fields["master"] if self.master else param,
                        self.grad_views[seg.tensor][seg.start: seg.start + seg.length], fields,
                        self.small[seg.tensor])
            segments.append(s)
            by_group.setdefault(place.info.group, []).append(s)
        binding = Binding(entry.page.index, buffer, ptr, segments, by_group)
        self.bindings[entry.page.index] = binding
        return binding

    def init_page(self, binding: Binding, page: int) -> None:
        """Fresh state for a page's segments; the master copy starts as the arena's parameters (for a
        CUDA region the backend copies them on the device, at the page's first use)."""
        on_device = bool(self.regions[self.table[page].page.region].device)
        if self.master and on_device:
            self.master_pending[page] = {segment.tensor.index for segment in binding.segments}
        for segment in binding.segments:
            self.algorithm.init_fields(segment)
            if self.master and not on_device:
                index = segment.tensor.index
                segment.param.copy_(self.param_views[index][segment.start: segment.start + segment.length])

    def step_counters(self) -> torch.Tensor:
        """Every tensor's step counter in one float32 tensor, which the small states' "step" entries are
        0-d views of, so that a step advances them all in one operation rather than one per tensor (some
        8 us each). Rebuilt, keeping the values, whenever a small state was added or replaced since."""
        views = self._step_views
        if len(views) != len(self.small) or any(small["step"] is not view for small, view in zip(self.small, views)):
            counts = torch.tensor([float(small["step"]) for small in self.small], dtype=torch.float32)
            views = [counts[i] for i in range(len(self.small))]
            for small, view in zip(self.small, views):
                small["step"] = view
            self._step_counts, self._step_views = counts, views
        return self._step_counts

    def restore_step_counters(self, saved: torch.Tensor) -> None:
        """Puts every step counter back to `saved` (a copy of step_counters() taken before a step that
        failed), also where an algorithm's begin_step replaced a small state's counter."""
        self.step_counters().copy_(saved)

    def arena_param(self, segment: Segment) -> torch.Tensor:
        return self.param_views[segment.tensor.index][segment.start: segment.start + segment.length]

    def forget_binding(self, page: int) -> None:
        self.bindings.pop(page, None)

    # --- validation of per-step input ---------------------------------------------------------

    def check_groups(self, groups: list[Hyperparameters]) -> list[Hyperparameters]:
        if len(groups) != len(self.groups):
            raise InvalidArgument(f"groups has {len(groups)} entries but the session has {len(self.groups)} "
                                  f"registered param groups")
        full = []
        for i, hp in enumerate(groups):
            problem = self.algorithm.validate(hp, where=f"groups[{i}].")
            if problem:
                raise InvalidArgument(problem)
            merged = {**self.algorithm.defaults(), **hp}
            sample = self.group_sample.get(i)
            if sample is not None:
                fields = self.algorithm.page_fields(sample.info, merged) + ((MASTER,) if self.master else ())
                if fields != sample.fields:
                    raise InvalidArgument(
                        f"groups[{i}]: these hyperparameters would change the state layout "
                        f"({', '.join(f.name for f in sample.fields) or 'no state'} -> "
                        f"{', '.join(f.name for f in fields) or 'no state'}); amsgrad and whether momentum "
                        f"is zero are fixed at registration"
                    )
            full.append(merged)
        return full

    def close(self) -> None:
        """Frees the arenas (a trainer's mapping keeps its memory until the trainer lets go of it)."""
        self.closed = True
        self.bindings.clear()
        self.param_views.clear()
        self.grad_views.clear()
        for region in self.regions:
            self._close_region(region)

    @staticmethod
    def _close_region(region: Region) -> None:
        if region.params is not None:
            region.params.close()
            region.grads.close()
