"""Drives an `Algorithm` the way the engine does (Note [step order] in stated_kernels.spec), over a
list of tensors cut into pages by a chosen layout, with each segment's fields cut from a page buffer.

A layout is a list of pages; a page is a list of (tensor index, start, length) pieces. `whole`,
`split` and `interleaved` build the three kinds the tests compare: one page per tensor, tensors cut
at block-aligned points, and pages that mix pieces of several tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from stated_kernels.spec import Algorithm, Hyperparameters, Segment, TensorInfo

Piece = tuple[int, int, int]
Layout = list[list[Piece]]
ALIGN = 64


def whole(shapes: Sequence[tuple[int, ...]]) -> Layout:
    return [[(i, 0, math.prod(s))] for i, s in enumerate(shapes)]


def _cuts(numel: int, block: int, parts: int) -> list[int]:
    """Up to `parts - 1` block-aligned cut points inside (0, numel), unevenly spaced."""
    blocks = -(-numel // block)
    points = {block * max(1, (blocks * k * k) // (parts * parts)) for k in range(1, parts)}
    return sorted(p for p in points if 0 < p < numel)


def _pieces(numel: int, cuts: list[int], index: int) -> list[Piece]:
    edges = [0, *cuts, numel]
    return [(index, a, b - a) for a, b in zip(edges, edges[1:])]


def split(shapes: Sequence[tuple[int, ...]], block: int, parts: int = 4) -> Layout:
    """Each tensor cut into up to `parts` segments of uneven sizes, each its own page."""
    return [[piece] for i, s in enumerate(shapes)
            for piece in _pieces(math.prod(s), _cuts(math.prod(s), block, parts), i)]


def interleaved(shapes: Sequence[tuple[int, ...]], block: int) -> Layout:
    """Every tensor cut in two; each page holds the tail of one tensor and the head of the next, the
    way consecutive tensors share a page in the engine."""
    halves = [_pieces(math.prod(s), _cuts(math.prod(s), block, 2), i) for i, s in enumerate(shapes)]
    flat = [p for pieces in halves for p in pieces]
    return [flat[:1]] + [flat[k:k + 2] for k in range(1, len(flat), 2)]


def fine(shapes: Sequence[tuple[int, ...]], block: int) -> Layout:
    """Segments of 7 blocks, shorter than most rows, each its own page."""
    size = 7 * block
    return [[(i, start, min(size, math.prod(s) - start))] for i, s in enumerate(shapes)
            for start in range(0, math.prod(s), size)]


def one_page(shapes: Sequence[tuple[int, ...]]) -> Layout:
    """Every tensor whole, all in a single page."""
    return [[(i, 0, math.prod(s)) for i, s in enumerate(shapes)]]


def layouts(shapes: Sequence[tuple[int, ...]], block: int) -> dict[str, Layout]:
    """The layouts every segmentation test runs, by name."""
    return {"whole": whole(shapes), "split": split(shapes, block), "interleaved": interleaved(shapes, block),
            "fine": fine(shapes, block), "one_page": one_page(shapes)}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Driver:
    """Tensors, their state and one step at a time, as the engine would run them.

    `params` are float tensors (cloned); `groups` the hyperparameters of each group (defaults are
    filled in); `group_of` gives each tensor's group (all 0 if omitted).
    """

    def __init__(self, algorithm: Algorithm, params: Sequence[torch.Tensor], groups: Sequence[Hyperparameters],
                 layout: Layout, names: Sequence[str] | None = None, group_of: Sequence[int] | None = None):
        self.algorithm = algorithm
        self.params = [p.detach().clone() for p in params]
        self.grads = [torch.zeros_like(p) for p in self.params]
        group_of = list(group_of) if group_of is not None else [0] * len(params)
        names = list(names) if names is not None else [f"t{i}" for i in range(len(params))]
        self.groups = []
        for k, hp in enumerate(groups):
            problem = algorithm.validate(dict(hp), where=f"groups[{k}].")
            assert problem is None, problem
            self.groups.append({**algorithm.defaults(), **hp})
        self.infos = [TensorInfo(i, tuple(p.shape), p.dtype, group_of[i], names[i]) for i, p in enumerate(params)]
        self.fields = [algorithm.page_fields(t, self.groups[t.group]) for t in self.infos]
        self.small = [algorithm.init_small_state(t, self.groups[t.group]) for t in self.infos]
        covered = sorted((start, length, i) for page in layout for i, start, length in page)
        for t in self.infos:
            mine = [(s, n) for s, n, i in covered if i == t.index]
            ends = [0] + [s + n for s, n in mine]
            assert [s for s, _ in mine] == ends[:-1] and ends[-1] == t.numel, f"layout does not tile tensor {t.index}"
            assert all(s % algorithm.block_elements == 0 for s, _ in mine), "segments must start on blocks"
        self.pages: list[list[Segment]] = []
        for page in layout:
            size = sum(_align(f.nbytes(length)) for i, _, length in page for f in self.fields[i])
            # Fresh pages hold garbage until init_fields runs, as recycled slots do in the engine.
            buffer = torch.full((max(size, 1),), 0xA5, dtype=torch.uint8)
            offset, segments = 0, []
            for i, start, length in page:
                views = {}
                for f in self.fields[i]:
                    views[f.name] = buffer[offset: offset + f.nbytes(length)].view(f.dtype)
                    offset += _align(f.nbytes(length))
                seg = Segment(self.infos[i], start, self.params[i].view(-1)[start: start + length],
                              self.grads[i].view(-1)[start: start + length], views, self.small[i])
                algorithm.init_fields(seg)
                segments.append(seg)
            self.pages.append(segments)

    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        """One step; a None gradient skips that tensor, as torch skips a parameter without .grad."""
        algorithm = self.algorithm
        active = [i for i, g in enumerate(grads) if g is not None]
        for i in active:
            self.grads[i].copy_(grads[i])
            hp = self.groups[self.infos[i].group]
            algorithm.begin_step(self.infos[i], self.small[i], hp)
            algorithm.prepass(self.infos[i], self.params[i], self.grads[i], self.small[i], hp)
        for pass_index in range(algorithm.passes):
            for page in self.pages:
                by_group: dict[int, list[Segment]] = {}
                for seg in page:
                    if grads[seg.tensor.index] is not None:
                        by_group.setdefault(seg.tensor.group, []).append(seg)
                for group, segments in by_group.items():
                    algorithm.update(segments, self.groups[group], pass_index)
            if pass_index + 1 < algorithm.passes:
                for i in active:
                    algorithm.between_passes(self.infos[i], self.small[i], self.groups[self.infos[i].group],
                                             pass_index)

    def _segments(self, index: int) -> list[Segment]:
        return [s for page in self.pages for s in page if s.tensor.index == index]

    def export(self, index: int) -> dict[str, torch.Tensor] | None:
        """The tensor's state_dict entry, gathered from its pages as the store does."""
        t = self.infos[index]
        if not self.algorithm.has_state(self.small[index]):
            return None
        flat = {f.name: torch.empty(f.count(t.numel), dtype=f.dtype) for f in self.fields[index]}
        for seg in self._segments(index):
            for f in self.fields[index]:
                begin = seg.start // f.per
                flat[f.name][begin: begin + seg.fields[f.name].numel()].copy_(seg.fields[f.name])
        return self.algorithm.export_state(t, self.small[index], flat)

    def load(self, index: int, entry: dict[str, torch.Tensor]) -> None:
        """Loads a state_dict entry into the tensor's resident state and pages."""
        flat = self.algorithm.import_state(self.infos[index], self.small[index], entry, self.fields[index])
        for seg in self._segments(index):
            for f in self.fields[index]:
                begin = seg.start // f.per
                seg.fields[f.name].copy_(flat[f.name][begin: begin + seg.fields[f.name].numel()])

    def state_bytes(self, index: int, scratch: bool = False) -> int:
        """Paged bytes plus the resident tensors of one tensor's small state; keys that start with
        "_" are per-step scratch and count only with `scratch`."""
        t = self.infos[index]
        paged = sum(f.nbytes(t.numel) for f in self.fields[index])
        resident = sum(v.numel() * v.element_size() for k, v in self.small[index].items()
                       if isinstance(v, torch.Tensor) and (scratch or not k.startswith("_")))
        return paged + resident


def gradient(shape: tuple[int, ...], step: int, index: int, scale: float = 1.0) -> torch.Tensor:
    """A deterministic pseudo-random gradient for (step, tensor), with a slowly drifting mean so that
    moments do not average out to zero."""
    gen = torch.Generator().manual_seed(1_000_003 * step + 7919 * index + 17)
    noise = torch.randn(shape, generator=gen)
    drift = torch.linspace(-1.0, 1.0, max(1, math.prod(shape))).view(shape) * math.sin(0.05 * step + index)
    return (noise + 0.5 * drift) * scale


def initial_params(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def skips(step: int, index: int) -> bool:
    """Whether tensor `index` has no gradient at `step` (each tensor skips every 11th step)."""
    return (step + index) % 11 == 0


def gradients(shapes: Sequence[tuple[int, ...]], step: int) -> list[torch.Tensor | None]:
    return [None if skips(step, i) else gradient(s, step, i) for i, s in enumerate(shapes)]


def run(algorithm: Algorithm, params: Sequence[torch.Tensor], groups: Sequence[Hyperparameters], layout: Layout,
        steps: int, **kwargs) -> Driver:
    """A driver after `steps` steps of `gradients`; kwargs go to Driver (names, group_of)."""
    driver = Driver(algorithm, params, groups, layout, **kwargs)
    shapes = [tuple(p.shape) for p in params]
    for step in range(1, steps + 1):
        driver.step(gradients(shapes, step))
    return driver


def assert_segmentation_invariant(algorithm: Algorithm, shapes: Sequence[tuple[int, ...]],
                                  groups: Sequence[Hyperparameters], steps: int = 12, **kwargs) -> None:
    """Every layout of `layouts` gives bit-identical parameters and state after `steps` steps."""
    params = initial_params(shapes, seed=3)
    results = {}
    for name, layout in layouts(shapes, algorithm.block_elements).items():
        driver = run(algorithm, params, groups, layout, steps, **kwargs)
        results[name] = (driver.params, [driver.export(i) for i in range(len(shapes))])
    base_params, base_states = results.pop("whole")
    for name, (params_now, states) in results.items():
        for i, (p, q) in enumerate(zip(base_params, params_now)):
            assert torch.equal(p, q), f"layout {name!r}: tensor {i} {tuple(p.shape)} differs from whole pages"
        for i, (a, b) in enumerate(zip(base_states, states)):
            assert a.keys() == b.keys(), f"layout {name!r}: tensor {i} state keys differ"
            for key in a:
                assert torch.equal(a[key], b[key]), f"layout {name!r}: tensor {i} state {key!r} differs"
