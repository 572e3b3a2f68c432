"""Arena placement and page cutting (stated/layout.py)."""

from __future__ import annotations

import pytest
import torch

from stated.layout import ALIGN, cut_pages, place_tensors
from stated_kernels.spec import FieldSpec, TensorInfo

ADAM = (FieldSpec("exp_avg", torch.float32), FieldSpec("exp_avg_sq", torch.float32))
EIGHT_BIT = (FieldSpec("m", torch.uint8), FieldSpec("v", torch.uint8), FieldSpec("am", torch.float32, per=256),
             FieldSpec("av", torch.float32, per=256))


def infos(*sizes):
    return [TensorInfo(i, (n,), torch.float32, 0) for i, n in enumerate(sizes)]


def test_tensors_are_placed_aligned_back_to_back():
    offsets, total = place_tensors(infos(3, 100, 1), 4)
    assert offsets == [0, 64, 64 + 448]
    assert total == 64 + 448 + 64
    assert all(o % ALIGN == 0 for o in offsets)


@pytest.mark.parametrize("page_bytes", [4096, 65536, 1 << 20])
def test_pages_cover_every_element_once_and_respect_the_budget(page_bytes):
    tensors = [(t, ADAM) for t in infos(1000, 50_000, 7, 300_000)]
    pages = cut_pages(tensors, page_bytes, 1, 0, 0)
    covered = {t.index: [] for t, _ in tensors}
    for i, page in enumerate(pages):
        assert page.index == i
        assert page.nbytes <= page_bytes
        for seg in page.segments:
            covered[seg.tensor].append((seg.start, seg.start + seg.length))
            for place in seg.fields:
                assert place.offset % ALIGN == 0
                assert place.offset + place.field.nbytes(seg.length) <= page.nbytes
    for t, _ in tensors:
        spans = sorted(covered[t.index])
        assert spans[0][0] == 0 and spans[-1][1] == t.numel
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_fields_of_a_page_do_not_overlap():
    pages = cut_pages([(t, ADAM) for t in infos(10, 20, 30)], 4096, 1, 0, 0)
    spans = sorted((p.offset, p.offset + p.field.nbytes(s.length)) for s in pages[0].segments for p in s.fields)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_eight_bit_segments_start_on_block_boundaries():
    pages = cut_pages([(t, EIGHT_BIT) for t in infos(5000, 70_000)], 16384, 256, 0, 0)
    for page in pages:
        for seg in page.segments:
            assert seg.start % 256 == 0
    assert sum(p.nbytes for p in pages) <= (75_000 * 2 + 4 * 2 * (75_000 // 256 + 2)) + 64 * 4 * 2 * len(pages)


def test_page_too_small_for_one_block_is_refused():
    with pytest.raises(ValueError, match="cannot hold one 256-element block"):
        cut_pages([(t, EIGHT_BIT) for t in infos(5000)], 256, 256, 0, 0)


def test_stateless_tensors_still_get_pages():
    pages = cut_pages([(t, ()) for t in infos(10_000)], 4096, 1, 0, 0)
    assert sum(s.length for p in pages for s in p.segments) == 10_000
    assert all(p.nbytes == 0 for p in pages)


def test_extent_covers_every_field_even_after_stateless_segments():
    """A copy of `extent` bytes moves every field (the CUDA backend copies that much): a stateless
    tensor (an Adafactor matrix) ahead of a stateful one pushes the fields past `nbytes`."""
    tensors = [(infos(300, 200)[0], ()), (infos(300, 200)[1], ADAM)]
    pages = cut_pages(tensors, 1 << 16, 1, 0, 0)
    ends = [max((f.offset + f.count * f.field.dtype.itemsize for s in p.segments for f in s.fields), default=0)
            for p in pages]
    assert [p.extent for p in pages] == ends
    assert all(p.extent <= 1 << 16 for p in pages)
    assert any(p.extent > p.nbytes for p in pages), "the case must put a field past nbytes"
