"""Jobs belong to the user who attached them first (Note [job owners] in stated.job_owners).

On a daemon that several users reach (`--group`), another user may neither resume a job's retained
state, nor take a rank of a live one, nor step through a session token that leaked; the owner survives a
daemon restart (the manifest records it); root may take any job. The other user is `nobody` (uid 65534),
a real process that this suite, run as root, starts under that uid.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.protocol import HEADER, MESSAGE, channel_path, frame
from stated_client.step_line import fetch_credential
from support.daemon import DaemonProcess

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=+dac_override",
             "--ambient-caps=+dac_override"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="a process of another user (uid 65534) needs root and setpriv")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def daemon():
    """A root daemon whose socket the group nogroup (nobody's) may reach."""
    directory = tempfile.mkdtemp(prefix="stated-owners-")
    os.chmod(directory, 0o755)
    proc = DaemonProcess(directory, "--group", "nogroup")
    proc.start()
    yield proc
    proc.stop()
    shutil.rmtree(directory, ignore_errors=True)


def as_nobody(daemon: DaemonProcess, body: str) -> dict:
    """Runs `body` as uid 65534 in a fresh interpreter; it sets `result` (a dict), printed as JSON."""
    script = textwrap.dedent("""
        import json, torch, stated
        params = [torch.nn.Parameter(torch.ones(8))]
        def attempt(**kw):
            try:
                opt = stated.AdamW(params, address=ADDRESS, **kw)
            except stated.StatedError as exc:
                return {"error": type(exc).__name__, "message": str(exc)}
            return {"opt": opt}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "client"),
                                                       os.path.join(ROOT, "kernels")]),
               HOME="/tmp", STATED_EMBEDDED="0")
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", f"ADDRESS = {daemon.address!r}\n" + script],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def trained(daemon: DaemonProcess, job: str, steps: int = 3, rank: int = 0) -> stated.AdamW:
    params = [torch.nn.Parameter(torch.ones(8))]
    opt = stated.AdamW(params, lr=0.1, address=daemon.address, job=job, rank=rank)
    for _ in range(steps):
        params[0].grad = torch.full((8,), 0.5)
        opt.step()
    return opt


def test_another_user_may_not_resume_a_retained_job_but_root_may(daemon):
    trained(daemon, "alice-run").close(keep=True)
    tried = as_nobody(daemon, """
        got = attempt(job="alice-run", resume=True)
        result = {k: v for k, v in got.items() if k != "opt"}
    """)
    assert tried["error"] == "PermissionDeniedError", tried
    assert "job 'alice-run' belongs to uid 0; uid 65534 may not attach" in tried["message"]
    params = [torch.nn.Parameter(torch.ones(8))]
    resumed = stated.AdamW(params, lr=0.1, address=daemon.address, job="alice-run", resume=True)
    assert resumed.resumed_step == 3  # the refusal kept the retained state whole
    resumed.close()


def test_another_user_may_not_take_a_rank_of_a_live_job(daemon):
    opt = trained(daemon, "alice-live", steps=1)
    tried = as_nobody(daemon, """
        got = attempt(job="alice-live", rank=1)
        result = {k: v for k, v in got.items() if k != "opt"}
    """)
    assert tried["error"] == "PermissionDeniedError" and "belongs to uid 0" in tried["message"], tried
    opt.close()


def test_the_owner_survives_a_daemon_restart(daemon):
    opt = trained(daemon, "alice-durable")
    assert opt.checkpoint() == 3
    opt.close(keep=True)
    daemon.stop()
    daemon.start()
    tried = as_nobody(daemon, """
        got = attempt(job="alice-durable", resume=True)
        result = {k: v for k, v in got.items() if k != "opt"}
    """)
    assert tried["error"] == "PermissionDeniedError" and "belongs to uid 0" in tried["message"], tried
    params = [torch.nn.Parameter(torch.ones(8))]
    resumed = stated.AdamW(params, lr=0.1, address=daemon.address, job="alice-durable", resume=True)
    assert resumed.resumed_step == 3
    resumed.close()


def test_a_users_own_job_is_theirs_and_root_may_take_it(daemon):
    mine = as_nobody(daemon, """
        got = attempt(job="nobodys-run", lr=0.1)
        opt = got["opt"]
        params[0].grad = torch.full((8,), 0.5)
        opt.step()
        opt.close(keep=True)
        result = {"value": params[0][0].item()}
    """)
    assert mine["value"] < 1.0  # it stepped
    params = [torch.nn.Parameter(torch.ones(8))]
    resumed = stated.AdamW(params, lr=0.1, address=daemon.address, job="nobodys-run", resume=True)
    assert resumed.resumed_step == 1
    assert params[0][0].item() == mine["value"]  # the arena came back with nobody's weights
    resumed.close()


def attach(daemon: DaemonProcess, job: str, credential: bytes = b"", rank: int = 0, resume: bool = False):
    channel, stub = daemon.stub()
    with channel:
        return stub.Attach(pb.AttachRequest(job=job, rank=rank, algorithm="adamw", pid=os.getpid(), resume=resume,
                                            credential=credential), timeout=30)


def test_an_attach_without_a_credential_may_only_use_jobs_nobody_owns(daemon):
    trained(daemon, "owned").close(keep=True)
    with pytest.raises(grpc.RpcError) as refused:
        attach(daemon, "owned", resume=True)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "carries no credential" in refused.value.details()
    assert attach(daemon, "nobodys-at-all").session.id  # no owner: anyone may
    assert attach(daemon, "nobodys-at-all", rank=1).session.id


def test_a_credential_is_good_for_one_attach(daemon):
    credential = fetch_credential(channel_path(daemon.socket), timeout=10)
    assert len(credential) == 16
    assert attach(daemon, "once", credential).session.id
    for bad in (credential, b"x" * 16):
        with pytest.raises(grpc.RpcError) as refused:
            attach(daemon, "once", bad, rank=1)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "AttachRequest.credential is not one this daemon handed out" in refused.value.details()


def test_a_leaked_session_token_is_no_way_in_for_another_user(daemon):
    opt = trained(daemon, "alice-token", steps=1)
    ref = opt._session
    tried = as_nobody(daemon, f"""
        import socket, struct
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect({channel_path(daemon.socket)!r})
        from stated.v1 import state_service_pb2 as pb
        from stated_client.protocol import MESSAGE, frame
        sock.sendall(frame(MESSAGE, pb.SessionRef(id={ref.id!r}, token={ref.token!r}).SerializeToString()))
        data = b""
        while len(data) < 5 or len(data) < 5 + struct.unpack("<I", data[:4])[0]:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        result = {{"kind": data[4], "payload": data[5:].decode()}}
    """)
    assert tried["kind"] == 1 and tried["payload"].startswith("PERMISSION_DENIED\n"), tried
    assert "belongs to uid 0; this connection comes from uid 65534" in tried["payload"]
    params = opt.param_groups[0]["params"]
    params[0].grad = torch.full((8,), 0.5)
    opt.step()  # the owner's session goes on
    opt.close()


def test_a_credential_request_with_a_payload_is_refused(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(channel_path(daemon.socket))
        sock.sendall(frame(3, b"junk"))
        length, kind = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
        payload = sock.recv(length, socket.MSG_WAITALL).decode()
    assert kind != MESSAGE and payload.startswith("INVALID_ARGUMENT\n") and "credential request is empty" in payload
