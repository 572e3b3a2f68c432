"""Starting and stopping a real `stated serve` process for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from stated.v1 import state_service_pb2 as pb
from stated.v1 import state_service_pb2_grpc as pb_grpc
from stated_client.protocol import admin_path


class DaemonProcess:
    def __init__(self, directory, *extra: str):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.socket = os.path.join(self.directory, "run", "stated.sock")
        self.log_path = os.path.join(self.directory, "daemon.log")
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None
        self.metrics_port: int | None = None
        self.runner: list[str] = []  # a command the daemon runs under, such as setpriv for another user's uid

    @property
    def address(self) -> str:
        return "unix://" + self.socket

    def start(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, STATED_EMBEDDED="0")
        self.process = subprocess.Popen(
            [*self.runner, sys.executable, "-m", "stated", "serve", "--socket", self.socket, "--metrics-addr", "127.0.0.1:0",
             "--state-dir", os.path.join(self.directory, "state"), *self.extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            match = re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", self.log())
            if match and self.healthy():
                self.metrics_port = int(match.group(1))
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start:\n{self.log()}")

    def healthy(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stub(self) -> tuple[grpc.Channel, pb_grpc.StateServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, pb_grpc.StateServiceStub(channel)

    def admin_token(self) -> bytes:
        """The daemon's admin token (Note [who sees what] in stated.server.admin_file), which this suite, run
        as root or as the daemon's user, may read."""
        with open(admin_path(self.socket)) as f:
            return bytes.fromhex(f.read().strip())

    def everything(self) -> pb.GetStatsRequest:
        """A GetStats request that sees every session and job (with the admin token)."""
        return pb.GetStatsRequest(admin_token=self.admin_token())

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def samples(self) -> dict[tuple, float]:
        """Every sample of the metrics endpoint: (name, sorted labels) -> value."""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.scrape()) for s in family.samples}

    def segments(self) -> list[str]:
        """The arenas this daemon holds open, as "params:<inode>" / "grads:<inode>" (its memfds, seen through
        /proc/<pid>/fd: the tests run as root, whom the daemon's being non-dumpable does not stop)."""
        return arenas_of(f"/proc/{self.process.pid}") if self.process is not None else []

    def leaked_segments(self) -> list[str]:
        """stated names in /dev/shm: arenas are memfds now, so there must never be any."""
        return named_segments()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def arenas_of(proc: str) -> list[str]:
    """The stated arenas (memfds) a process holds open, as "<kind>:<inode>"."""
    found = set()
    try:
        names = os.listdir(f"{proc}/fd")
    except OSError:
        return []
    for name in names:
        try:
            target = os.readlink(f"{proc}/fd/{name}")
            if target.startswith("/memfd:stated-"):
                found.add(f"{target.split()[0].removeprefix('/memfd:stated-')}:{os.stat(f'{proc}/fd/{name}').st_ino}")
        except OSError:
            continue  # closed meanwhile
    return sorted(found)


def named_segments() -> list[str]:
    """Names under /dev/shm that look like stated's (tests' own scratch directories aside)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("stated-") and not n.startswith("stated-test-"))
