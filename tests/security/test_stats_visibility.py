"""Who sees which jobs (issue 12, item 6; Note [who sees what] in stated.server.admin_file), on real daemons.

The finding: GetStats needed no token and listed every job, pid and session id to anyone who could reach
the socket. Now a caller without a token gets totals only, a session sees its own job, and the daemon's
admin token (the file <socket>.admin, which only the daemon's user and root can read) shows everything.

The other user is `nobody` (uid 65534), reaching the socket through `--group nogroup`: a process this
suite (run as root) starts, which loads what it needs and then gives up root for good (setresuid), so that
it really cannot read what root can.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap

import grpc
import pytest
import torch

import stated
from stated.tools.jobs import show_jobs
from stated.tools.status import show_status
from stated.v1 import state_service_pb2 as pb
from stated_client.protocol import admin_path
from support.daemon import DaemonProcess

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user (uid 65534) needs root")

# Runs as root up to the imports, then as uid/gid 65534 with no capabilities: prints what it saw.
AS_NOBODY = textwrap.dedent("""
    import io, os, sys
    from contextlib import redirect_stderr, redirect_stdout
    import grpc
    from stated import cli
    from stated.tools import admin_token, jobs, status
    from stated.v1 import state_service_pb2 as pb, state_service_pb2_grpc as pb_grpc
    cli.build_parser()  # loads what it loads lazily, while the interpreter's directory is still readable
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    what, address = sys.argv[1], sys.argv[2]
    if what == "raw":
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.StateServiceStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
        sys.stdout.write(reply.SerializeToString().hex())
    elif what == "read":
        try:
            open(sys.argv[3]).read()
            print("read it")
        except PermissionError as exc:
            print("refused:", exc)
    else:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main([*sys.argv[3:], "--address", address])
        print(code)
        print(out.getvalue())
        print(err.getvalue(), file=sys.stderr)
""")


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", AS_NOBODY, *args], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, HOME="/nonexistent"))
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def shared_daemon():
    """A daemon (run as root) whose socket members of nogroup, uid 65534 among them, may reach."""
    directory = tempfile.mkdtemp(prefix="stated-stats-")
    os.chmod(directory, 0o755)  # pytest's tmp_path is closed to other users
    proc = DaemonProcess(directory, "--group", "nogroup")
    proc.start()
    yield proc
    proc.stop()
    assert proc.leaked_segments() == []
    shutil.rmtree(directory, ignore_errors=True)


def train(address: str, job: str, rank: int = 0) -> stated.AdamW:
    model = torch.nn.Linear(4, 2)
    opt = stated.AdamW(model.parameters(), lr=1e-2, address=address, job=job, rank=rank)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return opt


@pytest.fixture
def two_jobs(shared_daemon):
    """Job 'alpha-secret' (rank 0 live, rank 1 retained) and job 'beta-secret' (rank 0 live)."""
    kept = train(shared_daemon.address, "alpha-secret", rank=1)
    kept.close(keep=True)
    opts = [train(shared_daemon.address, "alpha-secret"), train(shared_daemon.address, "beta-secret")]
    yield opts
    for opt in opts:
        opt.close()


def get_stats(proc: DaemonProcess, request: pb.GetStatsRequest) -> pb.GetStatsResponse:
    channel, stub = proc.stub()
    with channel:
        return stub.GetStats(request, timeout=10)


@needs_root
def test_another_user_without_a_token_sees_totals_only(shared_daemon, two_jobs):
    alpha, beta = two_jobs
    result = as_nobody("raw", shared_daemon.address)
    assert result.returncode == 0, result.stderr
    raw = bytes.fromhex(result.stdout)
    reply = pb.GetStatsResponse.FromString(raw)
    assert reply.scope == pb.STATS_SCOPE_TOTALS
    assert list(reply.sessions) == [] and list(reply.jobs) == []
    assert (reply.live_sessions, reply.retained_ranks) == (2, 1)
    everything = get_stats(shared_daemon, shared_daemon.everything())
    assert reply.state_bytes == everything.state_bytes > 0
    # Nothing that names a job, a trainer or a session is anywhere in the reply's bytes.
    for secret in (b"alpha-secret", b"beta-secret", alpha.session_id.encode(), beta.session_id.encode()):
        assert secret not in raw


@needs_root
def test_stated_status_and_jobs_as_another_user_show_totals_and_say_who_sees_more(shared_daemon, two_jobs):
    ids = [opt.session_id for opt in two_jobs]
    admin = admin_path(shared_daemon.socket)
    read = as_nobody("read", shared_daemon.address, admin)
    assert read.stdout.startswith("refused:"), read.stdout  # the file is the daemon's user's and root's only
    for command in ("status", "jobs"):
        result = as_nobody("cli", shared_daemon.address, command)
        code, _, out = result.stdout.partition("\n")
        assert code == "0", result
        assert "totals only" in out and "daemon's user and root" in out, out
        assert f"{admin} is readable only by the daemon's user (uid 0 (root)) or root" in out, out
        assert "alpha-secret" not in out and "beta-secret" not in out and not any(i in out for i in ids), out
    status = as_nobody("cli", shared_daemon.address, "status").stdout
    assert "2 sessions" in status, status
    listing = as_nobody("cli", shared_daemon.address, "jobs").stdout
    assert "2 live sessions and 1 retained or recovered (job, rank)s" in listing, listing


@needs_root
def test_stated_drop_as_another_user_is_refused_and_drops_nothing(shared_daemon, two_jobs):
    result = as_nobody("cli", shared_daemon.address, "drop", "alpha-secret", "--rank", "1")
    code, _, _ = result.stdout.partition("\n")
    assert code == "1", result
    assert "dropping job 'alpha-secret' needs the daemon's admin token" in result.stderr, result.stderr
    assert admin_path(shared_daemon.socket) in result.stderr
    held = {(j.job, j.rank): j.state for j in get_stats(shared_daemon, shared_daemon.everything()).jobs}
    assert held[("alpha-secret", 1)] == "retained"
    # Not even whether a job exists: a name that is nowhere gets the same refusal.
    result = as_nobody("cli", shared_daemon.address, "drop", "no-such-job")
    assert "dropping job 'no-such-job' needs the daemon's admin token" in result.stderr, result.stderr


@needs_root
def test_stated_status_and_jobs_as_root_show_everything(shared_daemon, two_jobs, capsys):
    alpha, beta = two_jobs
    assert show_status(shared_daemon.address) == 0
    out = capsys.readouterr().out
    assert "alpha-secret" in out and "beta-secret" in out and str(os.getpid()) in out
    assert "totals only" not in out
    assert show_jobs(shared_daemon.address) == 0
    listing = capsys.readouterr().out
    rows = [line.split()[:3] for line in listing.splitlines()[1:]]
    assert rows == [["alpha-secret", "0", "live"], ["alpha-secret", "1", "retained"], ["beta-secret", "0", "live"]]
    reply = get_stats(shared_daemon, shared_daemon.everything())
    assert reply.scope == pb.STATS_SCOPE_ALL
    assert {s.id for s in reply.sessions} == {alpha.session_id, beta.session_id}


def test_a_session_sees_its_own_job_only(spawn):
    proc = spawn("daemon")
    kept = train(proc.address, "mine", rank=1)
    kept.close(keep=True)
    mine, theirs = train(proc.address, "mine"), train(proc.address, "theirs")
    try:
        reply = get_stats(proc, pb.GetStatsRequest(session=mine._session))
        assert reply.scope == pb.STATS_SCOPE_JOB
        assert [(s.id, s.job, s.pid) for s in reply.sessions] == [(mine.session_id, "mine", os.getpid())]
        assert [(j.job, j.rank, j.state) for j in reply.jobs] == [("mine", 0, "live"), ("mine", 1, "retained")]
        assert (reply.live_sessions, reply.retained_ranks) == (2, 1)  # the totals stay daemon-wide
        assert theirs.session_id.encode() not in reply.SerializeToString()
        # Through the client's own connection, as the optimizer would ask.
        own = mine._connection.call("GetStats", pb.GetStatsRequest(session=mine._session))
        assert [s.job for s in own.sessions] == ["mine"]
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("field", ["session", "admin_token"])
def test_a_wrong_token_is_permission_denied_naming_it(spawn, field):
    proc = spawn("daemon")
    opt = train(proc.address, "victim")
    try:
        request = (pb.GetStatsRequest(session=pb.SessionRef(id=opt.session_id, token=os.urandom(16)))
                   if field == "session" else pb.GetStatsRequest(admin_token=os.urandom(32)))
        with pytest.raises(grpc.RpcError) as info:
            get_stats(proc, request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        words = ("session.token",) if field == "session" else ("admin_token", admin_path(proc.socket))
        for word in words:
            assert word in info.value.details()
        assert proc.healthy()
    finally:
        opt.close()


def test_drop_needs_the_admin_token_or_a_session_of_that_job(spawn):
    proc = spawn("daemon", "--retain", "1h")
    for job in ("a", "b"):
        train(proc.address, job, rank=1).close(keep=True)
    a = train(proc.address, "a")
    channel, stub = proc.stub()
    try:
        with channel:
            # a's session may drop a's retained rank, not b's; nobody's token may drop either.
            with pytest.raises(grpc.RpcError) as info:
                stub.Drop(pb.DropRequest(job="b", session=a._session))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "a session of job 'a'" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub.Drop(pb.DropRequest(job="b"))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            dropped = stub.Drop(pb.DropRequest(job="a", rank=1, session=a._session)).dropped
            assert [(j.job, j.rank) for j in dropped] == [("a", 1)]
            dropped = stub.Drop(pb.DropRequest(job="b", admin_token=proc.admin_token())).dropped
            assert [(j.job, j.rank) for j in dropped] == [("b", 1)]
    finally:
        a.close()


def test_the_admin_file_is_the_daemons_users_only(spawn):
    proc = spawn("daemon")
    path = admin_path(proc.socket)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert len(proc.admin_token()) == 32
    assert [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".admin")] == ["stated.sock.admin"]
    assert proc.stop() == 0
    assert not os.path.exists(path)


def test_a_restarted_daemon_has_a_new_token(spawn):
    first = spawn("daemon")
    token = first.admin_token()
    first.stop()
    second = spawn("daemon")
    assert second.admin_token() != token
    with pytest.raises(grpc.RpcError) as info:
        get_stats(second, pb.GetStatsRequest(admin_token=token))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_stopping_daemon_removes_only_its_own_admin_file(spawn):
    first = spawn("first")
    # The directory is removed under the first daemon and a second one starts on the same path.
    shutil.rmtree(os.path.dirname(first.socket))
    second = spawn("second", socket=first.socket)
    path = admin_path(second.socket)
    successor = os.lstat(path).st_ino, second.admin_token()
    assert first.stop(signal.SIGTERM) == 0
    assert (os.lstat(path).st_ino, second.admin_token()) == successor
    assert f"left {path} alone" in first.log()
    assert get_stats(second, second.everything()).scope == pb.STATS_SCOPE_ALL
    assert second.stop() == 0
    assert not os.path.exists(path)


@needs_root
def test_root_reads_the_admin_file_of_another_users_daemon(capsys, monkeypatch):
    """A daemon run by uid 65534 writes its file as that user, 0600; root's `stated status` still sees all."""
    directory = tempfile.mkdtemp(prefix="stated-nobody-")
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, NOBODY)
    proc = DaemonProcess(directory)
    # The interpreter lives below /root (0700): the daemon keeps the capability to read it (DAC override).
    proc.runner = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                   "--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) starts the daemon as uid 65534")
    try:
        proc.start()
        st = os.lstat(admin_path(proc.socket))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
        monkeypatch.setenv("STATED_TRUST_UIDS", "nobody")
        opt = train(proc.address, "root-on-nobodys")
        assert show_status(proc.address) == 0
        assert "root-on-nobodys" in capsys.readouterr().out
        opt.close()
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)
