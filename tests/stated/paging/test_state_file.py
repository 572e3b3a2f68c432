"""State files on real file systems: O_DIRECT round trips, checksums, full and unwritable directories.

/tmp (tmp_path) is ext4 here, where O_DIRECT works. Where the tests can mount (root with
CAP_SYS_ADMIN), a ramfs stands for a file system that refuses O_DIRECT, a 1 MiB tmpfs for a full
disk and a read-only tmpfs for an unwritable directory; elsewhere those tests skip and the simulated
variants still run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess

import pytest
import torch

from stated.paging import state_file as disk
from stated.paging import state_file_space as space
from stated.paging.state_file import HEADER_BYTES, PageCorruptError, StateFile, allocate_aligned, state_path
from stated.paging.state_file_space import DiskSpaceError, StateDirError
from stated.paging.disk_bandwidth import measure_bandwidth
from stated.errors import AlreadyExists, DataLoss

PAGE = 3 * 4096 + 100  # not a multiple of the alignment: slots are 16 KiB
SLOT = 4 * 4096


def aligned_tensor(nbytes):
    return torch.frombuffer(allocate_aligned(nbytes), dtype=torch.uint8)


def pattern(page, nbytes=PAGE):
    g = torch.Generator().manual_seed(1000 + page)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def o_direct_in_use(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return bool(flags & os.O_DIRECT)


@contextlib.contextmanager
def mounted(path, fstype, options=""):
    os.makedirs(path, exist_ok=True)
    cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount {fstype} here: {done.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


def test_round_trip_with_o_direct_from_aligned_tensors(state_dir):
    f = StateFile.create(state_dir, "job-a", PAGE, 4)
    assert f.direct and o_direct_in_use(f._fd)
    assert f.slot_bytes == SLOT
    assert os.path.getsize(f.path) == HEADER_BYTES + 4 * SLOT
    assert os.stat(f.path).st_blocks * 512 >= 4 * SLOT, "pages must be preallocated"
    bufs = [aligned_tensor(SLOT) for _ in range(4)]
    sums = []
    for page in (2, 0, 3, 1):  # any order: each page has its own slot
        bufs[page][:PAGE] = pattern(page)
        sums.append((page, f.write(page, bufs[page])))
    for page, checksum in sums:
        out = aligned_tensor(SLOT)
        assert f.read(page, out, checksum) == checksum
        assert torch.equal(out[:PAGE], pattern(page))
        assert f.checksums[page] == checksum
    f.remove()
    assert not os.path.exists(f.path)


def test_unaligned_and_odd_buffers_go_through_the_bounce_buffer(state_dir):
    f = StateFile.create(state_dir, "job-b", PAGE, 3)
    backing = aligned_tensor(2 * SLOT)
    unaligned = backing[1 : 1 + PAGE]  # off by one byte, exactly page-sized
    unaligned.copy_(pattern(0))
    f.write(0, unaligned)
    f.write(1, bytes(pattern(1).numpy()))  # read-only bytes
    f.write(2, bytearray(pattern(2).numpy()))
    for page in range(3):
        out = bytearray(PAGE + 7)
        f.read(page, memoryview(out)[3 : 3 + PAGE])
        assert bytes(out[3 : 3 + PAGE]) == bytes(pattern(page).numpy())
    into = backing[5 : 5 + PAGE]
    f.read(0, into)
    assert torch.equal(into, pattern(0))
    with pytest.raises(ValueError, match="read-only"):
        f.read(0, bytes(PAGE))
    with pytest.raises(ValueError, match="smaller than a page"):
        f.write(0, bytearray(PAGE - 1))
    with pytest.raises(IndexError, match="page 3 out of range"):
        f.write(3, bytearray(PAGE))
    f.close()


def test_bounced_pages_carry_no_stale_bytes_in_their_padding(state_dir):
    # A full-slot page leaves its bytes in this thread's bounce buffer; a smaller page written after
    # it must not carry them into its slot's padding.
    big = StateFile.create(state_dir, "big-pages", SLOT, 1)
    big.write(0, bytearray(b"\xee" * SLOT))
    small = StateFile.create(state_dir, "small-pages", PAGE, 1)
    small.write(0, bytearray(pattern(0).numpy()))
    with open(small.path, "rb") as raw:
        raw.seek(HEADER_BYTES + PAGE)
        assert raw.read(SLOT - PAGE) == bytes(SLOT - PAGE)
    big.close()
    small.close()


def test_writing_a_page_leaves_its_neighbours_alone(state_dir):
    f = StateFile.create(state_dir, "job-c", PAGE, 3)
    for page in range(3):
        f.write(page, pattern(page))
    f.write(1, torch.full((PAGE,), 0xAB, dtype=torch.uint8))
    out = torch.empty(PAGE, dtype=torch.uint8)
    f.read(0, out)
    assert torch.equal(out, pattern(0))
    f.read(2, out)
    assert torch.equal(out, pattern(2))
    f.read(1, out)
    assert bool((out == 0xAB).all())
    f.close()


def test_a_flipped_byte_is_reported_with_job_and_page(state_dir):
    f = StateFile.create(state_dir, "job-d", PAGE, 3)
    sums = [f.write(page, pattern(page)) for page in range(3)]
    fd = os.open(f.path, os.O_RDWR)
    offset = HEADER_BYTES + 2 * SLOT + 1234
    (byte,) = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([byte ^ 0x01]), offset)
    os.close(fd)
    out = aligned_tensor(SLOT)
    with pytest.raises(PageCorruptError) as info:
        f.read(2, out, sums[2])
    err = info.value
    assert (err.job, err.page, err.path, err.expected) == ("job-d", 2, f.path, sums[2])
    assert err.found != sums[2]
    assert "page 2 of job 'job-d'" in str(err) and f.path in str(err)
    assert isinstance(err, DataLoss)  # the servicer's table maps it to DATA_LOSS
    f.read(1, out, sums[1])  # the other pages are intact
    with pytest.raises(PageCorruptError):
        f.read(0, out, sums[0] ^ 1)  # a stale checksum from the page table is caught too
    f.close()


def test_a_truncated_file_reads_as_corrupt_not_short(state_dir):
    f = StateFile.create(state_dir, "job-e", PAGE, 2)
    f.write(1, pattern(1))
    os.truncate(f.path, HEADER_BYTES + SLOT + 100)
    with pytest.raises(PageCorruptError, match="page 1 of job 'job-e'"):
        f.read(1, aligned_tensor(SLOT))
    with pytest.raises(ValueError, match="never written"):
        f.read(0, aligned_tensor(SLOT))
    f.close()


def test_grow_keeps_existing_pages(state_dir):
    f = StateFile.create(state_dir, "job-f", PAGE, 2)
    first = [f.write(page, pattern(page)) for page in range(2)]
    f.grow(5)
    assert f.pages == 5 and os.path.getsize(f.path) == HEADER_BYTES + 5 * SLOT
    f.write(4, pattern(4))
    out = aligned_tensor(SLOT)
    for page in range(2):
        f.read(page, out, first[page])
    f.read(4, out)
    assert torch.equal(out[:PAGE], pattern(4))
    f.grow(3)  # never shrinks
    assert f.pages == 5
    f.close()


def test_a_second_state_file_for_a_job_is_refused(state_dir):
    """Page files are the disk tier of a live daemon, never recovered (checkpoints are: stated.durability);
    a daemon removes those a dead one left at start-up, so a second one for a job is a bug."""
    f = StateFile.create(state_dir, "job/../g", PAGE, 3)
    f.close()
    assert os.path.dirname(f.path) == state_dir  # the job name cannot leave the directory
    with pytest.raises(AlreadyExists, match="already has a state file"):
        StateFile.create(state_dir, "job/../g", PAGE, 1)


def test_state_paths_are_confined_and_distinct(tmp_path):
    names = ["a", "a/b", "../x", ".", "..", ".hidden", "a b", "ü", "a.1", "a.1.0"]
    paths = [state_path(str(tmp_path), n, rank) for n in names for rank in (0, 1, 10)]
    assert len(set(paths)) == 3 * len(names)  # "a" rank 10 is not "a.1" rank 0, nor "a.1.0" rank 0
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path)
        assert not os.path.basename(p).startswith(".")
    for bad in ["", None, "x" * 300]:
        with pytest.raises(ValueError, match="invalid job name"):
            state_path(str(tmp_path), bad)


def fail_o_direct(monkeypatch):
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(disk.os, "open", fake_open)


def warnings_from(caplog):
    return [r for r in caplog.records if r.name == "stated.paging.state_file" and r.levelno == logging.WARNING]


def test_buffered_fallback_simulated_warns_once_per_directory(tmp_path, monkeypatch, caplog):
    fail_o_direct(monkeypatch)
    caplog.set_level(logging.WARNING, logger="stated.paging.state_file")
    files = [StateFile.create(str(tmp_path), f"job-{i}", PAGE, 2) for i in range(3)]
    for i, f in enumerate(files):
        assert not f.direct and not o_direct_in_use(f._fd)
        checksum = f.write(1, pattern(i))
        out = torch.empty(PAGE, dtype=torch.uint8)
        f.read(1, out, checksum)
        assert torch.equal(out, pattern(i))
        f.close()
    (record,) = warnings_from(caplog)
    assert str(tmp_path) in record.getMessage() and "O_DIRECT" in record.getMessage()


def test_o_direct_refused_at_the_first_transfer(tmp_path, monkeypatch, caplog):
    # Some file systems take O_DIRECT at open and refuse the I/O with EINVAL: the file goes buffered.
    import fcntl

    real = os.pwritev

    def refuse_direct(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(disk.os, "pwritev", refuse_direct)
    caplog.set_level(logging.WARNING, logger="stated.paging.state_file")
    f = StateFile.create(str(tmp_path), "job-k", PAGE, 2)
    assert f.direct
    checksum = f.write(1, aligned_tensor(SLOT))
    assert not f.direct and not o_direct_in_use(f._fd)
    f.write(0, pattern(0))
    out = aligned_tensor(SLOT)
    f.read(1, out, checksum)
    f.read(0, out)
    assert torch.equal(out[:PAGE], pattern(0))
    assert len(warnings_from(caplog)) == 1
    f.close()


def test_buffered_fallback_on_ramfs(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stated.paging.state_file")
    with mounted(tmp_path / "ram", "ramfs") as directory:
        files = [StateFile.create(directory, f"job-{i}", PAGE, 2) for i in range(2)]
        for i, f in enumerate(files):
            assert not f.direct
            checksum = f.write(0, pattern(i))
            out = aligned_tensor(SLOT)
            f.read(0, out, checksum)
            assert torch.equal(out[:PAGE], pattern(i))
            f.remove()
        assert len(warnings_from(caplog)) == 1


def test_dev_shm_works_with_at_most_one_warning(caplog):
    # tmpfs refused O_DIRECT before Linux 6.6 and accepts it since: either way pages round-trip.
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    caplog.set_level(logging.WARNING, logger="stated.paging.state_file")
    directory = os.path.join("/dev/shm", f"stated-test-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        files = [StateFile.create(directory, f"job-{i}", PAGE, 2) for i in range(2)]
        for i, f in enumerate(files):
            checksum = f.write(1, pattern(i))
            out = aligned_tensor(SLOT)
            f.read(1, out, checksum)
            assert torch.equal(out[:PAGE], pattern(i))
            f.remove()
        assert len(warnings_from(caplog)) == (0 if files[0].direct else 1)
    finally:
        os.rmdir(directory)


def test_a_directory_under_a_regular_file_is_unwritable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(StateDirError) as info:
        StateFile.create(str(blocker / "state"), "job-h", PAGE, 10)
    assert info.value.needed == HEADER_BYTES + 10 * SLOT
    assert str(blocker / "state") in str(info.value) and str(info.value.needed) in str(info.value)


def test_a_read_only_file_system_is_unwritable(tmp_path):
    with mounted(tmp_path / "ro", "tmpfs", "size=1m,ro") as directory:
        with pytest.raises(StateDirError, match="Read-only file system") as info:
            StateFile.create(directory, "job-i", PAGE, 10)
        assert info.value.path == state_path(directory, "job-i")


def test_a_directory_without_write_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through mode 0500; the two tests above cover unwritable directories")
    directory = tmp_path / "locked"
    directory.mkdir(mode=0o500)
    with pytest.raises(StateDirError, match="Permission denied"):
        StateFile.create(str(directory), "job-j", PAGE, 1)


def spy_fallocate(monkeypatch):
    calls = []
    real = os.posix_fallocate

    def spy(fd, offset, length):
        calls.append(length)
        return real(fd, offset, length)

    monkeypatch.setattr(disk.os, "posix_fallocate", spy)
    return calls


def test_more_than_the_free_space_fails_at_creation(state_dir, monkeypatch):
    keep = StateFile.create(state_dir, "keeper", PAGE, 2)
    fallocated = spy_fallocate(monkeypatch)
    checksum = keep.write(1, pattern(1))
    free = os.statvfs(state_dir).f_bavail * os.statvfs(state_dir).f_frsize
    pages = free // SLOT + 1024  # 16 MiB more than is free; nothing is allocated to find out
    with pytest.raises(DiskSpaceError) as info:
        StateFile.create(state_dir, "too-big", PAGE, pages)
    assert info.value.needed == HEADER_BYTES + pages * SLOT
    assert info.value.path in str(info.value) and str(info.value.needed) in str(info.value)
    assert not os.path.exists(state_path(state_dir, "too-big"))
    with pytest.raises(DiskSpaceError):
        keep.grow(pages)
    assert keep.pages == 2 and os.path.getsize(keep.path) == HEADER_BYTES + 2 * SLOT
    keep.read(1, aligned_tensor(SLOT), checksum)
    # Note [check before fallocate]: refused before fallocate could fill the disk for everyone.
    assert fallocated == []
    keep.close()


def test_a_partial_fallocate_is_rolled_back(state_dir, monkeypatch):
    # ext4 and xfs can allocate part of the range and extend the file before they fail with ENOSPC;
    # this stands in for that (a real one needs a full disk): the file goes back to its old size.
    keep = StateFile.create(state_dir, "keeper", PAGE, 2)
    checksum = keep.write(0, pattern(0))
    real = os.posix_fallocate

    def partial(fd, offset, length):
        real(fd, offset, length // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk.os, "posix_fallocate", partial)
    with pytest.raises(DiskSpaceError) as info:
        keep.grow(10)
    assert info.value.needed == 8 * SLOT
    assert keep.pages == 2 and os.path.getsize(keep.path) == HEADER_BYTES + 2 * SLOT
    keep.read(0, aligned_tensor(SLOT), checksum)
    keep.close()


def test_enospc_from_the_kernel_on_a_full_tmpfs(tmp_path, monkeypatch):
    # The free-space check is switched off (as on a file system that does not report it), so the
    # kernel's own ENOSPC from fallocate is what must come back as DiskSpaceError.
    monkeypatch.setattr(space, "free_bytes", lambda directory: None)
    with mounted(tmp_path / "small", "tmpfs", "size=1m") as directory:
        keep = StateFile.create(directory, "keeper", PAGE, 8)  # 132 KiB of 1 MiB
        sums = [keep.write(page, pattern(page)) for page in range(8)]
        with pytest.raises(DiskSpaceError, match="no space for state file") as info:
            StateFile.create(directory, "too-big", PAGE, 64)  # 1 MiB more
        assert info.value.needed == HEADER_BYTES + 64 * SLOT
        assert not os.path.exists(state_path(directory, "too-big"))
        with pytest.raises(DiskSpaceError):
            keep.grow(100)
        assert keep.pages == 8 and os.path.getsize(keep.path) == HEADER_BYTES + 8 * SLOT
        out = aligned_tensor(SLOT)
        for page in range(8):
            keep.read(page, out, sums[page])
            assert torch.equal(out[:PAGE], pattern(page))
        keep.grow(20)  # room for this much is still there
        keep.remove()


def test_measure_bandwidth(tmp_path):
    bw = measure_bandwidth(str(tmp_path), total_bytes=8 << 20, chunk_bytes=1 << 20)
    assert bw.direct and bw.total_bytes == 8 << 20 and bw.chunk_bytes == 1 << 20
    assert bw.read_bytes_per_s > 0 and bw.write_bytes_per_s > 0
    assert os.listdir(tmp_path) == []


def read_page(f, page, checksum=None):
    out = aligned_tensor(SLOT)
    f.read(page, out, checksum)
    return out[:PAGE].clone()


def read_slot(path, page):
    with open(path, "rb") as raw:
        raw.seek(HEADER_BYTES + page * SLOT)
        return torch.frombuffer(bytearray(raw.read(PAGE)), dtype=torch.uint8)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_frozen_file_keeps_what_it_held_and_later_writes_go_to_the_next(state_dir, tmp_path):
    """Note [frozen state files]: the link holds the pages as they were at the freeze, for good; the
    live file reads each page from the generation that has its last write."""
    f = StateFile.create(state_dir, "job-f", PAGE, 4, rank=3)
    assert os.path.basename(f.path) == "job-f.3.state"
    buf = aligned_tensor(SLOT)
    for page in range(3):  # page 3 is never written
        buf[:PAGE] = pattern(page)
        f.write(page, buf)
    fds = open_fds()
    first = str(tmp_path / "10.pages")
    f.freeze(first)
    assert open_fds() == fds + 1  # the new generation's descriptor; the frozen one stays open
    assert all(f.holds_current(p) is False for p in range(4))
    assert os.stat(first).st_ino != os.stat(f.path).st_ino
    assert os.path.getsize(f.path) == HEADER_BYTES + 4 * SLOT
    assert os.stat(f.path).st_blocks * 512 >= 4 * SLOT, "the next generation is preallocated too"
    buf[:PAGE] = pattern(100)
    f.write(1, buf)
    assert f.holds_current(1) and not f.holds_current(0)
    for page in (0, 2):
        assert torch.equal(read_page(f, page), pattern(page)), "a page not written since comes from the frozen file"
        assert torch.equal(read_slot(first, page), pattern(page))
    assert torch.equal(read_page(f, 1), pattern(100))
    assert torch.equal(read_slot(first, 1), pattern(1)), "the frozen file is never written again"
    assert torch.equal(read_slot(f.path, 1), pattern(100))

    second = str(tmp_path / "20.pages")
    f.freeze(second)  # pages 0 and 2 still come from the first generation, page 1 from the second
    os.unlink(first)  # a pruned checkpoint: its descriptor still reads
    assert torch.equal(read_page(f, 0), pattern(0)) and torch.equal(read_page(f, 1), pattern(100))
    assert open_fds() == fds + 2
    for page in (0, 2):
        buf[:PAGE] = pattern(200 + page)
        f.write(page, buf)
    assert open_fds() == fds + 1, "a frozen generation no page is read from is closed"
    buf[:PAGE] = pattern(300)
    f.write(1, buf)
    assert open_fds() == fds, "only the live generation is open"
    assert [torch.equal(read_page(f, p), pattern(q)) for p, q in ((0, 200), (1, 300), (2, 202))] == [True] * 3
    # The second generation held page 1 only: page 0's checkpoint place is the first frozen file.
    assert torch.equal(read_slot(second, 1), pattern(100)) and not read_slot(second, 0).any()
    assert sorted(os.listdir(state_dir)) == ["job-f.3.state"], "no next generation left behind"
    f.remove()
    assert os.listdir(state_dir) == []


def test_a_freeze_that_cannot_be_made_changes_nothing(state_dir, tmp_path, monkeypatch):
    f = StateFile.create(state_dir, "job-g", PAGE, 2)
    buf = aligned_tensor(SLOT)
    buf[:PAGE] = pattern(0)
    f.write(0, buf)
    with pytest.raises(FileNotFoundError):  # the link's directory does not exist
        f.freeze(str(tmp_path / "missing" / "1.pages"))
    monkeypatch.setattr(space, "free_bytes", lambda directory: 100)
    with pytest.raises(DiskSpaceError, match=r"job-g\.0\.next\.state"):
        f.freeze(str(tmp_path / "2.pages"))
    assert not os.path.exists(tmp_path / "2.pages")
    assert sorted(os.listdir(state_dir)) == ["job-g.0.state"]
    assert f.holds_current(0) and torch.equal(read_page(f, 0), pattern(0))
    buf[:PAGE] = pattern(1)
    f.write(1, buf)
    assert torch.equal(read_slot(f.path, 1), pattern(1)), "writes still go to the one file"
    f.remove()
