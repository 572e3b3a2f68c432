"""The client checks whom it talks to (issue 12, item 4; Note [whom the client talks to]).

Another user's daemon is refused unless trusted (its peer credentials), the default socket directory is
refused when another user made it or others may write it, and an address that was given and does not
answer is an error, never a private daemon. The other user is `nobody` (uid 65534): the daemons and the
impostor below are real processes that this suite, run as root, starts under that uid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

import stated
from stated_client import embedded
from stated_client.protocol import channel_path
from support.daemon import DaemonProcess

NOBODY = 65534
# The interpreter lives below /root (0700) here, so the other user's daemon keeps one capability, to read
# it (DAC override); its uid, which is what the client checks, is 65534's.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=+dac_override",
             "--ambient-caps=+dac_override"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="starting a process as another user (uid 65534) needs root and setpriv "
                                "(util-linux); without them nothing of another user can be started to refuse")


@pytest.fixture
def nobodys_directory():
    """A directory that uid 65534 owns, below /tmp (pytest's own tmp_path is closed to it)."""
    directory = tempfile.mkdtemp(prefix="stated-nobody-")
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, NOBODY)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_as_nobody(nobodys_directory, monkeypatch):
    """Starts a real `stated serve` as uid 65534 in nobodys_directory (socket at `socket`, if given)."""
    monkeypatch.setenv("HOME", nobodys_directory)  # torch and friends may look for a cache there
    started: list[DaemonProcess] = []

    def start(socket: str | None = None) -> DaemonProcess:
        proc = DaemonProcess(nobodys_directory)
        proc.runner = AS_NOBODY
        if socket is not None:
            proc.socket = socket
        started.append(proc)
        proc.start()
        assert os.stat(proc.socket).st_uid == NOBODY
        return proc

    yield start
    for proc in started:
        proc.stop()
        assert proc.leaked_segments() == []


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("STATED_ADDRESS", "STATED_TRUST_UIDS", "STATED_EMBEDDED", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def stated_serve_children() -> set[int]:
    """Pids of this process's children that run `stated serve` (an embedded daemon would be one)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"stated" in command and b"serve" in command:
            found.add(int(entry))
    return found


def sessions(proc: DaemonProcess) -> float:
    line = next(line for line in proc.scrape().splitlines() if line.startswith("stated_sessions "))
    return float(line.split()[1])


def train_beside_torch(address: str | None, steps: int = 3):
    """A few AdamW steps through stated and through torch from the same start: the optimizer and whether
    every parameter came out exactly the same."""
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ref.load_state_dict(ours.state_dict())
    opt = stated.AdamW(ours.parameters(), lr=1e-2, address=address, job="whom")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)  # the kernel the daemon runs
    x = torch.randn(16, 6)
    for model, optimizer in ((ours, opt), (ref, ref_opt)):
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    same = all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))
    return opt, same


# --- peer credentials ----------------------------------------------------------------------------------

@needs_root
def test_another_users_daemon_is_refused_naming_it(start_as_nobody, clean_env):
    proc = start_as_nobody()
    with pytest.raises(stated.PermissionDeniedError) as info:
        stated.AdamW(torch.nn.Linear(2, 2).parameters(), address=proc.address)
    message = str(info.value)
    assert isinstance(info.value, PermissionError)
    assert proc.socket in message and "uid 65534 (nobody)" in message and f"pid {proc.process.pid}" in message
    assert "STATED_TRUST_UIDS=nobody" in message
    assert sessions(proc) == 0  # refused before Attach: the daemon never saw a session
    # The same daemon through STATED_ADDRESS.
    clean_env.setenv("STATED_ADDRESS", proc.address)
    with pytest.raises(stated.PermissionDeniedError, match="uid 65534"):
        stated.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


@needs_root
def test_a_trusted_users_daemon_is_used(start_as_nobody, clean_env):
    proc = start_as_nobody()
    for trust in ("nobody", "65534", "4242, nobody"):  # a name, a uid, a list
        clean_env.setenv("STATED_TRUST_UIDS", trust)
        opt, same = train_beside_torch(proc.address)
        assert same, trust
        assert opt.address == proc.address and opt._step_line is not None  # the step channel was trusted too
        assert sessions(proc) == 1
        opt.close()


def test_an_unknown_user_to_trust_is_an_error_naming_it(spawn, clean_env):
    proc = spawn("own")
    clean_env.setenv("STATED_TRUST_UIDS", "65534,no-such-user-here")
    with pytest.raises(stated.InvalidArgumentError) as info:
        stated.AdamW(torch.nn.Linear(2, 2).parameters(), address=proc.address)
    assert "STATED_TRUST_UIDS" in str(info.value) and "'no-such-user-here'" in str(info.value)


IMPOSTOR = textwrap.dedent("""
    import os, socket, sys, time
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o666)
    os.setgroups([]); os.setgid(65534); os.setuid(65534)  # the peer credentials are those at listen()
    listener.listen(8)
    print("listening", flush=True)
    received, connections, deadline = b"", 0, time.monotonic() + float(sys.argv[2])
    while (left := deadline - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except OSError:
            break
        connections += 1
        conn.settimeout(2)
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except OSError:
            pass
        conn.close()
    print(connections, len(received), flush=True)
""")


@needs_root
def test_a_step_socket_held_by_another_user_gets_no_token_and_sends_no_arenas(spawn, clean_env):
    """A daemon of this user whose step socket another user's process took over: the client cannot receive
    its arenas there, so creating the optimizer fails with PermissionDeniedError naming the socket and
    the uid, leaves nothing attached, and the impostor receives nothing (the session's token goes first
    on that socket, and only after check_peer)."""
    proc = spawn("own")
    path = channel_path(proc.socket)
    os.unlink(path)
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, path, "8"], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline().strip() == "listening"
        with pytest.raises(stated.PermissionDeniedError) as info:
            train_beside_torch(proc.address)
        assert path in str(info.value) and "65534" in str(info.value), info.value
        channel, stub = proc.stub()
        with channel:
            assert [s for s in stub.GetStats(proc.everything(), timeout=10).sessions if s.job == "whom"] == []
        assert impostor.wait(timeout=30) == 0
        connections, received = map(int, impostor.stdout.read().split())
        assert connections >= 2 and received == 0  # the credential request and the arena request
    finally:
        impostor.kill()
        impostor.wait()


# --- the default socket directory ----------------------------------------------------------------------

def default_directory(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return str(tmp_path / "run" / "stated")


def no_private_daemon_started(refusal, match: str, call) -> str:
    """Runs `call`, which must raise `refusal` (matching `match`) without starting a private daemon."""
    before = stated_serve_children(), embedded.running_target()
    with pytest.raises(refusal, match=match) as info:
        call()
    assert (stated_serve_children(), embedded.running_target()) == before
    return str(info.value)


def refused_at_default(match: str) -> str:
    return no_private_daemon_started(stated.PermissionDeniedError, match,
                                     lambda: stated.AdamW(torch.nn.Linear(2, 2).parameters()))


@needs_root
def test_a_default_directory_of_another_user_is_refused(tmp_path, clean_env):
    directory = default_directory(tmp_path, clean_env)
    os.mkdir(directory, 0o700)
    os.chown(directory, NOBODY, NOBODY)
    message = refused_at_default("belongs to uid 65534")
    assert directory in message and "rm -r" in message and "XDG_RUNTIME_DIR" in message


@needs_root
def test_a_default_directory_that_is_another_users_symlink_is_refused(tmp_path, clean_env):
    directory = default_directory(tmp_path, clean_env)
    (tmp_path / "mine").mkdir(mode=0o700)
    os.symlink(tmp_path / "mine", directory)
    os.lchown(directory, NOBODY, NOBODY)
    assert directory in refused_at_default("is a symlink that belongs to uid 65534")


@pytest.mark.parametrize("mode, writers", [(0o777, "its group and others"), (0o1777, "its group and others"),
                                           (0o770, "its group"), (0o703, "others")],
                         ids=["0777", "1777", "0770", "0703"])
def test_a_default_directory_others_may_write_is_refused(tmp_path, clean_env, mode, writers):
    directory = default_directory(tmp_path, clean_env)
    os.mkdir(directory)
    os.chmod(directory, mode)
    message = refused_at_default(f"has mode {mode:04o}: {writers} may write it")
    assert directory in message and f"chmod 700 {directory}" in message


@needs_root
def test_another_users_daemon_in_the_default_directory_is_refused(start_as_nobody, nobodys_directory, clean_env):
    """The finding: without XDG_RUNTIME_DIR another user makes the victim's default directory first and
    runs a daemon there. Refused, even with that user trusted: the default directory must be one's own."""
    clean_env.setenv("XDG_RUNTIME_DIR", nobodys_directory)
    proc = start_as_nobody(socket=os.path.join(nobodys_directory, "stated", "stated.sock"))
    for trust in ("", "nobody"):
        clean_env.setenv("STATED_TRUST_UIDS", trust)
        assert "belongs to uid 65534 (nobody)" in refused_at_default("default socket directory")
    assert sessions(proc) == 0


@pytest.mark.parametrize("group", [(), ("--group", "root")], ids=["0700", "0750 with --group"])
def test_ones_own_daemon_at_the_default_socket_is_used(tmp_path, spawn, clean_env, group):
    directory = default_directory(tmp_path, clean_env)
    proc = spawn("own", *group, socket=os.path.join(directory, "stated.sock"))
    before = stated_serve_children()
    opt, same = train_beside_torch(None)
    assert same and opt.address == proc.address and stated_serve_children() == before
    opt.close()


# --- an address that was given -------------------------------------------------------------------------

def refused_for_nothing_there(address: str | None, match: str) -> str:
    start = time.monotonic()
    message = no_private_daemon_started(stated.DaemonUnavailableError, match,
                                        lambda: stated.AdamW(torch.nn.Linear(2, 2).parameters(), address=address))
    assert time.monotonic() - start < 10
    return message


def test_a_given_address_that_does_not_answer_is_an_error_not_a_private_daemon(tmp_path, clean_env):
    nowhere = str(tmp_path / "nothing-listens-here.sock")
    message = refused_for_nothing_there(nowhere, "a private daemon is started only when no address is given")
    assert nowhere in message and "address=" in message and f"stated serve --socket {nowhere}" in message
    clean_env.setenv("STATED_ADDRESS", f"unix://{nowhere}")
    message = refused_for_nothing_there(None, "STATED_ADDRESS")
    assert nowhere in message
    assert not os.path.exists(nowhere)


def test_a_given_address_whose_daemon_stopped_is_an_error(tmp_path, clean_env):
    """A socket file left behind by a daemon that is gone (nothing listens on it)."""
    stale = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()
    assert stale in refused_for_nothing_there(f"unix://{stale}", "no stated daemon answers")
