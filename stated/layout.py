"""Where every tensor lives in its arenas, and how a session's flat parameter space is cut into pages.

A region is what one Register call adds: a set of tensors laid out back to back in one param arena and
one grad arena (64-byte aligned, so fused kernels get aligned vectors). Its flat element space is cut
into pages holding at most `page_bytes` of optimizer state each; a page is cut into segments, one per
tensor in it (Note [segments and pages] in stated_kernels.spec). Inside a page every field of every
segment starts 64-byte aligned.

Pages are cut by state bytes, not by element count, because tensors of one session can have
different field sets (an 8-bit tensor holds 2 bytes of state per element, a small one 8).
"""

from __future__ import annotations

import dataclasses

from stated_kernels.spec import FieldSpec, TensorInfo

ALIGN = 64
# Elements per page for tensors that keep no elementwise state (SGD without momentum): they still
# go through the page pass, in pieces of this size.
STATELESS_BYTES_PER_ELEMENT = 4


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclasses.dataclass(frozen=True)
class FieldPlace:
    field: FieldSpec
    offset: int  # bytes from the page start
    count: int  # values of field.dtype


@dataclasses.dataclass(frozen=True)
class PageSegment:
    tensor: int  # session-wide tensor index
    start: int  # first element within the tensor
    length: int
    fields: tuple[FieldPlace, ...]


@dataclasses.dataclass(frozen=True)
class Page:
    index: int  # session-wide page number, also its slot in the job's state file
    region: int
    nbytes: int  # bytes of state it holds (what accounting counts)
    segments: tuple[PageSegment, ...]
    # Where its last field ends: what a copy of the page must move. Larger than nbytes when alignment
    # padding or stateless segments (which take room in the page but hold nothing) come before a field.
    extent: int = 0


@dataclasses.dataclass(frozen=True)
class TensorPlace:
    info: TensorInfo
    region: int
    offset_bytes: int  # in the region's arenas
    fields: tuple[FieldSpec, ...]


def place_tensors(tensors: list[TensorInfo], element_size: int) -> tuple[list[int], int]:
    """Byte offsets of each tensor in an arena, and the arena's size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = align_up(end + t.numel * element_size)
    return offsets, end


def segment_bytes(fields: tuple[FieldSpec, ...], length: int) -> int:
    return sum(align_up(f.nbytes(length)) for f in fields)


def cut_pages(
    tensors: list[tuple[TensorInfo, tuple[FieldSpec, ...]]],
    page_bytes: int,
    block_elements: int,
    region: int,
    first_page: int,
) -> list[Page]:
    """Cuts the tensors, in order, into pages of at most `page_bytes` of state each.

    A segment starts at a multiple of `block_elements` of its tensor, so a quantization block never
    straddles two pages.
    """
    pages: list[Page] = []
    current: list[PageSegment] = []
    used = 0

    def close_page() -> None:
        nonlocal current, used
        if current:
            # The state bytes the page really holds (stateless segments count nothing).
            nbytes = sum(segment_bytes(tuple(p.field for p in seg.fields), seg.length) for seg in current)
            extent = max((p.offset + p.count * p.field.dtype.itemsize for seg in current for p in seg.fields), default=0)
            pages.append(Page(first_page + len(pages), region, nbytes, tuple(current), extent))
        current, used = [], 0

    for info, fields in tensors:
        start, numel = 0, info.numel
        per_element = (sum(f.nbytes(block_elements) for f in fields) / block_elements) if fields else 0.0
        while start < numel:
            room = page_bytes - used
            if fields:
                fits = int((room - ALIGN * len(fields)) // per_element)
            else:
                fits = room // STATELESS_BYTES_PER_ELEMENT
            fits = min(fits, numel - start)
            if fits < numel - start:
                fits -= fits % block_elements
            # Aligned sizes can exceed the estimate by a little; back off one block at a time.
            while fits > 0 and used + segment_bytes(fields, fits) > page_bytes:
                fits -= block_elements if fits > block_elements else fits
            if fits <= 0:
                if not current:
                    raise ValueError(
                        f"page size {page_bytes} bytes cannot hold one {block_elements}-element block of "
                        f"tensor {info.index}"
                    )
                close_page()
                continue
            places, offset = [], used
            for f in fields:
                places.append(FieldPlace(f, offset, f.count(fits)))
                offset += align_up(f.nbytes(fits))
            current.append(PageSegment(info.index, start, fits, tuple(places)))
            used = offset if fields else used + fits * STATELESS_BYTES_PER_ELEMENT
            start += fits
            if used >= page_bytes - ALIGN:
                close_page()
    close_page()
    return pages
