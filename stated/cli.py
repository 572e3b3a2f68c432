"""The `stated` command: serve, demo, status, plan."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from stated.durations import DEFAULT_RETAIN_SECONDS, parse_duration
from stated.sizes import parse_size
from stated_client.address import ENV_ADDRESS, default_socket
from stated_client.protocol import MAX_RANK


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stated")


def _rank(text: str) -> int:
    """`--rank`: what the wire can carry (a uint32), refused here with the bad text instead of later."""
    if not text.strip().isdigit() or int(text) > MAX_RANK:
        raise argparse.ArgumentTypeError(f"invalid rank {text!r}: a rank is a whole number from 0 to {MAX_RANK}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stated",
        description="Optimizer state outside the training process: a per-node daemon and its tools.",
    )
    parser.add_argument("--log-level", default=os.environ.get("STATED_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much the command logs to stderr (default: INFO, or $STATED_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_demo(sub)
    _add_status(sub)
    _add_jobs(sub)
    from stated.tools import plan_command

    plan_command.add_parser(sub)
    return parser


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="run the daemon", description=(
        "Run the stated daemon: it holds optimizer state for every trainer on this node and applies their "
        "steps. Trainers reach it through stated.AdamW(...) and friends. Stop it with SIGTERM or Ctrl-C: "
        "sessions are checkpointed (see --shutdown-timeout), the arenas are freed and the socket removed, and the "
        "checkpoints stay under --state-dir for the next daemon, which recovers them."))
    serve.add_argument("--socket", default=None, metavar="PATH",
                       help=f"unix socket to listen on (default: ${ENV_ADDRESS} if it is a path, else "
                            f"{default_socket()}); the socket is 0600, a missing directory is created 0700 "
                            f"(an existing one keeps its mode), and PATH.lock keeps a second daemon off it")
    serve.add_argument("--group", default=None, metavar="NAME",
                       help="let members of this group connect: the socket (and step socket) 0660, a directory "
                            "that --socket creates 0750; each session's arenas still go only to that session")
    serve.add_argument("--metrics-addr", default="127.0.0.1:9464", metavar="HOST:PORT",
                       help="where to serve Prometheus metrics at /metrics (default: 127.0.0.1:9464; port 0 "
                            "picks a free port; 'none' turns the endpoint off)")
    serve.add_argument("--state-dir", default=_default_state_dir(), metavar="DIR",
                       help="directory for checkpoints and page files; one daemon holds it at a time, and a daemon "
                            "started on it recovers every job checkpointed there (default: %(default)s)")
    serve.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="checkpoint every session every N steps, written behind the reply of the step that "
                            "reaches it while the trainer computes its next one (default: 0, only when the trainer "
                            "calls opt.checkpoint() and at shutdown)")
    serve.add_argument("--retain", type=parse_duration, default=DEFAULT_RETAIN_SECONDS, metavar="DURATION",
                       help="how long the state of a trainer that died (or closed with keep=True) stays for it to "
                            "resume, such as 90s, 30m, 2h or 'forever'; a recovered job is kept as long from the "
                            "daemon's start (default: 30m)")
    serve.add_argument("--shutdown-timeout", type=parse_duration, default=60.0, metavar="DURATION",
                       help="at SIGTERM, how long checkpointing the sessions that changed since their last "
                            "checkpoint may take; those not done in time stay at their last checkpoint (default: "
                            "60s; give systemd or Kubernetes more than this to stop the daemon)")
    serve.add_argument("--page-size", type=parse_size, default=64 << 20, metavar="SIZE",
                       help="bytes of optimizer state in one page, plain or with a unit such as 16MiB "
                            "(default: 64MiB, chosen by bench/cpu_step.py --page-size; see BENCHMARKS.md)")
    serve.add_argument("--host-memory", type=parse_size, default=None, metavar="SIZE",
                       help="cap on the bytes of optimizer state held in host memory, all jobs together, such as "
                            "8GiB; pages beyond it live in state files under --state-dir, read and written with "
                            "O_DIRECT (default: no cap, everything in host memory)")
    serve.add_argument("--prefetch-depth", type=int, default=4, metavar="N",
                       help="pages read ahead of the step's cursor, and so buffers per session beyond its resident "
                            "set, when state is paged (default: 4)")
    serve.add_argument("--gpu-cache", type=parse_size, default=0, metavar="SIZE",
                       help="bytes of optimizer state kept resident on each GPU between steps, such as 8GiB; "
                            "pages beyond it stream from host memory through the staging buffers every step "
                            "(default: 0, nothing cached; only for clients with CUDA parameters)")
    serve.add_argument("--gpu-staging", type=int, default=4, metavar="N",
                       help="page-sized GPU staging buffers per stepping session that copies in, kernels and copies "
                            "out rotate through (so sessions never wait on each other's); the daemon's GPU memory is "
                            "staging plus --gpu-cache plus small per-tensor state (default: 4)")
    serve.add_argument("--workers", type=int, default=4, metavar="N",
                       help="threads that run steps; sessions beyond this many wait their turn (default: 4)")
    serve.add_argument("--cpu-threads", type=int, default=len(os.sched_getaffinity(0)), metavar="N",
                       help="threads that run the CPU kernels of AdamW, Adam, SGD, Lion, SlimAdam and AdamW8bit: each "
                            "takes the next piece of a page as soon as it is free, so a core that a trainer's thread "
                            "keeps busy slows the step less; 0 leaves them to torch's own OpenMP threads, as "
                            "Adafactor and CAME always are (default: the CPUs this process may run on, here %(default)s)")
    _add_limits(serve)
    serve.add_argument("--exit-with-parent", action="store_true",
                       help="stop when the process that started the daemon exits (used by the embedded daemon)")


def _job_bytes(text: str) -> float:
    """`--max-job-bytes`: a size, or 'none' for no cap."""
    return math.inf if text.strip().lower() in ("none", "unlimited") else parse_size(text)


def _add_limits(serve) -> None:
    """The limits of Note [limits and their defaults] (stated.limits): far above what a training run
    needs, each refusal names its flag."""
    from stated import limits as lim

    group = serve.add_argument_group("limits", "what one client may make the daemon hold; every refusal names its "
                                               "flag (SECURITY.md, Limits)")
    group.add_argument("--max-sessions", type=int, default=lim.DEFAULT_MAX_SESSIONS, metavar="N",
                       help="sessions held at once, live and retained in memory; one is an optimizer of one trainer "
                            "process, so a node needs a few per GPU; more are RESOURCE_EXHAUSTED (default: "
                            "%(default)s)")
    group.add_argument("--max-connections", type=int, default=lim.DEFAULT_MAX_CONNECTIONS, metavar="N",
                       help="step channel connections open at once, each served by one thread; beyond it a client "
                            "steps over gRPC (default: %(default)s, one per session)")
    group.add_argument("--max-tensors-per-register", type=int, default=lim.DEFAULT_MAX_TENSORS_PER_REGISTER,
                       metavar="N", help="tensors in one Register (one param group of an optimizer); the largest "
                                         "models have a few thousand per rank (default: %(default)s)")
    group.add_argument("--max-groups-per-session", type=int, default=lim.DEFAULT_MAX_GROUPS_PER_SESSION, metavar="N",
                       help="param groups one session (optimizer) may register; each CPU group's arenas hold two "
                            "of the daemon's file descriptors (default: %(default)s)")
    group.add_argument("--max-job-bytes", type=_job_bytes, default=None, metavar="SIZE",
                       help="bytes of optimizer state plus parameter and gradient arenas that one job (all its "
                            "ranks) may hold, such as 200GiB, or 'none'; a Register beyond it is RESOURCE_EXHAUSTED "
                            "(default: this machine's memory, plus the size of the --state-dir file system with "
                            "--host-memory, which pages state there)")
    group.add_argument("--step-auth-timeout", type=parse_duration, default=lim.DEFAULT_STEP_AUTH_TIMEOUT,
                       metavar="DURATION", help="how long a new step channel connection may take to send its "
                                                "session's reference before it is closed (default: 10s)")
    group.add_argument("--step-idle-timeout", type=parse_duration, default=lim.DEFAULT_STEP_IDLE_TIMEOUT,
                       metavar="DURATION",
                       help="how long an authenticated step channel connection may send nothing before it is "
                            "closed; long, as a trainer may pause for an evaluation or checkpoint, and its next "
                            "step reconnects (default: 1h; 'forever' keeps idle connections)")
    group.add_argument("--watch-timeout", type=parse_duration, default=lim.DEFAULT_WATCH_TIMEOUT, metavar="DURATION",
                       help="how long an attached session has to open its Watch stream (clients do at once) before "
                            "it is detached, so that no one holds a (job, rank) without a live trainer (default: "
                            "30s)")


def _limits(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from stated.limits import Limits, machine_bytes

    for flag in ("max_sessions", "max_connections", "max_tensors_per_register", "max_groups_per_session"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("step_auth_timeout", "step_idle_timeout", "watch_timeout"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be a duration above 0, got {getattr(args, flag)}")
    job_bytes = args.max_job_bytes
    if job_bytes is None:
        job_bytes = machine_bytes(args.state_dir, paged=args.host_memory is not None)
    return Limits(max_sessions=args.max_sessions, max_connections=args.max_connections,
                  max_tensors_per_register=args.max_tensors_per_register,
                  max_groups_per_session=args.max_groups_per_session, max_job_bytes=job_bytes,
                  step_auth_timeout=args.step_auth_timeout, step_idle_timeout=args.step_idle_timeout,
                  watch_timeout=args.watch_timeout)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="train a small model with stated.AdamW beside torch.optim.AdamW",
                          description=(
        "Start an embedded daemon with a host-memory budget smaller than the optimizer state, train a small "
        "model on generated data with stated.AdamW and, from the same initialisation, with torch.optim.AdamW, and "
        "print a table comparing the two and what the pager did."))
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    demo.add_argument("--width", type=int, default=512, help="hidden width of the model (default: 512)")
    demo.add_argument("--budget", type=float, default=0.25,
                      help="host memory for optimizer state, as a fraction of the state; the rest is paged to "
                           "disk (default: 0.25; 1 turns paging off)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_status(sub) -> None:
    status = sub.add_parser("status", help="show the sessions a running daemon holds",
                            description="Ask a running daemon for its sessions and state sizes. Job names, pids and "
                                        "sessions are shown to the daemon's user and root (who can read its admin "
                                        "token, the file beside its socket named SOCKET.admin); anyone else who can "
                                        "reach the socket sees the totals only.")
    status.add_argument("--address", default=None, metavar="TARGET",
                        help=f"daemon address (default: ${ENV_ADDRESS}, else {default_socket()})")


def _add_jobs(sub) -> None:
    jobs = sub.add_parser("jobs", help="list the jobs a running daemon holds: live, retained, recovered",
                          description="One line per (job, rank): whether a trainer is attached (live), its state "
                                      "is kept for a trainer to resume (retained: in memory; recovered: a "
                                      "restarted daemon's checkpoint on disk), its step and last durable step, "
                                      "bytes in memory and on disk, and how long it is retained. Run as the "
                                      "daemon's user or root (who can read its admin token, SOCKET.admin); anyone "
                                      "else sees the counts only.")
    jobs.add_argument("--address", default=None, metavar="TARGET",
                      help=f"daemon address (default: ${ENV_ADDRESS}, else {default_socket()})")
    drop = sub.add_parser("drop", help="remove a retained job's state and checkpoints",
                          description="Remove the retained or recovered state of JOB (every rank, or one), in "
                                      "memory and its checkpoints on disk. A live rank is not dropped: its trainer "
                                      "ends it with opt.close(). Run as the daemon's user or root: dropping needs "
                                      "the daemon's admin token (SOCKET.admin).")
    drop.add_argument("job", metavar="JOB", help="the job's name, as `stated jobs` shows it")
    drop.add_argument("--rank", type=_rank, default=None, metavar="R", help="only this rank (default: every rank)")
    drop.add_argument("--address", default=None, metavar="TARGET",
                      help=f"daemon address (default: ${ENV_ADDRESS}, else {default_socket()})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "demo":
        from stated.tools.demo import run_demo

        if not 0 < args.budget:
            parser.error(f"--budget must be a fraction above 0, got {args.budget}")
        return run_demo(steps=args.steps, width=args.width, seed=args.seed, budget=args.budget)
    if args.command == "status":
        from stated.tools.status import show_status

        return show_status(args.address)
    if args.command == "jobs":
        from stated.tools.jobs import show_jobs

        return show_jobs(args.address)
    if args.command == "drop":
        from stated.tools.jobs import drop

        return drop(args.address, args.job, args.rank)
    if args.command == "plan":
        from stated.tools import plan_command

        return plan_command.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # Note [idle OpenMP threads]: after a parallel region libgomp's threads spin-wait for more work
    # by default. On a node where trainers and the daemon share cores, the daemon's spinning threads
    # steal the CPU the trainer's next forward pass needs (and the trainer's steal the daemon's).
    # Passive waiting must be chosen before torch loads, so it is set here, before any import of it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from stated.server.daemon import DaemonConfig, serve
    from stated_client.address import resolve, socket_path

    if args.page_size < 64 << 10:
        parser.error(f"--page-size must be at least 64KiB, got {args.page_size} bytes")
    if args.prefetch_depth < 1:
        parser.error(f"--prefetch-depth must be at least 1, got {args.prefetch_depth}")
    if args.gpu_staging < 2:
        parser.error(f"--gpu-staging must be at least 2 (one page copies while another computes), "
                     f"got {args.gpu_staging}")
    if args.cpu_threads < 0:
        parser.error(f"--cpu-threads must be 0 (torch's own threads) or more, got {args.cpu_threads}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be 0 (off) or a number of steps, got {args.checkpoint_every}")
    target = resolve(args.socket)
    path = socket_path(target)
    if path is None:
        parser.error(f"--socket must be a unix socket path, got {args.socket or target!r}")
    return serve(DaemonConfig(socket=path, metrics_addr=args.metrics_addr, state_dir=args.state_dir,
                              group=args.group, page_bytes=args.page_size, workers=args.workers,
                              cpu_threads=args.cpu_threads,
                              exit_with_parent=args.exit_with_parent, host_memory=args.host_memory,
                              prefetch_depth=args.prefetch_depth, gpu_cache_bytes=args.gpu_cache,
                              gpu_staging_pages=args.gpu_staging, checkpoint_every=args.checkpoint_every,
                              retain_seconds=args.retain, shutdown_timeout=args.shutdown_timeout,
                              limits=_limits(parser, args)))
