"""The step channel: Step requests over a plain unix socket beside the gRPC one.

A step is one round trip, and on small models that round trip is most of the cost stated adds: a gRPC
unary call takes about 1 ms on a 2-vCPU machine (several thread hand-offs on each side), a plain
unix socket ping-pong about 0.1 ms (PERFORMANCE.md). So the daemon also listens on `<socket>.step`
(same directory, same permissions) for the one call that happens every step. Everything else stays on
gRPC, and gRPC's Step stays too: the channel is only a faster wire for the same request.

Protocol (every integer little-endian). A frame is a 4-byte length, a 1-byte kind and a payload:

    kind 0  a protobuf message: the client sends SessionRef first (the channel's session, checked as a
            gRPC call's would be), then StepRequests (their `session` is ignored: the channel is bound);
            the daemon answers the SessionRef with an empty kind-0 frame and each StepRequest with a
            StepResponse
    kind 1  an error, from the daemon: "<gRPC status name>\n<message>"; after a refused SessionRef or a
            malformed frame the daemon closes the connection, after a refused step it goes on

Steps go through the same validation, session lock and engine as gRPC's Step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

from google.protobuf.message import DecodeError

from stated.errors import InvalidArgument, ServiceError
from stated.v1 import state_service_pb2 as pb

log = logging.getLogger("stated.step_channel")

HEADER = struct.Struct("<IB")
MESSAGE, ERROR = 0, 1
# has_grad holds one byte per tensor (up to 1M tensors per Register) and groups a few scalars each.
MAX_FRAME_BYTES = 64 << 20
SUFFIX = ".step"
# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def channel_path(grpc_socket: str) -> str:
    return grpc_socket + SUFFIX


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def error_frame(code: str, message: str) -> bytes:
    return frame(ERROR, f"{code}\n{message}".encode())


class StepChannel:
    """The daemon's end: accepts connections and applies their steps through `servicer.apply_step`."""

    def __init__(self, servicer):
        self.servicer = servicer
        self.server: asyncio.AbstractServer | None = None
        self.path = ""
        self.connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self, path: str, gid: int | None) -> None:
        """Listens on `path`; when the path is too long for a unix socket, offers no channel (clients then
        step over gRPC) and says so."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            log.warning("no step channel: %s is longer than a unix socket path may be (%d bytes); steps go over "
                        "gRPC, about 1 ms slower each; a shorter --socket path turns it on", path, MAX_SOCKET_PATH)
            return
        try:
            os.unlink(path)  # the gRPC socket was free, so this one belongs to a daemon that is gone
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path)
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        # Connections outlive their listener. Closing their sockets ends their loops normally (a
        # cancelled handler task would be reported by asyncio as an error).
        for writer in list(self.connections.values()):
            writer.close()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections[task] = writer
        try:
            session = await self._hello(reader, writer)
            while session is not None:
                payload = await self._read(reader, writer)
                if payload is None:
                    return
                try:
                    request = pb.StepRequest.FromString(payload)
                except DecodeError as exc:
                    self.servicer.metrics.errors.labels(InvalidArgument.code.name).inc()
                    writer.write(error_frame(InvalidArgument.code.name, f"the frame is not a StepRequest: {exc}"))
                    return
                try:
                    response = await self.servicer.apply_step(session.id, session.token, request)
                except ServiceError as exc:
                    self.servicer.metrics.errors.labels(exc.code.name).inc()
                    writer.write(error_frame(exc.code.name, str(exc)))
                except Exception as exc:  # noqa: BLE001 - the daemon keeps serving
                    log.exception("step over the step channel failed")
                    self.servicer.metrics.errors.labels("INTERNAL").inc()
                    writer.write(error_frame("INTERNAL", f"Step failed: {type(exc).__name__}: {exc}"))
                else:
                    writer.write(frame(MESSAGE, response.SerializeToString()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session ends through Watch or Detach
        finally:
            self.connections.pop(task, None)
            writer.close()

    async def _hello(self, reader, writer):
        payload = await self._read(reader, writer)
        if payload is None:
            return None
        try:
            ref = pb.SessionRef.FromString(payload)
            session = self.servicer.store.get(ref.id, ref.token)
        except DecodeError as exc:
            writer.write(error_frame(InvalidArgument.code.name, f"the first frame is not a SessionRef: {exc}"))
            await writer.drain()
            return None
        except ServiceError as exc:
            writer.write(error_frame(exc.code.name, str(exc)))
            await writer.drain()
            return None
        writer.write(frame(MESSAGE, b""))
        await writer.drain()
        return session

    async def _read(self, reader, writer) -> bytes | None:
        """The payload of the next kind-0 frame; None (after telling the client) for anything else."""
        length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
        if kind != MESSAGE or length > MAX_FRAME_BYTES:
            problem = (f"frame kind {kind} is not a message (0)" if kind != MESSAGE else
                       f"a frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
            writer.write(error_frame(InvalidArgument.code.name, problem))
            await writer.drain()
            return None
        return await reader.readexactly(length)
