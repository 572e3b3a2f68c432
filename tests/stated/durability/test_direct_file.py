"""Checkpoint data files with O_DIRECT: aligned and unaligned buffers, a cut-short file, a full disk."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from stated.durability.direct_file import CHUNK, DirectFile
from stated.errors import DataLoss
from stated.paging.state_file import allocate_aligned
from stated.paging.state_file_space import DiskSpaceError


@pytest.mark.parametrize("nbytes", [1, 4096, 5000, CHUNK + 12345])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_bytes_written_read_back_equal(tmp_path, nbytes, aligned):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes + 1, dtype=np.uint8)
    if aligned:
        buffer = np.frombuffer(allocate_aligned(nbytes), dtype=np.uint8)[:nbytes]
        buffer[:] = data[:nbytes]
    else:
        buffer = data[1:]  # one byte off any alignment
    path = str(tmp_path / "f")
    out = DirectFile.create(path, 8192 + nbytes)
    out.write_at(8192, torch.from_numpy(buffer.copy()) if aligned else buffer, nbytes)
    out.finish()
    back = bytearray(nbytes)
    reader = DirectFile.open(path)
    reader.read_at(8192, back, nbytes)
    reader.close()
    assert bytes(back) == buffer[:nbytes].tobytes()


def test_a_file_cut_short_is_data_loss_naming_it(tmp_path):
    path = str(tmp_path / "f")
    out = DirectFile.create(path, 8192)
    out.write_at(0, bytes(8192), 8192)
    out.finish()
    os.truncate(path, 4096)
    reader = DirectFile.open(path)
    with pytest.raises(DataLoss, match="cut short"):
        reader.read_at(0, bytearray(8192), 8192)
    reader.close()


def test_a_file_that_does_not_fit_is_refused_at_create_naming_path_and_bytes(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(DiskSpaceError, match=str(mount / "big")):
            DirectFile.create(str(mount / "big"), 4 << 20)
        assert os.listdir(mount) == [], "a refused file leaves nothing behind"
    finally:
        subprocess.run(["umount", str(mount)], check=True)
