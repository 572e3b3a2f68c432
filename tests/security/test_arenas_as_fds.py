"""Arenas are file descriptors (Note [arenas as file descriptors] in stated.arena_memory): no stated name
in /dev/shm; an arena goes only to its authenticated session, over the step socket; no other process,
not even one of the daemon's and the trainer's own uid, can open it; the memory is reserved at Register,
so a Register beyond the machine's memory is RESOURCE_EXHAUSTED and allocates nothing; and the file is
sealed, so a trainer that truncates its arena cannot crash the daemon. A bystander job trains beside
each attempt and stays equal to torch.optim.AdamW bit for bit.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.protocol import (ARENA_SIZE, ARENAS, ERROR, HEADER, MESSAGE, REGION, frame,
                                    parse_error)
from stated_client.step_line import read_exactly
from support.daemon import DaemonProcess, named_segments

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADAMW = pb.GroupHyperparameters(scalars={"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                         "weight_decay": 1e-2})
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="processes of another uid (65534) need root and setpriv")


class Bystander:
    """Another job training beside the test: stated.AdamW and torch's fused AdamW from the same start."""

    def __init__(self, address: str):
        torch.manual_seed(3)
        self.ours, self.ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        self.ref.load_state_dict(self.ours.state_dict())
        self.opt = stated.AdamW(self.ours.parameters(), lr=1e-2, address=address, job="bystander")
        self.ref_opt = torch.optim.AdamW(self.ref.parameters(), lr=1e-2, fused=True)  # the kernel the daemon runs

    def train(self, steps: int = 3) -> None:
        for _ in range(steps):
            x = torch.randn(16, 8)
            for model, opt in ((self.ours, self.opt), (self.ref, self.ref_opt)):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()

    def exact(self) -> bool:
        return all(torch.equal(p, q) for p, q in zip(self.ours.parameters(), self.ref.parameters()))


def shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def attach_and_register(stub, elements: int, job: str = "raw") -> tuple[pb.SessionRef, pb.RegisterResponse, str]:
    attached = stub.Attach(pb.AttachRequest(job=job, rank=0, algorithm="adamw", pid=os.getpid()))
    reply = stub.Register(pb.RegisterRequest(session=attached.session, groups=[ADAMW], tensors=[
        pb.TensorSpec(shape=[elements], dtype=pb.D_TYPE_FLOAT32)]))
    return attached.session, reply, attached.step_socket


def connect(path: str, session: pb.SessionRef | None) -> socket.socket:
    """A step socket connection, authenticated as `session` when one is given."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    if session is not None:
        sock.sendall(frame(MESSAGE, session.SerializeToString()))
        assert reply_of(sock) == (MESSAGE, b"", [])
    return sock


def reply_of(sock: socket.socket) -> tuple[int, bytes, list[int]]:
    """The daemon's next frame: (kind, payload, descriptors that came with it)."""
    data, fds, _, _ = socket.recv_fds(sock, HEADER.size, 4, socket.MSG_CMSG_CLOEXEC)
    data += read_exactly(sock, HEADER.size - len(data))
    length, kind = HEADER.unpack(data)
    return kind, read_exactly(sock, length), fds


def request_arenas(sock: socket.socket, region: int) -> tuple[int, bytes, list[int]]:
    sock.sendall(frame(ARENAS, REGION.pack(region)))
    return reply_of(sock)


def test_arenas_come_as_sealed_memfds_reserved_at_register_and_nothing_is_named(daemon):
    bystander = Bystander(daemon.address)
    bystander.train()
    channel, stub = daemon.stub()
    with channel:
        before = shmem_bytes()
        session, reply, step_socket = attach_and_register(stub, 4 << 20)  # 16 MiB each arena
        # Reserved when promised, before anyone touched a page.
        assert shmem_bytes() - before >= 2 * (16 << 20) * 0.9
        assert named_segments() == [] and bystander.opt._step_socket == step_socket
        with connect(step_socket, session) as sock:
            kind, payload, fds = request_arenas(sock, reply.region)
            try:
                assert (kind, ARENA_SIZE.unpack(payload)[0], len(fds)) == (ARENAS, 16 << 20, 2)
                for fd in fds:
                    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:stated-")
                    assert os.fstat(fd).st_size == 16 << 20 and os.fstat(fd).st_blocks * 512 >= 16 << 20
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == (
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
                    # A trainer that truncates (or grows) its arena is refused instead of crashing the daemon.
                    for size in (0, 4096, 64 << 20):
                        with pytest.raises(PermissionError):
                            os.ftruncate(fd, size)
                    with pytest.raises(PermissionError):
                        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
                # The arena is the one the daemon steps: a gradient written through the descriptor moves the
                # parameter written through it.
                params = torch.frombuffer(mmap.mmap(fds[0], 16 << 20), dtype=torch.float32)
                grads = torch.frombuffer(mmap.mmap(fds[1], 16 << 20), dtype=torch.float32)
                params.fill_(1.0)
                grads.fill_(0.5)
                # A region out of range is refused, naming it, and the connection goes on.
                kind, payload, more = request_arenas(sock, 7)
                assert (kind, more) == (ERROR, [])
                assert parse_error(payload) == ("INVALID_ARGUMENT", "region is 7 but the session has 1 regions")
            finally:
                for fd in fds:
                    os.close(fd)
        stub.Step(pb.StepRequest(session=session, step=1, groups=[ADAMW], has_grad=b"\x01"))
        # AdamW's first step moves every element by lr against the gradient's sign, after the decay.
        assert torch.allclose(params[:4], torch.full((4,), (1 - 1e-2 * 1e-2) - 1e-2))
        stub.Detach(pb.DetachRequest(session=session))
    bystander.train()
    assert bystander.exact()
    bystander.opt.close()


def test_arenas_go_only_to_an_authenticated_connection_of_the_session(daemon):
    channel, stub = daemon.stub()
    with channel:
        session, reply, step_socket = attach_and_register(stub, 64)
        # Before authentication an arena request is no frame the daemon takes: refused, connection closed.
        with connect(step_socket, None) as sock:
            kind, payload, fds = request_arenas(sock, 0)
            assert (kind, fds) == (ERROR, [])
            assert parse_error(payload) == ("INVALID_ARGUMENT",
                                            "frame kind 2 is not a message (0) or a credential request (3)")
            assert sock.recv(1) == b""
        # With the session id but another token: refused at the SessionRef, nothing sent.
        stolen = pb.SessionRef(id=session.id, token=bytes(16))
        with connect(step_socket, None) as sock:
            sock.sendall(frame(MESSAGE, stolen.SerializeToString()))
            kind, payload, fds = reply_of(sock)
            assert (kind, fds) == (ERROR, []) and parse_error(payload)[0] == "PERMISSION_DENIED"
            assert "session.token" in parse_error(payload)[1]
        stub.Detach(pb.DetachRequest(session=session))
        # A detached session's arenas are nobody's.
        with connect(step_socket, None) as sock:
            sock.sendall(frame(MESSAGE, session.SerializeToString()))
            kind, payload, fds = reply_of(sock)
            assert (kind, fds) == (ERROR, []) and parse_error(payload)[0] == "NOT_FOUND"


def test_a_register_beyond_the_machines_memory_is_resource_exhausted_and_allocates_nothing(spawn):
    # No --max-job-bytes cap, so that the arenas' own check is the one that refuses.
    proc = spawn("huge", "--max-job-bytes", "none")
    bystander = Bystander(proc.address)
    bystander.train()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    channel, stub = proc.stub()
    with channel:
        before = shmem_bytes()
        attached = stub.Attach(pb.AttachRequest(job="greedy", rank=0, algorithm="adamw", pid=os.getpid()))
        with pytest.raises(grpc.RpcError) as info:  # each arena as large as the machine's memory
            stub.Register(pb.RegisterRequest(session=attached.session, groups=[ADAMW], tensors=[
                pb.TensorSpec(shape=[total // 4], dtype=pb.D_TYPE_FLOAT32)]))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "the param and grad arenas need" in info.value.details() and "available" in info.value.details()
        assert shmem_bytes() - before < 8 << 20
        assert proc.process.poll() is None and len(proc.segments()) == 2  # alive, holding the bystander's only
        # The session is still usable for a Register that fits.
        stub.Register(pb.RegisterRequest(session=attached.session, groups=[ADAMW], tensors=[
            pb.TensorSpec(shape=[16], dtype=pb.D_TYPE_FLOAT32)]))
        stub.Detach(pb.DetachRequest(session=attached.session))
    bystander.train()
    assert bystander.exact()
    bystander.opt.close()
    assert "Traceback" not in proc.log()


def memory_cgroup(limit: int):
    """A fresh child of this process's memory cgroup (v2 memory.max, or v1 memory.limit_in_bytes) limited
    to `limit` bytes, as (its directory, the limit file); None where none can be made (no root, no
    memory controller)."""
    with open("/proc/self/cgroup") as f:
        lines = [line.strip().split(":", 2) for line in f]
    for hierarchy, controllers, path in (p for p in lines if len(p) == 3):
        if hierarchy == "0" and controllers == "":
            root, limit_file = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, limit_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        directory = os.path.join(root, path.lstrip("/"), f"stated-test-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            os.mkdir(directory)
        except OSError:
            continue
        try:
            with open(os.path.join(directory, limit_file), "w") as f:
                f.write(str(limit))
            return directory
        except OSError:
            os.rmdir(directory)
    return None


def test_a_register_beyond_the_daemons_cgroup_limit_is_resource_exhausted(tmp_path):
    """A daemon in a container or a systemd slice with a memory limit: a Register that would go past it
    is refused naming the cgroup, where the kernel's OOM killer would otherwise kill the daemon (and every
    session with it) when the arenas are reserved."""
    cgroup = memory_cgroup(400 << 20)
    if cgroup is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    proc = DaemonProcess(tmp_path / "limited")
    proc.runner = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"']
    try:
        proc.start()
        channel, stub = proc.stub()
        with channel:
            attached = stub.Attach(pb.AttachRequest(job="greedy", rank=0, algorithm="adamw", pid=os.getpid()))
            with pytest.raises(grpc.RpcError) as info:  # 2 x 200 MB of arenas in a 400 MiB cgroup
                stub.Register(pb.RegisterRequest(session=attached.session, groups=[ADAMW], tensors=[
                    pb.TensorSpec(shape=[50_000_000], dtype=pb.D_TYPE_FLOAT32)]), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "the daemon's cgroup (its memory limit)" in info.value.details()
            stub.Register(pb.RegisterRequest(session=attached.session, groups=[ADAMW], tensors=[
                pb.TensorSpec(shape=[1 << 20], dtype=pb.D_TYPE_FLOAT32)]), timeout=60)  # one that fits
            stub.Detach(pb.DetachRequest(session=attached.session))
        assert proc.process.poll() is None, proc.log()
    finally:
        proc.stop()
        os.rmdir(cgroup)


VICTIM = textwrap.dedent("""
    import json, sys, torch, stated
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(ours.state_dict())
    opt = stated.AdamW(ours.parameters(), lr=1e-2, address=sys.argv[1], job="victim")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    def train():
        for _ in range(3):
            x = torch.randn(16, 8)
            for model, o in ((ours, opt), (ref, ref_opt)):
                o.zero_grad()
                model(x).square().mean().backward()
                o.step()
    train()
    print(json.dumps({"attached": True}), flush=True)
    sys.stdin.readline()
    train()
    print(json.dumps({"exact": all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))}))
    opt.close()
""")

ATTACKER = textwrap.dedent("""
    import json, os, sys
    opened, refused = [], 0
    for pid in sys.argv[1:]:
        for where in ("fd", "map_files"):
            try:
                names = os.listdir(f"/proc/{pid}/{where}")
            except OSError:
                refused += 1
                continue
            for name in names:
                path = f"/proc/{pid}/{where}/{name}"
                try:
                    target = os.readlink(path)
                except OSError:
                    refused += 1
                    continue
                if "stated" not in target:
                    continue
                try:
                    os.close(os.open(path, os.O_RDWR))
                    opened.append(f"{path} -> {target}")
                except OSError:
                    refused += 1
    named = [n for n in os.listdir("/dev/shm") if n.startswith("stated-")]
    print(json.dumps({"uid": os.getuid(), "opened": opened, "refused": refused, "named": named}))
""")


def run_as(uid: int, *command: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "client"), os.path.join(ROOT, "kernels")]),
               HOME="/tmp", STATED_EMBEDDED="0", STATED_TRUST_UIDS=str(NOBODY))
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@needs_root
def test_no_process_of_the_same_or_another_uid_can_open_a_sessions_arena():
    """Daemon, victim trainer and attacker all run as uid 65534 (the attacker is the daemon's own user, who
    could open a named segment of any mode); another attacker runs as uid 65533. Neither opens any arena
    through /proc/<pid>/fd or /proc/<pid>/map_files of the daemon or the victim, and /dev/shm holds no
    stated name; the victim then trains on, equal to torch."""
    directory = tempfile.mkdtemp(prefix="stated-fds-")
    os.chown(directory, NOBODY, NOBODY)
    proc = DaemonProcess(directory)
    proc.runner = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc.start()
    victim = None
    try:
        victim = run_as(NOBODY, sys.executable, "-c", VICTIM, proc.address, stdin=subprocess.PIPE)
        assert json.loads(victim.stdout.readline() or "{}") == {"attached": True}, victim.stderr.read()
        assert len(proc.segments()) == 2  # root sees the daemon's two arenas: they are there to be found
        for uid in (NOBODY, NOBODY - 1):
            attacker = run_as(uid, sys.executable, "-c", ATTACKER, str(proc.process.pid), str(victim.pid))
            out, err = attacker.communicate(timeout=60)
            assert attacker.returncode == 0, err
            report = json.loads(out)
            assert report["uid"] == uid and report["opened"] == [] and report["named"] == [], (report, proc.process.pid, victim.pid)
        victim.stdin.write("go\n")
        victim.stdin.flush()
        out, err = victim.communicate(timeout=60)
        assert victim.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"exact": True}
    finally:
        if victim is not None and victim.poll() is None:
            victim.kill()
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


# A trainer (uid 65534) whose arena mapping first has another process of its own uid (a forked child)
# open the very descriptors it has just received, through /proc/<trainer>/fd, the only moment they are
# in its table.
WINDOW = textwrap.dedent("""
    import json, os, sys, torch, stated
    from stated_client import arena_receiving
    tries, original = [], arena_receiving.map_descriptor
    def probe(fd, nbytes):
        parent, child = os.getpid(), os.fork()  # the child: another process of the trainer's uid
        if child == 0:
            try:
                os.close(os.open(f"/proc/{parent}/fd/{fd}", os.O_RDONLY))
                os._exit(0)
            except PermissionError:
                os._exit(13)
            except BaseException:
                os._exit(1)
        tries.append({0: "opened", 13: "PermissionError"}.get(os.waitpid(child, 0)[1] >> 8, "other"))
        return original(fd, nbytes)
    arena_receiving.map_descriptor = probe
    opt = stated.AdamW(torch.nn.Linear(4, 2).parameters(), address=sys.argv[1], job="window")
    opt.close()
    print(json.dumps(tries))
""")


@needs_root
def test_the_arenas_descriptors_are_closed_to_the_trainers_own_user_while_it_maps_them():
    """Between receiving the descriptors and closing them the trainer is not dumpable, so another process of
    its user cannot open them through /proc/<trainer>/fd (it could, before: an attacker racing
    add_param_group got 98 of 400 arenas)."""
    directory = tempfile.mkdtemp(prefix="stated-window-")
    os.chown(directory, NOBODY, NOBODY)
    proc = DaemonProcess(directory)
    proc.runner = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc.start()
    try:
        trainer = run_as(NOBODY, sys.executable, "-c", WINDOW, proc.address)
        out, err = trainer.communicate(timeout=120)
        assert trainer.returncode == 0, err
        tries = json.loads(out.splitlines()[-1])
        assert len(tries) == 2 and all("PermissionError" in t for t in tries), tries
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_session_that_never_reads_its_arena_answers_holds_up_no_one(spawn):
    """Arena requests sent until the socket takes no more, none read: the daemon's thread for that
    connection blocks in its send, but not under the session's lock, so the session still steps and
    detaches over gRPC, and a SIGTERM then checkpoints every other job within --shutdown-timeout."""
    proc = spawn("unread", "--shutdown-timeout", "20s")
    channel, stub = proc.stub()
    with channel:
        hog, _, step_socket = attach_and_register(stub, 1024, job="hog")
        sock = connect(step_socket, hog)
        sock.setblocking(False)
        sent = 0
        while True:
            try:
                sock.send(frame(ARENAS, REGION.pack(0)))
                sent += 1
            except BlockingIOError:
                break
        assert sent > 100
        victim, _, _ = attach_and_register(stub, 1024, job="victim")
        for session in (hog, victim):
            stub.Step(pb.StepRequest(session=session, step=1, groups=[ADAMW], has_grad=b"\x01"), timeout=10)
        stub.Detach(pb.DetachRequest(session=hog), timeout=15)
        stub.Step(pb.StepRequest(session=victim, step=2, groups=[ADAMW], has_grad=b"\x01"), timeout=10)
    proc.stop(timeout=60)
    assert "job=victim rank=0 not made durable" not in proc.log(), proc.log()[-2000:]
    assert "shutdown: 1 checkpoints written, 0 left" in proc.log(), proc.log()[-2000:]
    sock.close()


def test_registers_stop_short_of_the_open_files_limit_naming_it(tmp_path):
    """Under a small open-files limit: Registers beyond it are RESOURCE_EXHAUSTED naming the limit (not
    INTERNAL, and not whatever needed a descriptor next), and the daemon goes on serving the sessions it
    holds; --max-groups-per-session bounds what one session may take."""
    proc = DaemonProcess(tmp_path / "nofile", "--max-groups-per-session", "40")
    proc.runner = ["prlimit", "--nofile=300:300", "--"]
    proc.start()
    try:
        channel, stub = proc.stub()
        with channel:
            hog, _, _ = attach_and_register(stub, 16, job="hog")
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(60):
                    stub.Register(pb.RegisterRequest(session=hog, groups=[ADAMW], tensors=[
                        pb.TensorSpec(shape=[16], dtype=pb.D_TYPE_FLOAT32)]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "--max-groups-per-session=40" in info.value.details()
            refusals = []
            for job in range(20):  # sessions of a few groups each, until the descriptors run short
                try:
                    session, _, _ = attach_and_register(stub, 16, job=f"more-{job}")
                    for _ in range(3):
                        stub.Register(pb.RegisterRequest(session=session, groups=[ADAMW], tensors=[
                            pb.TensorSpec(shape=[16], dtype=pb.D_TYPE_FLOAT32)]))
                except grpc.RpcError as exc:
                    refusals.append((exc.code(), exc.details()))
            assert refusals, "the open-files limit was never reached"
            for code, details in refusals:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                assert "open-files limit" in details, details
            stub.Step(pb.StepRequest(session=hog, step=1, groups=[ADAMW] * 40, has_grad=b"\x01" * 40), timeout=10)
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()
