"""What client and daemon agree on beside the protobuf messages, written once, on the client's side of
the wire: the gRPC service name and message limits, the step channel's socket and framing (which also carries
the arenas' file descriptors). The daemon imports these from here (the client imports nothing of the daemon).

It loads neither torch nor grpc: the daemon's start-up and `stated status` import it too.

The step channel (served by stated.server.step_channel, used by stated_client.step_line). Every integer
is little-endian. A frame is a 4-byte length, a 1-byte kind and a payload:

    kind 0  a protobuf message: the client sends SessionRef first (the channel's session, checked as a
            gRPC call's would be), then StepRequests (their `session` is ignored: the channel is bound);
            the daemon answers the SessionRef with an empty kind-0 frame and each StepRequest with a
            StepResponse
    kind 1  an error, from the daemon: "<gRPC status name>\\n<message>"; after a refused SessionRef or a
            malformed frame the daemon closes the connection, after a refused step it goes on
    kind 2  an arena request, on a connection that authenticated (its SessionRef was accepted): the payload
            is the region's index (uint32); the daemon answers with a kind-2 frame holding the arenas'
            size (uint64) and, as SCM_RIGHTS on its first byte, two file descriptors: the region's param
            and grad arenas (Note [arenas as file descriptors] in stated.arena_memory), then goes on; a
            refused request gets a kind-1 error and the connection goes on
    kind 3  a credential request, as the first and only frame, empty: the daemon answers with a kind-0
            frame holding a credential for the connection's uid (Note [job owners] in
            stated.server.credentials) and closes the connection
"""

from __future__ import annotations

import struct

# --- gRPC ------------------------------------------------------------------------------------------

SERVICE_NAME = "stated.v1.StateService"
MAX_MESSAGE_BYTES = 8 << 20
# What a daemon that shuts down tells its sessions (UNAVAILABLE): their clients then say it stopped.
SHUTTING_DOWN = "the stated daemon is shutting down"
# Options for grpc.insecure_channel and grpc.aio.server alike.
MESSAGE_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
# A rank travels as uint32 (AttachRequest.rank, DropRequest.rank): a rank outside 0..MAX_RANK is refused
# where it is given, naming it, instead of failing inside protobuf.
MAX_RANK = (1 << 32) - 1

# --- the step channel ------------------------------------------------------------------------------

HEADER = struct.Struct("<IB")
MESSAGE, ERROR, ARENAS, CREDENTIAL = 0, 1, 2, 3
REGION = struct.Struct("<I")  # an arena request's payload
ARENA_SIZE = struct.Struct("<Q")  # the payload of the answer, beside its two descriptors
ARENA_FDS = 2
# has_grad holds one byte per tensor (up to 1M tensors per Register) and groups a few scalars each.
MAX_FRAME_BYTES = 64 << 20
# The first frame, a SessionRef (a 16-character id and a 16-byte token), with room: the daemon reads no
# larger frame from a connection that has not authenticated (Note [step channel limits]).
MAX_HELLO_BYTES = 256
STEP_SUFFIX = ".step"
# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def channel_path(grpc_socket: str) -> str:
    """The step channel's socket beside the daemon's gRPC socket."""
    return grpc_socket + STEP_SUFFIX


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def error_frame(status: str, message: str) -> bytes:
    return frame(ERROR, f"{status}\n{message}".encode())


def parse_error(payload: bytes) -> tuple[str, str]:
    """The status name and the message of an error frame's payload."""
    status, _, message = payload.decode(errors="replace").partition("\n")
    return status, message


# --- the admin token (Note [who sees what] in stated.server.admin_file) ------------------------------

ADMIN_SUFFIX = ".admin"
ADMIN_TOKEN_BYTES = 32


def admin_path(grpc_socket: str) -> str:
    """The file beside the daemon's gRPC socket that holds its admin token (hex), readable by its user only."""
    return grpc_socket + ADMIN_SUFFIX
