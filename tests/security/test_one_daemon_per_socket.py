"""One daemon per socket (stated.server.socket_guard, Note [one daemon per socket]), on real daemons.

The findings: two daemons started at the same moment both stayed up (3 runs of 10); a daemon whose socket
was deleted removed its successor's socket when it stopped; `--socket DIR/x.sock` chmodded an existing
1777 DIR to 0700.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import threading

import pytest

from support.daemon import DaemonProcess

ROUNDS = 10


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def inode(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def daemon_files(socket: str) -> list[str]:
    return [socket, socket + ".step", socket + ".admin", socket + ".lock"]


def start_together(daemons: list[DaemonProcess]) -> dict[DaemonProcess, BaseException | None]:
    """Starts the daemons from threads released at the same moment; the error each start raised, if any."""
    barrier = threading.Barrier(len(daemons))
    outcome: dict[DaemonProcess, BaseException | None] = {}

    def start(proc: DaemonProcess) -> None:
        barrier.wait()
        try:
            proc.start()
            outcome[proc] = None
        except RuntimeError as exc:
            outcome[proc] = exc

    threads = [threading.Thread(target=start, args=(proc,)) for proc in daemons]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def refusal(socket: str) -> re.Pattern:
    return re.compile(rf"cannot serve: another daemon is already serving on {re.escape(socket)} "
                      rf"\((pid (\d+)|another process) holds {re.escape(socket)}\.lock\); stop it or pick "
                      rf"another --socket")


def test_two_daemons_started_together_exactly_one_serves(tmp_path):
    winners: list[DaemonProcess] = []
    named = 0  # refusals that named the winner's pid (the others came before it had written it)
    try:
        for round_ in range(ROUNDS):
            winner, named_it = race_once(tmp_path / f"round{round_}")
            winners.append(winner)
            named += named_it
    finally:
        # Each winner was sent SIGTERM as the next round began (its shutdown overlaps that round's race).
        codes = [proc.stop() for proc in winners]
    assert codes == [0] * ROUNDS
    for proc in winners:
        assert not any(os.path.exists(path) for path in daemon_files(proc.socket)), proc.log()
    assert named > 0, "the refusal never named the pid holding the lock"


def race_once(directory) -> tuple[DaemonProcess, bool]:
    """Two daemons on one socket, started together: one serves, the other refuses; returns the one serving
    (already told to stop) and whether the refusal named its pid."""
    socket = str(directory / "run" / "stated.sock")
    pair = [DaemonProcess(directory / name) for name in ("a", "b")]
    for proc in pair:
        proc.socket = socket
    try:
        outcome = start_together(pair)
        serving = [proc for proc in pair if outcome[proc] is None]
        assert len(serving) == 1, f"{len(serving)} daemons serve on {socket}"
        winner, loser = serving[0], next(proc for proc in pair if proc is not serving[0])
        assert "daemon exited with 1" in str(outcome[loser])
        match = refusal(socket).search(loser.log())
        assert match, loser.log()
        named_it = match.group(2) is not None
        if named_it:
            assert int(match.group(2)) == winner.process.pid
        # The loser took nothing from the winner: its socket, step channel and lock stay, and it serves.
        assert all(os.path.exists(path) for path in daemon_files(socket))
        assert winner.healthy()
    except BaseException:
        for proc in pair:
            proc.stop()
        raise
    loser.stop()
    winner.process.send_signal(signal.SIGTERM)
    return winner, named_it


def test_deleting_the_socket_does_not_let_a_second_daemon_in(spawn, tmp_path):
    first = spawn("first")
    os.unlink(first.socket)
    os.unlink(first.socket + ".step")
    second = DaemonProcess(tmp_path / "second")
    second.socket = first.socket
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        second.start()
    second.stop()
    match = refusal(first.socket).search(second.log())
    assert match and match.group(2) == str(first.process.pid), second.log()
    assert first.process.poll() is None


def test_a_stopping_daemon_leaves_its_successors_socket(spawn):
    first = spawn("first")
    # Someone removes the whole directory (a cleaned /tmp, a removed runtime directory), and a new
    # daemon starts on the same path while the first still runs.
    shutil.rmtree(os.path.dirname(first.socket))
    second = spawn("second", socket=first.socket)
    successor = {path: inode(path) for path in daemon_files(second.socket)}

    assert first.stop(signal.SIGTERM) == 0
    assert {path: inode(path) for path in daemon_files(second.socket)} == successor
    assert "left " + first.socket + " alone" in first.log()
    assert second.healthy()

    assert second.stop() == 0
    assert not any(os.path.exists(path) for path in daemon_files(second.socket))


@pytest.mark.parametrize("directory_mode", [0o1777, 0o755, 0o777])
def test_an_existing_directory_keeps_its_mode(spawn, tmp_path, directory_mode):
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, directory_mode)
    proc = spawn("daemon", socket=str(directory / "x.sock"))
    assert mode(directory) == directory_mode
    assert mode(proc.socket) == 0o600
    assert proc.stop() == 0
    assert mode(directory) == directory_mode
    assert sorted(os.listdir(directory)) == []
    unsafe = "others may write " + str(directory)
    assert (unsafe in proc.log()) == (directory_mode == 0o777), proc.log()


def test_a_missing_directory_is_created_0700(spawn, tmp_path):
    socket = tmp_path / "missing" / "run" / "x.sock"
    proc = spawn("daemon", socket=str(socket))
    assert mode(socket.parent) == 0o700
    assert proc.stop() == 0
    assert mode(socket.parent) == 0o700


def test_a_lock_path_that_is_no_regular_file_is_refused_naming_it(tmp_path):
    """A FIFO planted at `<socket>.lock` in a shared directory: the daemon neither waits on it nor locks
    it, and says what is wrong with it."""
    daemon = DaemonProcess(tmp_path / "fifo")
    os.makedirs(os.path.dirname(daemon.socket), mode=0o700)
    os.mkfifo(daemon.socket + ".lock")
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        daemon.start(timeout=30)
    daemon.stop()
    assert f"{daemon.socket}.lock is not a regular file; remove it or pick another --socket" in daemon.log()
