"""The daemon's life and the optimizer's: clean shutdown on SIGTERM and SIGINT, socket and directory
permissions, one daemon per socket, recovery from a daemon killed with SIGKILL (a stale socket; its
arenas' memory goes with it), log lines per attach and detach, the embedded default, and an optimizer that cannot
be copied and detaches on close().
"""

from __future__ import annotations

import copy
import gc
import grp
import io
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from support.daemon import DaemonProcess, named_segments


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def attach_and_register(proc: DaemonProcess, job: str | None = None, elements: int = 64) -> pb.SessionRef:
    """A raw session with two tensors registered (so it owns a param and a grad arena)."""
    channel, stub = proc.stub()
    with channel:
        session = stub.Attach(pb.AttachRequest(job=job or unique("raw"), rank=0, algorithm="adamw",
                                               pid=os.getpid())).session
        stub.Register(pb.RegisterRequest(
            session=session, groups=[pb.GroupHyperparameters(scalars={"lr": 1e-3})],
            tensors=[pb.TensorSpec(shape=[elements], dtype=pb.D_TYPE_FLOAT32), pb.TensorSpec(shape=[8, 8],
                                                                                    dtype=pb.D_TYPE_FLOAT32)]))
    return session


def live_sessions(proc: DaemonProcess) -> dict[str, pb.SessionStats]:
    channel, stub = proc.stub()
    with channel:
        return {s.id: s for s in stub.GetStats(proc.everything(), timeout=10).sessions}


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def train(model, opt, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()


def lines(log: str, what: str, session: str) -> list[str]:
    return [line for line in log.splitlines() if f" {what} job=" in line and f" session={session} " in line]


# --- shutdown ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly_with_sessions_attached(spawn, sig):
    proc = spawn("daemon")
    attach_and_register(proc)
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=unique("client"))
    train(model, opt)
    assert len(proc.segments()) == 4 and len(live_sessions(proc)) == 2

    assert proc.stop(sig) == 0
    assert proc.leaked_segments() == [], "shared memory left behind"
    assert not os.path.exists(proc.socket), "socket left behind"
    log = proc.log()
    # Nothing is dropped: both sessions were made durable for the next daemon (tests/e2e/test_durability.py).
    assert "shutting down: making 2 sessions and 0 retained jobs durable" in log
    assert "shutdown: 2 checkpoints written, 0 left at their last checkpoint" in log
    assert not [line for line in log.splitlines() if " detach job=" in line]
    checkpoints = os.path.join(proc.directory, "state", "checkpoints")
    assert sorted(os.listdir(os.path.join(checkpoints, opt.job, "rank-0"))) == [
        "3.manifest", "3.pages", "3.params", "3.small"]
    assert log.rstrip().endswith("stopped")
    assert "Traceback" not in log

    # The client left behind learns it from a StatedError, and its parameters stay usable.
    with pytest.raises(stated.DaemonUnavailableError, match=re.escape(proc.socket)):
        train(model, opt, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


# --- permissions ---------------------------------------------------------------------------------------


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_socket_is_0600_in_a_0700_directory(daemon):
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
    assert mode(daemon.socket) == 0o600
    assert mode(daemon.socket + ".step") == 0o600  # the step channel (stated.server.step_channel)
    assert mode(os.path.dirname(daemon.socket)) == 0o700


def test_group_gives_0660_socket_and_0750_directory(spawn):
    group = grp.getgrgid(os.getgid())
    proc = spawn("grouped", "--group", group.gr_name)
    directory = os.path.dirname(proc.socket)
    assert (mode(proc.socket), os.stat(proc.socket).st_gid) == (0o660, group.gr_gid)
    assert (mode(proc.socket + ".step"), os.stat(proc.socket + ".step").st_gid) == (0o660, group.gr_gid)
    assert (mode(directory), os.stat(directory).st_gid) == (0o750, group.gr_gid)
    attach_and_register(proc)
    # The group reaches the sockets only: the arenas have no name it could open (tests/security).
    assert len(proc.segments()) == 2 and proc.leaked_segments() == []
    assert proc.stop() == 0
    assert not os.path.exists(proc.socket)
    assert not os.path.exists(proc.socket + ".step")


# --- one daemon per socket, and recovery from a killed one ---------------------------------------------


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon, tmp_path):
    (tmp_path / "second").mkdir()
    second = DaemonProcess(tmp_path / "second")
    second.socket = daemon.socket
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        second.start()
    second.stop()
    assert f"cannot serve: another daemon is already serving on {daemon.socket}" in second.log()
    # The first one is untouched and serves on.
    assert daemon.healthy() and mode(daemon.socket) == 0o600
    session = attach_and_register(daemon)
    channel, stub = daemon.stub()
    with channel:
        stub.Detach(pb.DetachRequest(session=session))


def shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def test_killed_daemon_socket_is_taken_over_and_its_arenas_freed(spawn):
    first = spawn("killed")
    before = shmem_bytes()
    attach_and_register(first, elements=8 << 20)  # 32 MiB each arena, reserved at Register
    attach_and_register(first, elements=8 << 20)
    assert len(first.segments()) == 4
    assert shmem_bytes() - before >= 4 * (32 << 20) * 0.9
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    # SIGKILL leaves the socket behind, but the arenas' memory goes with the process that held it.
    assert stat.S_ISSOCK(os.stat(first.socket).st_mode)
    assert shmem_bytes() - before < 32 << 20, "the killed daemon's arenas still hold memory"
    assert first.leaked_segments() == []

    second = spawn("next", socket=first.socket)
    assert second.healthy()
    session = attach_and_register(second)
    assert list(live_sessions(second)) == [session.id]
    assert second.stop() == 0
    assert not os.path.exists(second.socket)


# --- log lines -------------------------------------------------------------------------------------------


def test_one_log_line_per_attach_and_per_detach(daemon, address):
    job = unique("logged")
    closed = stated.AdamW(small_model().parameters(), address=address, job=job, rank=0)
    collected = stated.SGD(small_model().parameters(), lr=0.1, address=address, job=job, rank=1)
    raw = attach_and_register(daemon, job=unique("raw"))
    ids = [closed.session_id, collected.session_id, raw.id]

    with pytest.raises(stated.AlreadyAttachedError):  # refused: no attach line
        stated.AdamW(small_model().parameters(), address=address, job=job, rank=0)
    closed.close()
    closed.close()  # a second close does nothing
    del collected
    gc.collect()  # the finalizer detaches
    channel, stub = daemon.stub()
    with channel:
        stub.Detach(pb.DetachRequest(session=raw))
        with pytest.raises(grpc.RpcError):
            stub.Detach(pb.DetachRequest(session=raw))  # already gone: NOT_FOUND, no second line

    log = daemon.log()
    for session in ids:
        assert len(lines(log, "attach", session)) == 1, session
        detach = lines(log, "detach", session)
        assert len(detach) == 1 and " reason=client " in detach[0], detach
    assert len([line for line in log.splitlines() if f" attach job={job} rank=0 " in line]) == 1
    assert not set(ids) & set(live_sessions(daemon))


# --- the optimizer object ----------------------------------------------------------------------------------


def test_optimizer_cannot_be_copied_or_pickled(address):
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=address, job=unique("copy"))
    try:
        train(model, opt, 1)
        for attempt, words in ((copy.deepcopy, "cannot be copied"), (copy.copy, "cannot be copied"),
                               (pickle.dumps, "cannot be pickled"), (lambda o: torch.save(o, io.BytesIO()),
                                                                     "cannot be pickled")):
            with pytest.raises(stated.NotCopyableError) as info:
                attempt(opt)
            assert isinstance(info.value, stated.StatedError) and isinstance(info.value, TypeError)
            assert words in str(info.value) and "AdamW" in str(info.value) and "state_dict()" in str(info.value)
        # The advice holds: the state_dict pickles, and the optimizer still works.
        assert pickle.loads(pickle.dumps(opt.state_dict()))["state"][0]["step"].item() == 1.0
        train(model, opt, 1)
    finally:
        opt.close()


def test_refused_watch_raises_a_stated_error_and_leaves_nothing_attached(daemon, address, monkeypatch):
    """The daemon refuses the optimizer's Watch (here: its token is wrong): the user sees the client's
    StatedError, not a grpc.RpcError, and the session Attach made is detached at once."""
    from stated_client.connection import Connection

    hold = Connection.hold

    def hold_with_a_wrong_token(self, method, request):
        if method == "Watch":
            request.session.token = b"not the session's token"
        return hold(self, method, request)

    job = unique("watch-refused")
    before = set(daemon.segments())
    monkeypatch.setattr(Connection, "hold", hold_with_a_wrong_token)
    with pytest.raises(stated.PermissionDeniedError) as info:
        stated.AdamW(small_model().parameters(), address=address, job=job, rank=0)
    assert not isinstance(info.value, grpc.RpcError) and "session.token" in str(info.value)
    assert [s for s in live_sessions(daemon).values() if s.job == job] == []
    assert set(daemon.segments()) == before
    monkeypatch.undo()
    # Nothing is left attached under that job and rank: attaching again is not refused as ALREADY_EXISTS.
    opt = stated.AdamW(small_model().parameters(), address=address, job=job, rank=0)
    opt.close()


def test_close_detaches_and_frees_the_sessions_arenas(daemon, address):
    before = set(daemon.segments())
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=address, job=unique("closed"))
    train(model, opt, 2)
    mine = set(daemon.segments()) - before
    assert len(mine) == 2 and live_sessions(daemon)[opt.session_id].steps == 2
    opt.close()
    assert opt.session_id not in live_sessions(daemon)
    assert not mine & set(daemon.segments())
    # The parameters stay usable (they keep the memory they mapped).
    assert model(torch.randn(2, 4)).shape == (2, 2)


# --- the embedded default ----------------------------------------------------------------------------------

EMBEDDED_SCRIPT = textwrap.dedent("""
    import json, os, torch, stated
    from stated_client import embedded

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = stated.AdamW(model.parameters(), lr=1e-2)
    other = stated.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # shares the same private daemon
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with open("/proc/self/maps") as maps:
        segments = sorted({line.split()[4] for line in maps if "/memfd:stated-" in line})
    print(json.dumps(dict(pid=embedded._daemon.process.pid, directory=embedded._daemon.directory,
                          target=embedded._daemon.target, addresses=[opt.address, other.address],
                          segments=segments, first=losses[0], last=losses[-1])))
""")


def test_embedded_default_starts_a_private_daemon_and_leaves_nothing(tmp_path):
    # The default socket, where nothing listens (a given address that does not answer is an error instead).
    nowhere = tmp_path / "run" / "stated" / "stated.sock"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STATED_EMBEDDED", "STATED_ADDRESS")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path / "run"), TMPDIR=str(tmp))
    run = subprocess.run([sys.executable, "-c", EMBEDDED_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])

    assert run.stderr.count("started a private one") == 1, run.stderr
    assert str(nowhere) in run.stderr  # says where it looked
    assert report["addresses"] == [report["target"]] * 2
    assert report["directory"].startswith(str(tmp))
    assert len(report["segments"]) == 4  # two optimizers' param and grad arenas, by inode
    assert report["last"] < report["first"]

    # At exit: the private daemon is gone, and so is everything of stated in /dev/shm and the temp dir.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{report['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{report['pid']}"), "the private daemon outlived its process"
    assert named_segments() == []
    assert os.listdir(tmp) == []
    assert not nowhere.exists()
