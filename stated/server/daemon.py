"""`stated serve`: the daemon process. grpc.aio on uvloop, on a unix socket, plus a metrics endpoint.

Start-up refuses a state directory another daemon holds, takes the socket's lock (a second daemon on the
socket refuses: stated.server.socket_guard), sweeps shared memory left by crashed daemons, and recovers
every job whose checkpoint it finds there (stated.durability.keeper). SIGTERM and SIGINT shut down
cleanly: every session whose state changed since its last checkpoint is checkpointed (for at most
--shutdown-timeout), clients are told UNAVAILABLE ("the stated daemon is shutting down"), shared memory
is removed, and so are the socket, its admin token file (stated.server.admin_file) and its lock when they
are still this daemon's; the checkpoints stay for the next daemon.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import fcntl
import glob
import grp
import logging
import os
import resource
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stated.backends.cpu import CpuBackend
from stated.backends.cpu_workers import CpuWorkers
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.server.admin_file import AdminFile
from stated.server.decoding import add_decoding
from stated.limits import Limits
from stated.server.private_socket import private_socket
from stated.server.servicer import StateServicer
from stated.server.socket_guard import SocketGuard
from stated.server.step_channel import StepChannel, check_path as check_step_path
from stated.durations import DEFAULT_RETAIN_SECONDS
from stated.store import Store
from stated.v1 import state_service_pb2_grpc as pb_grpc
from stated_client.address import socket_path
from stated_client.protocol import MESSAGE_OPTIONS, SERVICE_NAME, channel_path

PR_SET_DUMPABLE = 4
log = logging.getLogger("stated.server.daemon")


@dataclasses.dataclass
class DaemonConfig:
    socket: str
    metrics_addr: str = "127.0.0.1:9464"
    state_dir: str = ""
    group: str | None = None
    page_bytes: int = 64 << 20
    workers: int = 4
    # CPU kernel threads (stated.backends.cpu_workers); 0: torch's OpenMP threads only.
    cpu_threads: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    exit_with_parent: bool = False
    host_memory: int | None = None
    prefetch_depth: int = 4
    gpu_cache_bytes: int = 0
    gpu_staging_pages: int = 4
    checkpoint_every: int = 0
    retain_seconds: float = DEFAULT_RETAIN_SECONDS
    shutdown_timeout: float = 60.0
    limits: Limits = dataclasses.field(default_factory=Limits)  # Note [limits and their defaults]


def parse_hostport(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' -> (host, port); 'none' or '' -> None (no metrics endpoint)."""
    if text.lower() in ("", "none", "off"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-addr {text!r} is not HOST:PORT (for example 127.0.0.1:9464) or 'none'")
    return host.strip("[]") or "127.0.0.1", int(port)


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        try:
            self.gid = grp.getgrnam(config.group).gr_gid if config.group else None
        except KeyError:
            raise RuntimeError(f"--group {config.group!r} is not a group on this machine") from None
        self._state_lock = _hold_state_dir(config.state_dir) if config.state_dir else None
        self.path = socket_path(config.socket) or config.socket
        check_step_path(channel_path(self.path))  # before anything is created
        self.socket_guard = SocketGuard(self.path, self.gid)
        self.metrics = Metrics()
        self.cpu_workers = CpuWorkers(config.cpu_threads) if config.cpu_threads else None
        backend = CpuBackend(self.cpu_workers)
        paging = Paging(self.metrics, host_memory=config.host_memory, state_dir=config.state_dir,
                        prefetch_depth=config.prefetch_depth)
        self.store = Store(backend, config.page_bytes, paging=paging,
                           cuda_backend=self._make_cuda_backend, state_dir=config.state_dir,
                           retain_seconds=config.retain_seconds, checkpoint_every=config.checkpoint_every,
                           limits=config.limits)
        self.servicer = StateServicer(self.store, self.metrics, workers=config.workers, limits=config.limits)
        self.admin = AdminFile(self.path)
        self.servicer.admin = self.admin
        self.step_channel = StepChannel(self.servicer, config.limits)
        self.stopping = asyncio.Event()
        self.metrics_server = None
        self.metrics_port: int | None = None

    def _make_cuda_backend(self):
        """The CUDA backend, made when the first client registers CUDA tensors (CuPy loads only then)."""
        from stated.backends.cuda import CudaBackend

        return CudaBackend(self.config.page_bytes, self.config.gpu_cache_bytes, self.config.gpu_staging_pages,
                           self.metrics)

    async def run(self) -> None:
        # First of all: a second daemon on this socket refuses here (Note [one daemon per socket]).
        self.socket_guard.acquire()
        self.admin.create()  # Note [who sees what]
        self._recover()
        server = grpc.aio.server(options=MESSAGE_OPTIONS,
                                 maximum_concurrent_rpcs=self.config.limits.max_concurrent_rpcs)
        add_decoding(pb_grpc.add_StateServiceServicer_to_server, self.servicer, server, self.metrics)
        health_servicer = health.aio.HealthServicer()
        add_decoding(health_pb2_grpc.add_HealthServicer_to_server, health_servicer, server, self.metrics)
        bound = self.socket_guard.private_name()
        with private_socket(bound, self.gid):
            server.add_insecure_port(f"unix:{bound}")
            await server.start()
        self.socket_guard.publish(bound)
        await self.step_channel.start(channel_path(self.path), self.gid)
        self.servicer.step_socket = self.step_channel.path
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        hostport = parse_hostport(self.config.metrics_addr)
        if hostport is not None:
            self.metrics_server = self.metrics.serve(*hostport)
            self.metrics_port = self.metrics_server.server_port
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        watchdog = asyncio.create_task(self._watch_parent()) if self.config.exit_with_parent else None
        retention = asyncio.create_task(self._expire_retained())
        metrics_text = f"http://{hostport[0]}:{self.metrics_port}/metrics" if hostport else "off"
        budget = "unlimited" if self.config.host_memory is None else f"{self.config.host_memory} bytes"
        log.info("serving on unix:%s (metrics %s, page size %d bytes, host memory %s, pid %d)", self.path,
                 metrics_text, self.config.page_bytes, budget, os.getpid())
        try:
            await self.stopping.wait()
        finally:
            await self._shut_down(server, health_servicer, [watchdog, retention])

    async def _shut_down(self, server, health_servicer, tasks) -> None:
        log.info("shutting down: making %d sessions and %d retained jobs durable", len(self.store.sessions),
                 len(self.store.keeper.held))
        # Session calls are refused as UNAVAILABLE from here, and closing ends the Watch streams with it:
        # clients learn that the daemon stopped, not that their session never existed.
        self.servicer.stopping = True
        for task in tasks:
            if task is not None:
                task.cancel()
        await health_servicer.enter_graceful_shutdown()
        done, left = await self.servicer.make_durable(self.config.shutdown_timeout)
        if done or left:
            log.info("shutdown: %d checkpoints written, %d left at their last checkpoint", done, left)
        self.servicer.end_watches()
        await self.step_channel.stop()
        await server.stop(grace=1.0)
        self.servicer.close()
        if self.cpu_workers is not None:
            self.cpu_workers.close()
        self.store.paging.close()
        if self._state_lock is not None:
            os.close(self._state_lock)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.admin.remove()
        self.socket_guard.release()
        log.info("stopped")

    def _recover(self) -> None:
        started = time.monotonic()
        try:
            recovered = self.store.keeper.recover()
        except OSError as exc:
            raise RuntimeError(state_dir_unusable(self.config.state_dir, exc)) from None
        if recovered:
            log.info("recovered %d jobs from %s in %.2f s: %s", len(recovered), self.config.state_dir,
                     time.monotonic() - started,
                     ", ".join(f"{e.job} rank {e.rank} at step {e.step}" for e in recovered))

    async def _expire_retained(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.limits.watch_timeout / 4))
            try:
                await self.servicer.expire()
                await self.servicer.reap_unwatched()
            except Exception:  # noqa: BLE001
                log.exception("dropping retained jobs whose retention ran out, or unwatched sessions, failed")

    async def _watch_parent(self) -> None:
        """For an embedded daemon: stop when the process that started it is gone."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != parent:
                log.info("parent process %d is gone; stopping", parent)
                self.stopping.set()
                return


def _hold_state_dir(directory: str) -> int:
    """Creates the state directory and locks it for this daemon; removes the state files (the disk tier
    of pages, never checkpoints) that a daemon which died left there. Raises RuntimeError when another
    live daemon holds it."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RuntimeError(state_dir_unusable(directory, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another stated daemon uses --state-dir {directory}; stop it or pick another "
                           f"directory") from None
    stale = glob.glob(os.path.join(glob.escape(directory), "*.state"))
    for path in stale:
        os.unlink(path)
    if stale:
        log.info("removed %d page files left in %s by a daemon that is gone", len(stale), directory)
    return fd


def state_dir_unusable(directory: str, exc: OSError) -> str:
    reason = "it is not a directory" if exc.errno == errno.EEXIST else exc.strerror or str(exc)  # from makedirs
    return (f"--state-dir {directory} cannot be used: {reason}: {exc.filename or directory}; give a "
            f"directory this user can write (it holds the checkpoints and the page files)")


def _guard_process() -> None:
    """What `stated serve` sets on its own process (not on a daemon run inside another, as tests do):
    not dumpable, so that its own user cannot open its arenas through /proc/<pid>/fd or attach a
    debugger to read them (Note [arenas as file descriptors] in stated.arena_memory); and as many open
    files as the hard limit allows, for every CPU region holds two arena descriptors."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("could not make the daemon non-dumpable (errno %d): processes of its user can open "
                        "its arenas through /proc", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("could not make the daemon non-dumpable (%s): processes of its user can open its arenas "
                    "through /proc", exc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # a soft limit below the hard one stays; memfd_create's EMFILE says what to raise


def serve(config: DaemonConfig) -> int:
    import uvloop

    daemon = None
    _guard_process()
    try:
        daemon = Daemon(config)
        uvloop.run(daemon.run())
    except (RuntimeError, KeyError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        if daemon is not None:  # a start that failed half-way leaves no socket, admin file or lock behind
            daemon.admin.remove()
            daemon.socket_guard.release()
    return 0
