"""`stated plan`: the arithmetic against published figures, per-tensor state rules, configs and modules,
the recommendation ladder, the rendered table and the command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from stated.tools import model_size, plan_command, planner
from stated.tools.model_size import ModelError, Tensor, from_config, state_bytes, tensor
from stated.tools.planner import GB, GiB, Footprint, plan

HOST = 10**12  # an explicit host size, so that no test depends on this machine's RAM


def test_mixed_precision_adamw_for_7b_is_112_gb():
    p = plan(7_000_000_000, precision="bf16", gpus=1, host_memory=HOST)
    assert p.whole["adamw"] == Footprint(weights=14 * GB, master=28 * GB, grads=14 * GB, state=56 * GB)
    assert p.whole["adamw"].total == 112_000_000_000
    assert p.per_gpu["adamw"].total == 112_000_000_000  # one GPU holds everything


@pytest.mark.parametrize("precision, per_param", [("fp32", 4 + 4 + 0 + 8), ("bf16", 16), ("fp16", 16)])
def test_precision_bytes_per_parameter(precision, per_param):
    assert plan(10**9, precision=precision, host_memory=HOST).whole["adamw"].total == per_param * 10**9


def test_every_algorithm_on_square_matrices():
    """A count that is a whole number of hidden x hidden matrices: every rule applies exactly."""
    h, k = 4096, 4
    n = k * h * h
    p = plan(n, hidden=h, host_memory=HOST)
    state = {a: f.state for a, f in p.whole.items()}
    assert state == {
        "adamw": 8 * n,
        "adamw8bit": 2 * n + 8 * n // 256,
        "adafactor": k * 4 * (h + h),
        "came": 4 * n + k * 2 * 4 * (h + h),
        "lion": 4 * n,
        "slimadam": 4 * n + k * 4 * h,  # one dim collapsed
        "sgd": 4 * n,
    }
    assert p.model.assumptions and "4096 x 4096" in p.model.assumptions[0]


def test_count_that_is_not_whole_matrices_keeps_every_parameter():
    h = 64
    n = 3 * h * h + 5 * h + 7
    m = model_size.from_count(n, h, "test")
    assert m.params == n
    assert [(t.shape, t.count) for t in m.tensors] == [((h, h), 3), ((h, 5), 1), ((7,), 1)]


@pytest.mark.parametrize("algorithm, shape, name, expected", [
    ("adamw", (3, 5), "w", 8 * 15),
    ("adamw8bit", (4095,), "w", 8 * 4095),  # below min_8bit_size: fp32 m and v
    ("adamw8bit", (4096,), "w", 2 * 4096 + 8 * 16),
    ("adamw8bit", (4097,), "w", 2 * 4097 + 8 * 17),  # a partial last block has its own absmax
    ("adafactor", (10,), "w", 4 * 10),
    ("adafactor", (3, 5), "w", 4 * (3 + 5)),
    ("adafactor", (2, 3, 5), "w", 4 * 2 * (3 + 5)),  # last two dims factored, per leading index
    ("adafactor", (), "w", 4),
    ("came", (3, 5), "w", 4 * 15 + 2 * 4 * (3 + 5)),
    ("came", (10,), "w", 4 * 10 + 4 * 10),
    ("lion", (3, 5), "w", 4 * 15),
    ("sgd", (3, 5), "w", 4 * 15),
    ("slimadam", (8, 16), "layers.0.self_attn.q_proj.weight", 4 * 128 + 4 * 8),  # K = (1,)
    ("slimadam", (8, 16), "layers.0.self_attn.v_proj.weight", 4 * 128 + 4 * 16),  # K = (0,)
    ("slimadam", (8,), "layers.0.self_attn.q_proj.bias", 4 * 8 + 4 * 8),  # 1-D: never compressed
    ("slimadam", (8, 16), "something.weight", 4 * 128 + 4 * 128),  # no rule: plain Adam
])
def test_state_bytes_per_tensor(algorithm, shape, name, expected):
    assert state_bytes(algorithm, tensor(name, shape)) == expected


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown algorithm 'adam9'"):
        state_bytes("adam9", Tensor("w", (2,)))


LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "tie_word_embeddings": False}
CONFIGS = [  # published parameter counts of these checkpoints
    (LLAMA2_7B, 6_738_415_616),
    ({**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
      "num_attention_heads": 64, "num_key_value_heads": 8}, 68_976_648_192),  # Llama-2-70B
    ({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}, 7_241_732_096),
    ({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
      "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
      "tie_word_embeddings": True}, 494_032_768),  # Qwen2-0.5B: q/k/v biases, tied embeddings
    ({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_positions": 1024,
      "n_head": 12}, 124_439_808),
]


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("cfg, count", CONFIGS, ids=["llama2-7b", "llama2-70b", "mistral-7b", "qwen2-0.5b", "gpt2"])
def test_config_parameter_counts(tmp_path, cfg, count):
    m = from_config(_write(tmp_path, cfg))
    assert m.params == count
    assert m.assumptions == ()


def test_config_shapes_make_factored_state_exact(tmp_path):
    """Llama-2-7B: every tensor is 2-D except 65 norm vectors of 4096."""
    m = from_config(_write(tmp_path, LLAMA2_7B))
    h, i, v, layers = 4096, 11008, 32000, 32
    matrices = 2 * (v + h) + layers * (4 * (h + h) + 3 * (i + h))
    vectors = (2 * layers + 1) * h
    assert model_size.model_state_bytes("adafactor", m) == 4 * matrices + 4 * vectors


def test_unknown_model_type_with_llama_fields_is_counted_and_says_so(tmp_path):
    m = from_config(_write(tmp_path, {**LLAMA2_7B, "model_type": "yi"}))
    assert m.params == 6_738_415_616
    assert "'yi' counted as a Llama-style decoder" in m.assumptions[0]


@pytest.mark.parametrize("cfg, missing", [
    ({"model_type": "falcon", "hidden_size": 4544}, "vocab_size, intermediate_size, num_hidden_layers, "
                                                    "num_attention_heads"),
    ({"model_type": "gpt2", "n_embd": 768, "vocab_size": 50257}, "n_layer, n_positions"),
    ({**LLAMA2_7B, "hidden_size": "4096"}, "hidden_size"),
])
def test_config_missing_fields_are_named(tmp_path, cfg, missing):
    with pytest.raises(ModelError, match=missing) as e:
        from_config(_write(tmp_path, cfg))
    assert e.value.flag == "--model"


def test_module_callable_reads_shapes_and_skips_frozen(tmp_path, monkeypatch):
    (tmp_path / "tiny_model_for_plan.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 32))\n"
        "    m[0].weight.requires_grad_(False)\n"
        "    return m\n"
        "def big():\n"
        "    with torch.device('meta'):\n"
        "        return torch.nn.Linear(100_000, 100_000, bias=False)\n"
        "def not_a_module():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = model_size.from_model_arg("tiny_model_for_plan:build")
    assert (m.params, m.trainable) == (100 * 64 + 32 * 64 + 32, 32 * 64 + 32)
    assert model_size.model_state_bytes("adafactor", m) == 4 * (32 + 64) + 4 * 32  # frozen embedding: none
    p = plan(m, precision="bf16", host_memory=HOST)
    assert p.whole["adamw"] == Footprint(weights=2 * m.params, master=4 * m.trainable, grads=2 * m.trainable,
                                         state=8 * m.trainable)
    assert model_size.from_model_arg("tiny_model_for_plan:big").params == 10**10  # meta: nothing allocated
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        model_size.from_model_arg("tiny_model_for_plan:not_a_module")
    with pytest.raises(ModelError, match="neither a config.json file nor module:callable"):
        model_size.from_model_arg("no_colon_here")


@pytest.mark.parametrize("shard, per_gpu", [
    ("none", Footprint(14 * GB, 28 * GB, 14 * GB, 56 * GB)),
    ("state", Footprint(14 * GB, 3_500_000_000, 14 * GB, 7 * GB)),  # ZeRO-1, the default
    ("grads", Footprint(14 * GB, 3_500_000_000, 1_750_000_000, 7 * GB)),
    ("full", Footprint(1_750_000_000, 3_500_000_000, 1_750_000_000, 7 * GB)),
])
def test_sharding_across_gpus(shard, per_gpu):
    assert plan(7 * 10**9, gpus=8, shard=shard, host_memory=HOST).per_gpu["adamw"] == per_gpu


def test_host_holds_the_shares_of_its_nodes_gpus():
    p = plan(7 * 10**9, gpus=16, nodes=2, host_memory=HOST)
    assert p.paged_node["adamw"] == 8 * (28 * GB + 56 * GB) // 16
    assert p.paged_gpu == 28 * GB


def test_defaults_take_this_machines_ram():
    assert plan(10**9).host_memory == planner.host_total_memory() > 0


@pytest.mark.parametrize("kwargs, algorithm, paged", [
    (dict(gpus=8, gpu_memory=80 * GiB), "adamw", False),
    (dict(gpus=1, gpu_memory=80 * GiB), "adamw8bit", False),  # 70.2 GB in a 77.3 GB budget
    (dict(gpus=1, gpu_memory=64 * GB, reserve=0), "adafactor", False),  # 56.01 GB
    (dict(gpus=1, gpu_memory=40 * GB, reserve=0), "adamw", True),  # only weights + grads (28 GB) fit
])
def test_recommendation_ladder(kwargs, algorithm, paged):
    r = plan(7 * 10**9, host_memory=HOST, **kwargs).recommendation
    assert (r.algorithm, r.paged, r.fits) == (algorithm, paged, True)


def test_paged_budget_spills_to_disk_and_respects_disk():
    r = plan(7 * 10**9, gpu_memory=40 * GB, reserve=0, host_memory=64 * GB).recommendation
    assert (r.gpu_bytes, r.host_bytes, r.disk_bytes, r.fits) == (28 * GB, 64 * GB, 84 * GB, True)
    assert "reads and writes about 20.00 GB from disk" in r.text
    r = plan(7 * 10**9, gpu_memory=40 * GB, reserve=0, host_memory=64 * GB, disk=50 * GB).recommendation
    assert not r.fits and "--disk gives 50.00 GB" in r.text


def test_nothing_fits_points_at_full_sharding():
    r = plan(70 * 10**9, gpus=8, gpu_memory=80 * GiB, host_memory=HOST).recommendation
    assert not r.fits
    assert "--shard full, with which: adafactor with its state on the GPU" in r.text


@pytest.mark.parametrize("text, count", [
    ("7B", 7 * 10**9), ("1.3B", 1_300_000_000), ("350M", 350_000_000), ("70e9", 70 * 10**9),
    ("125000000", 125_000_000), ("1_000", 1000), ("2t", 2 * 10**12), (" 13b ", 13 * 10**9),
])
def test_parse_count(text, count):
    assert planner.parse_count(text) == count


@pytest.mark.parametrize("text", ["banana", "", "-5", "0", "1.5", "7X", "B"])
def test_parse_count_rejects(text):
    with pytest.raises(planner.PlanError, match="^--params: "):
        planner.parse_count(text)


@pytest.mark.parametrize("text, size", [
    ("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("1.5TB", 1_500_000_000_000), ("512MiB", 512 * 2**20),
    ("1024", 1024), ("16 gib", 16 * 2**30),
])
def test_parse_size(text, size):
    assert planner.parse_size(text, "--gpu-memory") == size


@pytest.mark.parametrize("text", ["80XB", "80G", "GiB", "-1GB", "0", "lots"])
def test_parse_size_rejects(text):
    with pytest.raises(planner.PlanError, match="^--host-memory: "):
        planner.parse_size(text, "--host-memory")


SAMPLE = ["--params", "7B", "--precision", "bf16", "--gpus", "8", "--gpu-memory", "80GiB", "--host-memory", "1TB"]


def _tables(text: str) -> list[list[str]]:
    """The blocks that start with an algorithm header."""
    blocks = [b.splitlines() for b in text.split("\n\n")]
    return [b for b in blocks if b and b[0].split()[-7:] == list(model_size.ALGORITHMS)]


def test_rendered_output_is_a_readable_table(capsys):
    assert plan_command.main(SAMPLE) == 0
    out = capsys.readouterr().out
    assert "units: GB = 10^9 bytes" in out
    assert "--hidden 4096" in out  # the square-matrix assumption is stated
    assert "ZeRO-1" in out
    tables = _tables(out)
    assert len(tables) == 3
    for t in tables:
        assert set(t[1]) == {"-"}
        assert len({len(line) for line in t}) == 1, "columns are right-aligned to the header"
        for line in t[2:]:
            assert len(line.rsplit(None, 7)) == 8, line  # a label and one cell per algorithm
    whole = {line.rsplit(None, 7)[0].strip(): line.split()[-7:] for line in tables[0][2:]}
    assert whole["total"][0] == "112.00"
    assert whole["bytes per parameter"] == ["16.00", "10.03", "8.00", "12.00", "12.00", "12.00", "12.00"]
    per_gpu = {line.rsplit(None, 7)[0].strip(): line.split()[-7:] for line in tables[1][2:]}
    assert per_gpu["total"][0] == "38.50"
    assert per_gpu["optimizer state"][2] == "<0.01"
    assert out.rstrip().splitlines()[-1].startswith("Recommendation: adamw with its state on the GPU: 38.50 GB")


@pytest.mark.parametrize("argv, flag", [
    (["--params", "banana"], "--params"),
    (["--params", "7B", "--gpus", "0"], "--gpus"),
    (["--params", "7B", "--gpus", "two"], "--gpus"),
    (["--params", "7B", "--gpus", "8", "--nodes", "3"], "--nodes"),
    (["--params", "7B", "--gpu-memory", "80XB"], "--gpu-memory"),
    (["--params", "7B", "--reserve", "150%"], "--reserve"),
    (["--params", "7B", "--precision", "fp8"], "--precision"),
    (["--params", "7B", "--shard", "zero9"], "--shard"),
    (["--params", "7B", "--hidden", "0"], "--hidden"),
    (["--params", "7B", "--disk", "big"], "--disk"),
    ([], "--params"),
    (["--params", "7B", "--model", "x.json"], "--params"),
    (["--model", "/nonexistent/config.json"], "--model"),
])
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, flag):
    assert plan_command.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stated plan: error: {flag}: ")


def test_missing_config_fields_on_the_command_line(tmp_path, capsys):
    path = _write(tmp_path, {"model_type": "gpt2", "n_embd": 768})
    assert plan_command.main(["--model", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "vocab_size, n_layer, n_positions" in err


def test_model_config_on_the_command_line(tmp_path, capsys):
    path = _write(tmp_path, CONFIGS[-1][0])
    assert plan_command.main(["--model", path, "--gpu-memory", "24GiB", "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 parameters" in out and "assumption" not in out


def test_nothing_fits_exits_1(capsys):
    assert plan_command.main(["--params", "1T", "--gpu-memory", "80GiB", "--host-memory", "1TB"]) == 1
    assert "No configuration fits" in capsys.readouterr().out


def test_add_parser_registers_plan_with_help_for_every_flag():
    root = argparse.ArgumentParser(prog="stated")
    sub = root.add_subparsers(dest="command")
    parser = plan_command.add_parser(sub)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    args = root.parse_args(["plan", "--params", "7B", "--gpus", "8"])
    assert args.command == "plan" and args.params == "7B"
    text = parser.format_help()
    for words in ("ZeRO-1", "10^9", "112 GB", "Exit status"):
        assert words in text


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "stated.tools.plan_command", "--params", "7B", "--gpu-memory", "80GiB"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Recommendation: adamw8bit" in proc.stdout


def test_stated_cli_dispatches_plan(capsys):
    from stated.cli import main

    assert main(["plan", *SAMPLE]) == 0
    assert "Recommendation: adamw" in capsys.readouterr().out
