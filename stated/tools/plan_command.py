"""The `stated plan` command line: its flags, their parsing (one line naming a bad flag), and printing
the plan that stated.tools.planner computes."""

from __future__ import annotations

import argparse
import sys

from stated.tools.model_size import ModelError, from_count, from_model_arg
from stated.tools.planner import (DEFAULT_GPU_MEMORY, DEFAULT_HIDDEN, Plan, PlanError, parse_count, parse_size, plan,
                                  render)

_DESCRIPTION = """\
Print, per GPU and per node, the bytes of weights, master weights, gradients and optimizer state that
training needs under each optimizer stated supports (adamw, adamw8bit, adafactor, came, lion, slimadam,
sgd with momentum), say which fit on the GPU with state in the training process, and recommend one:
fp32 AdamW on the GPU if it fits, else AdamW8bit, else Adafactor, else AdamW with stated paging the
state to host memory and disk (with the host and disk budget that needs).

Precision: fp32 keeps 4-byte weights and gradients; bf16/fp16 mean mixed precision, 2-byte weights and
gradients plus a 4-byte fp32 master copy. Optimizer state is always fp32 (8-bit codes for adamw8bit).
Mixed-precision AdamW is 16 bytes per parameter: 112 GB for 7B parameters.

Sharding across the --gpus data-parallel GPUs follows --shard; the default, 'state', is ZeRO-1 (also
FSDP with replicated weights): optimizer state and master weights split N ways, weights and gradients
replicated. With stated, each node's daemon holds the master weights and state of that node's GPUs.

Units: all figures are decimal GB (10^9 bytes), the unit of the 112 GB figure. Sizes given as input
take B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024). Activations are not
counted: --reserve keeps room for them.

Exit status: 0 when a configuration fits, 1 when none does, 2 for bad input (one line naming the flag)."""

_EXAMPLES = """\
examples:
  stated plan --params 7B --precision bf16 --gpus 8 --gpu-memory 80GiB
  stated plan --model path/to/config.json --gpus 1 --gpu-memory 24GiB --host-memory 128GiB --disk 2TB
  stated plan --model mypkg.models:build_model --shard full --gpus 16 --nodes 2"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the plan flags. Values are parsed in run(), so every bad value gets one line naming its flag."""
    what = parser.add_argument_group("the model (one of)")
    what.add_argument("--params", metavar="COUNT",
                      help="parameter count: 7B, 1.3B, 350M, 70e9 or a plain integer (K, M, B, T are 10^3..10^12)")
    what.add_argument("--model", metavar="CONFIG.json|MODULE:CALLABLE",
                      help="a Hugging Face config.json (llama, mistral, qwen2, gpt2; another model_type if it has "
                           "Llama's fields), or module:callable returning a torch.nn.Module whose parameter "
                           "shapes are read (build it on the meta device to avoid allocating it); with shapes, "
                           "factored and 8-bit state is exact per tensor")
    what.add_argument("--hidden", metavar="H",
                      help="with --params only: factored state (adafactor, came, slimadam) is estimated as if "
                           f"the parameters were H x H matrices (default: {DEFAULT_HIDDEN})")
    hw = parser.add_argument_group("training set-up")
    hw.add_argument("--precision", default="bf16", metavar="{fp32,bf16,fp16}",
                    help="fp32, or bf16/fp16 mixed precision with fp32 master weights (default: %(default)s)")
    hw.add_argument("--gpus", default="1", metavar="N",
                    help="data-parallel GPUs over which state is sharded, all nodes together (default: 1)")
    hw.add_argument("--nodes", default="1", metavar="N",
                    help="nodes the GPUs are spread over, evenly; host and disk figures are per node (default: 1)")
    hw.add_argument("--gpu-memory", metavar="SIZE",
                    help="memory of one GPU, e.g. 80GiB or 24GB (default: this machine's first CUDA device, "
                         "else 80GiB)")
    hw.add_argument("--reserve", default="10%", metavar="PCT|SIZE",
                    help="GPU memory kept for activations, the CUDA context and fragmentation, as a share of "
                         "--gpu-memory (10%%) or a size (8GiB) (default: %(default)s)")
    hw.add_argument("--shard", default="state", metavar="{none,state,grads,full}",
                    help="what is split across GPUs: none (DDP), state (ZeRO-1: optimizer state and master "
                         "weights), grads (ZeRO-2: also gradients), full (ZeRO-3/FSDP: also weights) "
                         "(default: %(default)s)")
    node = parser.add_argument_group("per node, for stated")
    node.add_argument("--host-memory", metavar="SIZE",
                      help="host memory stated may use on each node (default: this machine's total RAM)")
    node.add_argument("--disk", metavar="SIZE",
                      help="disk for stated's state files on each node (default: not limited)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `plan` on the `stated` command's subparsers."""
    parser = subparsers.add_parser("plan", help="plan GPU, host and disk memory for training, per optimizer",
                                   description=_DESCRIPTION, epilog=_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return parser


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlanError(flag, f"{text!r} is not a whole number") from None


def _detect_gpu_memory() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # no usable CUDA: the documented default
        pass
    return DEFAULT_GPU_MEMORY


def plan_from_args(args: argparse.Namespace) -> Plan:
    if (args.params is None) == (args.model is None):
        raise PlanError("--params", "give exactly one of --params COUNT and --model CONFIG.json|MODULE:CALLABLE")
    if args.params is not None:
        hidden = DEFAULT_HIDDEN if args.hidden is None else _int(args.hidden, "--hidden")
        if hidden < 1:
            raise PlanError("--hidden", f"must be at least 1, got {hidden}")
        model = from_count(parse_count(args.params), hidden, f"--params {args.params.strip()}")
    elif args.hidden is not None:
        raise PlanError("--hidden", "applies only with --params: --model gives the real shapes")
    else:
        model = from_model_arg(args.model)
    gpu_memory = parse_size(args.gpu_memory, "--gpu-memory") if args.gpu_memory else _detect_gpu_memory()
    reserve: float | int
    if args.reserve.strip().endswith("%"):
        try:
            reserve = float(args.reserve.strip()[:-1]) / 100
        except ValueError:
            raise PlanError("--reserve", f"{args.reserve!r} is not a percentage such as 10%") from None
    else:
        reserve = parse_size(args.reserve, "--reserve", minimum=0)
    return plan(model, precision=args.precision, gpus=_int(args.gpus, "--gpus"),
                nodes=_int(args.nodes, "--nodes"), gpu_memory=gpu_memory, reserve=reserve,
                host_memory=parse_size(args.host_memory, "--host-memory") if args.host_memory else None,
                disk=parse_size(args.disk, "--disk") if args.disk else None, shard=args.shard)


def run(args: argparse.Namespace) -> int:
    """Prints the plan; 0 if a configuration fits, 1 if none does, 2 (one line on stderr) for bad input."""
    try:
        p = plan_from_args(args)
    except ModelError as e:
        print(f"stated plan: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(p))
    return 0 if p.recommendation.fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stated.tools.plan_command", description=_DESCRIPTION,
                                     epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
