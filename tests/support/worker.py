"""A trainer process for the end-to-end tests: `python tests/support/worker.py MODE ...`.

Modes:
  train    trains a small model with stated.AdamW beside torch.optim.AdamW(fused=True) from the same
           initialisation and prints one JSON line per event on stdout:
             {"event": "attached", "session": ..., "segments": [...]}   then waits for a line on stdin
             {"event": "halfway"}  (with --pause-halfway; then waits for another line on stdin)
             {"event": "done", "max_abs_diff": ..., "max_state_diff": ..., "loss": ..., ...}
           With --forever it keeps stepping after "go" until it is killed, printing {"event": "stepping"}
           once it has stepped a few times.
  intrude  knows another session's id but not its token: tries every call with a made-up token and
           prints {"rpc": [error class, is PermissionError, message], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def wait_for_line() -> None:
    if not sys.stdin.readline():
        raise SystemExit("stdin closed before the test said go")


def mapped_segments() -> list[str]:
    """The stated arenas this process has mapped, as "<kind>:<inode>" (from /proc/self/maps, whose lines
    end in inode and /memfd:stated-<kind> (deleted))."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:stated-"):
                names.add(f"{fields[5].removeprefix('/memfd:stated-')}:{fields[4]}")
    return sorted(names)


def train(args) -> None:
    import torch

    import stated

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ref.load_state_dict(ours.state_dict())
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05)
    opt = stated.AdamW(ours.parameters(), address=args.address, job=args.job, rank=args.rank, **hyper)
    ref_opt = torch.optim.AdamW(ref.parameters(), fused=True, **hyper)
    emit(event="attached", session=opt.session_id, pid=os.getpid(), segments=mapped_segments())
    wait_for_line()

    g = torch.Generator().manual_seed(1000 + args.seed)
    teacher = torch.randn(8, 4, generator=g)
    step, first_loss, loss = 0, None, None
    while args.forever or step < args.steps:
        step += 1
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ teacher)
        for model, optimizer in ((ours, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            value = torch.nn.functional.mse_loss(model(x), y)
            value.backward()
            optimizer.step()
            if model is ours:
                loss = value.item()
                first_loss = loss if first_loss is None else first_loss
        if args.forever:
            if step == 20:
                emit(event="stepping")
            time.sleep(0.002)
        elif args.pause_halfway and step == args.steps // 2:
            emit(event="halfway")
            wait_for_line()

    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters()))
    state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    state_diff = max((state[i][k].float() - v.float()).abs().max().item()
                     for i in ref_state for k, v in ref_state[i].items())
    emit(event="done", session=opt.session_id, job=args.job, rank=args.rank, steps=step, max_abs_diff=diff,
         max_state_diff=state_diff, first_loss=first_loss, loss=loss,
         step_count=float(state[0]["step"]))


def intrude(args) -> None:
    import torch

    import stated
    from stated.v1 import state_service_pb2 as pb
    from stated_client.connection import connect

    connection = connect(args.address)
    forged = pb.SessionRef(id=args.session, token=os.urandom(16))
    calls = {
        "Step": lambda: connection.call("Step", pb.StepRequest(
            session=forged, step=1, groups=[pb.GroupHyperparameters(scalars={"lr": 100.0})], has_grad=b"\1" * 4)),
        "Register": lambda: connection.call("Register", pb.RegisterRequest(
            session=forged, groups=[pb.GroupHyperparameters()],
            tensors=[pb.TensorSpec(shape=[16], dtype=pb.D_TYPE_FLOAT32)])),
        "ExportState": lambda: list(connection.stream("ExportState", pb.ExportStateRequest(session=forged))),
        "ImportState": lambda: connection.call("ImportState", iter([pb.ImportStateRequest(session=forged)])),
        "Detach": lambda: connection.call("Detach", pb.DetachRequest(session=forged)),
    }
    report = {}
    for name, call in calls.items():
        try:
            call()
            report[name] = ["no error", False, ""]
        except Exception as exc:  # what the user of the client would see
            report[name] = [type(exc).__name__, isinstance(exc, PermissionError) and
                            isinstance(exc, stated.StatedError), str(exc)]
    # Nor can it take the (job, rank) over.
    try:
        stated.AdamW([torch.nn.Parameter(torch.zeros(2))], address=args.address, job=args.job, rank=args.rank)
        report["Attach"] = ["no error", False, ""]
    except Exception as exc:
        report["Attach"] = [type(exc).__name__, isinstance(exc, stated.AlreadyAttachedError), str(exc)]
    connection.close()
    emit(**report)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "intrude"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pause-halfway", action="store_true")
    parser.add_argument("--forever", action="store_true")
    parser.add_argument("--session", default="")
    args = parser.parse_args()
    train(args) if args.mode == "train" else intrude(args)


if __name__ == "__main__":
    main()
