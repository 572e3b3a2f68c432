"""A model's parameter shapes, and the optimizer state each algorithm keeps for them.

The planner needs shapes, not only a count: Adafactor and CAME keep state per row and column, AdamW8bit
keeps tensors below 4096 elements in fp32, and SlimAdam compresses the second moment by parameter name.
So every way of naming a model -- a bare count, a Hugging Face config.json, a torch module -- becomes
the same list of `Tensor`s, and each algorithm's state is a sum over that list. The per-tensor rules are
each algorithm's own (`Algorithm.state_bytes` in stated_kernels), with all state in fp32.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys

from stated_kernels import ALGORITHMS as SPECS

# The algorithms `stated plan` compares, in the registry's order (stated_kernels.MODULES).
ALGORITHMS = tuple(name for name, spec in SPECS.items() if spec.planned)


class ModelError(ValueError):
    """A model description the planner cannot use; `flag` is the command-line flag it came from."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class Tensor:
    """`count` identical tensors (one per layer), so an 80-layer model is a dozen entries, not 800."""

    name: str
    shape: tuple[int, ...]
    count: int = 1
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor(name: str, shape: tuple[int, ...], count: int = 1, trainable: bool = True) -> Tensor:
    shape = tuple(int(d) for d in shape)
    return Tensor(name, shape, count, trainable)


@dataclasses.dataclass(frozen=True)
class Model:
    tensors: tuple[Tensor, ...]
    source: str  # what it was made from, for the report
    assumptions: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(t.numel * t.count for t in self.tensors)

    @property
    def trainable(self) -> int:
        return sum(t.numel * t.count for t in self.tensors if t.trainable)


def state_bytes(algorithm: str, t: Tensor) -> int:
    """Bytes of fp32 optimizer state one tensor (not `count` of them) gets from `algorithm` (its spec's
    `state_bytes`: the rules of each algorithm live with its kernels)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return SPECS[algorithm].state_bytes(t.shape, t.name)


def model_state_bytes(algorithm: str, model: Model) -> int:
    return sum(state_bytes(algorithm, t) * t.count for t in model.tensors if t.trainable)


_RULED_MATRIX = "matrix|compress_dims=0"


def from_count(params: int, hidden: int, source: str) -> Model:
    """A bare count as hidden x hidden weight matrices: what factored state costs depends on shape, and
    square matrices of the model's width are the usual case. Every matrix is assumed to carry a SlimAdam
    rule (true of a transformer's linear layers and embeddings under the static rules): their name
    carries it, as SlimAdam's client names a tensor whose rule it gives."""
    mats, rest = divmod(params, hidden * hidden)
    cols, tail = divmod(rest, hidden)
    tensors = []
    if mats:
        tensors.append(Tensor(_RULED_MATRIX, (hidden, hidden), mats))
    if cols:
        tensors.append(Tensor(_RULED_MATRIX, (hidden, cols), 1))
    if tail:
        tensors.append(Tensor("vector", (tail,)))
    note = (f"shapes unknown: factored state (adafactor, came, slimadam) assumes {hidden} x {hidden} "
            f"matrices (--hidden {hidden})")
    return Model(tuple(tensors), source, (note,))


_LLAMA_LIKE = ("llama", "mistral", "qwen2")
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_GPT2_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_positions")


def _require(cfg: dict, fields: tuple[str, ...], what: str, path: str) -> None:
    missing = [f for f in fields if not isinstance(cfg.get(f), int) or cfg[f] <= 0]
    if missing:
        raise ModelError("--model", f"{path}: {what} needs positive integer fields {', '.join(missing)}")


def _llama(cfg: dict, kind: str) -> list[Tensor]:
    """Hugging Face Llama/Mistral/Qwen2 parameter names and shapes (nn.Linear weights are [out, in])."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    qkv_bias = kind == "qwen2" or bool(cfg.get("attention_bias"))
    o_bias = kind != "qwen2" and bool(cfg.get("attention_bias"))
    mlp_bias = bool(cfg.get("mlp_bias"))
    p = "model.layers.*."
    out = [tensor("model.embed_tokens.weight", (vocab, h))]
    for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
        out.append(tensor(f"{p}self_attn.{name}.weight", (rows, h), layers))
        if qkv_bias:
            out.append(tensor(f"{p}self_attn.{name}.bias", (rows,), layers))
    out.append(tensor(f"{p}self_attn.o_proj.weight", (h, heads * hd), layers))
    if o_bias:
        out.append(tensor(f"{p}self_attn.o_proj.bias", (h,), layers))
    for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
        out.append(tensor(f"{p}mlp.{name}.weight", shape, layers))
        if mlp_bias:
            out.append(tensor(f"{p}mlp.{name}.bias", shape[:1], layers))
    out += [tensor(f"{p}input_layernorm.weight", (h,), layers),
            tensor(f"{p}post_attention_layernorm.weight", (h,), layers),
            tensor("model.norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings", False):
        out.append(tensor("lm_head.weight", (vocab, h)))
    return out


def _gpt2(cfg: dict) -> list[Tensor]:
    """Hugging Face GPT-2: Conv1D weights are [in, out]; the LM head is tied to wte."""
    e, layers, vocab, pos = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    inner = cfg.get("n_inner") or 4 * e
    p = "transformer.h.*."
    out = [tensor("transformer.wte.weight", (vocab, e)), tensor("transformer.wpe.weight", (pos, e))]
    for name, shape in (("ln_1.weight", (e,)), ("ln_1.bias", (e,)),
                        ("attn.c_attn.weight", (e, 3 * e)), ("attn.c_attn.bias", (3 * e,)),
                        ("attn.c_proj.weight", (e, e)), ("attn.c_proj.bias", (e,)),
                        ("ln_2.weight", (e,)), ("ln_2.bias", (e,)),
                        ("mlp.c_fc.weight", (e, inner)), ("mlp.c_fc.bias", (inner,)),
                        ("mlp.c_proj.weight", (inner, e)), ("mlp.c_proj.bias", (e,))):
        out.append(tensor(p + name, shape, layers))
    out += [tensor("transformer.ln_f.weight", (e,)), tensor("transformer.ln_f.bias", (e,))]
    return out


def from_config(path: str) -> Model:
    """Parameter shapes from a Hugging Face config.json (llama, mistral, qwen2, gpt2). Another model_type
    is counted as a Llama-style decoder if it has that architecture's fields; if not, the error names
    the fields it lacks."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError("--model", f"cannot read {path} as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError("--model", f"{path}: expected a JSON object")
    kind = cfg.get("model_type")
    notes: list[str] = []
    if kind == "gpt2":
        _require(cfg, _GPT2_FIELDS, "a gpt2 config", path)
        tensors = _gpt2(cfg)
    elif kind in _LLAMA_LIKE:
        _require(cfg, _LLAMA_FIELDS, f"a {kind} config", path)
        tensors = _llama(cfg, kind)
    else:
        _require(cfg, _LLAMA_FIELDS, f"model_type {kind!r} is not one of llama, mistral, qwen2, gpt2, so "
                 "it is counted as a Llama-style decoder, which", path)
        tensors = _llama(cfg, "llama")
        notes.append(f"model_type {kind!r} counted as a Llama-style decoder (no biases unless attention_bias"
                     f"/mlp_bias; {'tied' if cfg.get('tie_word_embeddings') else 'untied'} embeddings)")
    return Model(tuple(tensors), f"{kind or 'unknown'} config {path}", tuple(notes))


def from_callable(spec: str) -> Model:
    """Shapes from `module:callable`, which must return a torch.nn.Module (build it on the meta device
    for a large model: only shapes are read). Frozen parameters count as weights, with no state."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError("--model", f"{spec!r} is neither a config.json file nor module:callable")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so that a module beside the user's script is found
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        built = obj()
    except Exception as e:  # the user's code: any failure becomes one line naming the flag
        raise ModelError("--model", f"calling {spec} failed: {type(e).__name__}: {e}") from None
    import torch

    if not isinstance(built, torch.nn.Module):
        raise ModelError("--model", f"{spec} returned {type(built).__name__}, not a torch.nn.Module")
    tensors = tuple(tensor(name, tuple(p.shape), trainable=p.requires_grad)
                    for name, p in built.named_parameters())
    if not tensors:
        raise ModelError("--model", f"{spec} returned a module with no parameters")
    return Model(tensors, f"module {spec}")


def from_model_arg(value: str) -> Model:
    """`--model`: a path to a .json file (or any existing file) is a config, otherwise module:callable."""
    if value.endswith(".json") or os.path.isfile(value):
        return from_config(value)
    return from_callable(value)
