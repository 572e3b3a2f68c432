"""Checkpoint data files (stated.durability.direct_file): what goes in comes back, byte for byte, for buffers
moved in several pieces at once (Note [transfers in flight]) and for those that go through the bounce buffer.
Real files on tmp_path (ext4 here, where O_DIRECT works)."""

from __future__ import annotations

import os

import pytest
import torch

from stated.durability.direct_file import CHUNK, IN_FLIGHT, DirectFile
from stated.paging.state_file import allocate_aligned


def aligned(nbytes: int) -> torch.Tensor:
    return torch.frombuffer(allocate_aligned(nbytes), dtype=torch.uint8)[:nbytes]


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# Sizes: one piece; more pieces than IN_FLIGHT moving at once; several pieces and an unaligned tail that is bounced.
SIZES = [4096, (IN_FLIGHT + 2) * CHUNK, 2 * CHUNK + 4096 * 5 + 123]


@pytest.mark.parametrize("nbytes", SIZES)
def test_a_buffer_comes_back_whole_and_its_padding_is_zero(tmp_path, nbytes):
    source = aligned(nbytes)
    source.copy_(pattern(nbytes, nbytes))
    path = str(tmp_path / "x.pages")
    out = DirectFile.create(path, nbytes)
    assert out.direct
    out.write_at(0, source, nbytes)
    out.finish()
    padded = -(-nbytes // 4096) * 4096
    assert os.path.getsize(path) == padded
    with open(path, "rb") as raw:
        assert raw.read()[nbytes:] == bytes(padded - nbytes)
    back = aligned(nbytes)
    f = DirectFile.open(path)
    f.read_at(0, back, nbytes)
    f.close()
    assert torch.equal(back, source)


def test_unaligned_buffers_and_several_offsets(tmp_path):
    # Three buffers at 4096-aligned offsets, one of them starting one byte into its memory.
    nbytes = CHUNK + 777
    backing = aligned(nbytes + 4096)
    unaligned = backing[1: 1 + nbytes]
    unaligned.copy_(pattern(nbytes, 1))
    first = aligned(2 * CHUNK)
    first.copy_(pattern(2 * CHUNK, 2))
    last = bytes(pattern(5000, 3).numpy())  # read-only bytes
    offsets = [0, 2 * CHUNK, 2 * CHUNK + -(-nbytes // 4096) * 4096]
    path = str(tmp_path / "y.params")
    out = DirectFile.create(path, offsets[-1] + 8192)
    out.write_at(offsets[0], first, first.numel())
    out.write_at(offsets[1], unaligned, nbytes)
    out.write_at(offsets[2], last, len(last))
    out.finish()
    f = DirectFile.open(path)
    into = backing[7: 7 + nbytes]
    f.read_at(offsets[1], into, nbytes)
    assert torch.equal(into, pattern(nbytes, 1))
    again = aligned(2 * CHUNK)
    f.read_at(offsets[0], again, again.numel())
    assert torch.equal(again, pattern(2 * CHUNK, 2))
    tail = bytearray(5000)
    f.read_at(offsets[2], tail, 5000)
    assert bytes(tail) == last
    f.close()

