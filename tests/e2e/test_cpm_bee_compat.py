"""Files and commands CPM-Bee users already have: Hugging Face model directories, the qlora PR's
compressed checkpoints (and a booby-trapped one), the original flag meanings and names."""

import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cpm_live.checkpoint import CheckpointError, build_model, open_checkpoint
from cpm_live.convert.cli import main as quantize_cli
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.convert.export import export_checkpoint
from cpm_live.delta import read_adapter
from cpm_live.delta.adapter_files import LoraDelta
from cpm_live.demo import DEMO_WORDS
from cpm_live.generation.cli import device_name
from cpm_live.generation.cli import main as generate
from cpm_live.model_dir import CompatibilityWarning, load_config, read_config
from cpm_live.models import ConfigError, CPMBee, CPMBeeConfig, CPMBeeTorch
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from cpm_live.tokenizers.bee import VocabError
from cpm_live.training.cli import main as finetune
from cpm_live.training.cli import qlora_main
from tests.conftest import DATA

PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
SAMPLES = [{"input": "3 + 4", "question": "What is the sum?", "<ans>": ""},
           {"input": "one two", "options": {"<option_0>": "1", "<option_1>": "2"}, "<ans>": ""}]


@pytest.fixture(scope="module")
def bee(tmp_path_factory):
    """A tiny random CPM-Bee: vocab, fp32 config and .pt, and an fp16 .pt (the qlora PR quantizes fp16)."""
    root = tmp_path_factory.mktemp("bee")
    vocab = build_tiny_vocab(root / "vocab.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    config = CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, dim_model=64, num_heads=2, dim_head=32,
                          dim_ff=128, num_layers=2, half=False)
    config.to_json_file(root / "config.json")
    torch.manual_seed(0)
    state = {k: v * 0.05 for k, v in CPMBee(config).state_dict().items()}
    torch.save(state, root / "model.pt")
    torch.save({k: v.half() for k, v in state.items()}, root / "model-fp16.pt")
    return SimpleNamespace(root=root, vocab=Path(vocab), config=config, state=state, pt=root / "model.pt",
                           pt16=root / "model-fp16.pt")


def hf_config_json(config: CPMBeeConfig) -> dict:
    """config.json as the Hugging Face port writes it (written out by hand, not by the code under test)."""
    return {"architectures": ["CpmBeeForCausalLM"], "model_type": "cpmbee", "auto_map": {
        "AutoConfig": "configuration_cpmbee.CpmBeeConfig", "AutoModelForCausalLM": "modeling_cpmbee.CpmBeeForCausalLM"},
        "vocab_size": config.vocab_size, "hidden_size": config.dim_model, "num_attention_heads": config.num_heads,
        "dim_head": config.dim_head, "dim_ff": config.dim_ff, "num_hidden_layers": config.num_layers,
        "dropout_p": 0.0, "position_bias_num_buckets": 256, "position_bias_num_segment_buckets": 256,
        "position_bias_max_distance": 2048, "eps": 1e-6, "half": False, "mask_modules": None,
        "torch_dtype": "float32", "init_std": 1.0, "use_cache": True, "distance_scale": 16,
        "transformers_version": "4.31.0"}


def hf_bin_dir(bee, path: Path, lm_head: torch.Tensor | None = None) -> Path:
    """One pytorch_model.bin with ``cpmbee.`` keys and a tied ``lm_head.weight``, config.json, vocab.txt."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config_json(bee.config)))
    state = {"cpmbee." + k: v for k, v in bee.state.items()}
    state["lm_head.weight"] = state["cpmbee.input_embedding.weight"] if lm_head is None else lm_head
    torch.save(state, path / "pytorch_model.bin")
    shutil.copyfile(bee.vocab, path / "vocab.txt")
    return path


@pytest.fixture(scope="module")
def hf_dirs(bee, tmp_path_factory):
    """The two layouts of the "Done when": single .bin, and sharded safetensors with an index."""
    root = tmp_path_factory.mktemp("hf")
    sharded = root / "sharded"
    summary = export_checkpoint(bee.config, bee.pt, sharded, "fp32", fmt="hf", vocab=str(bee.vocab),
                                max_shard_bytes=100_000, progress=False)
    assert summary.keys == len(bee.state)
    return {"bin": hf_bin_dir(bee, root / "bin"), "sharded": sharded}


def logits(model: CPMBee) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n = 12
    ids = torch.randint(11, model.config.vocab_size, (1, n), generator=g, dtype=torch.int32)
    zeros, ones = torch.zeros(1, n, dtype=torch.int32), torch.ones(1, n, dtype=torch.int32)
    with torch.no_grad():
        out, _ = model.eval()(ids, zeros, torch.tensor([n], dtype=torch.int32), torch.ones(1, n, dtype=torch.bool),
                              zeros, ones, zeros, zeros, torch.zeros(1, 1, dtype=torch.int32), zeros, zeros[0, :1],
                              zeros[0, :1])
    return out


# ------------------------------------------------------------------ Hugging Face model directories


def test_export_hf_writes_a_sharded_directory_in_hf_names(hf_dirs, bee):
    sharded = hf_dirs["sharded"]
    config = json.loads((sharded / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    assert "dim_model" not in config and config["model_type"] == "cpmbee"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == {"cpmbee." + k for k in bee.state}
    assert (sharded / "vocab.txt").read_bytes() == bee.vocab.read_bytes()


@pytest.mark.parametrize("layout", ["bin", "sharded"])
def test_hf_directory_reads_as_the_original_checkpoint(hf_dirs, bee, layout):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatibilityWarning)
        with open_checkpoint(hf_dirs[layout]) as reader:
            assert sorted(reader.keys()) == sorted(bee.state)
            for key, tensor in reader.iter_tensors():
                assert torch.equal(tensor, bee.state[key]), key
        config = load_config(None, hf_dirs[layout])
    assert config.to_dict() == bee.config.to_dict()
    assert torch.equal(logits(build_model(config, hf_dirs[layout])), logits(build_model(bee.config, bee.pt)))


@pytest.mark.parametrize("layout", ["bin", "sharded"])
def test_generation_from_hf_directory_needs_no_config_or_vocab(hf_dirs, bee, tmp_path, capsys, layout):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    common = ["--input", str(inp), "--max-length", "4", "--device", "cpu"]
    generate(["--model-config", str(bee.root / "config.json"), "--load", str(bee.pt), "--vocab", str(bee.vocab),
              "--output", str(tmp_path / "original.jsonl"), *common])
    generate(["--load", str(hf_dirs[layout]), "--output", str(tmp_path / "hf.jsonl"), "--use-bminf",
              "--memory-limit", "20", *common])
    assert "BMInf is not used" in capsys.readouterr().err
    original = (tmp_path / "original.jsonl").read_text()
    assert (tmp_path / "hf.jsonl").read_text() == original and original.count("\n") == len(SAMPLES)


@pytest.mark.parametrize("layout", ["bin", "sharded"])
def test_quantizing_a_directory_equals_quantizing_the_pt(hf_dirs, bee, tmp_path, layout):
    quantize_state_dict(bee.pt, tmp_path / "from-pt.safetensors", device="cpu", progress=False)
    quantize_state_dict(hf_dirs[layout], tmp_path / "from-dir.safetensors", device="cpu", progress=False)
    expected, got = load_file(tmp_path / "from-pt.safetensors"), load_file(tmp_path / "from-dir.safetensors")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_hf_directory_warnings_and_errors(bee, hf_dirs, tmp_path):
    untied = hf_bin_dir(bee, tmp_path / "untied", lm_head=torch.zeros_like(bee.state["input_embedding.weight"]))
    with pytest.warns(CompatibilityWarning, match="lm_head.weight differs from input_embedding.weight"):
        open_checkpoint(untied).close()
    other = CPMBeeConfig.from_dict({**bee.config.to_dict(), "dim_ff": 256})
    other.to_json_file(tmp_path / "other.json")
    with pytest.warns(CompatibilityWarning, match=r"differ in dim_ff; using --model-config .*other.json"):
        assert load_config(tmp_path / "other.json", hf_dirs["bin"]).dim_ff == 256
    with pytest.raises(ConfigError, match="--model-config is required: --load .* is not a model directory"):
        load_config(None, bee.pt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no model weights: expected one of model.safetensors.index.json"):
        open_checkpoint(empty)
    (tmp_path / "gpt.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="'gpt2' model, not CPM-Bee"):
        read_config(str(tmp_path / "gpt.json"))


def test_hf_config_defaults_are_the_hf_ports(tmp_path):
    """Fields left out of an HF config.json take CpmBeeConfig's defaults (half false, 32 segment buckets)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "dim_head": 32, "vocab_size": 100}))
    config = load_config(None, folder)
    assert (config.half, config.position_bias_num_segment_buckets, config.dim_ff) == (False, 32, 10240)


# ------------------------------------------------------------------ the qlora PR's compressed checkpoints


class Params4bit(torch.nn.Parameter):
    """The PR's parameter class as far as pickling goes: packed data plus attributes."""

    def __new__(cls, data, quant_state):
        self = torch.Tensor._make_subclass(cls, data, False)
        self.blocksize, self.compress_statistics, self.quant_type = 64, True, "nf4"
        self.quant_state = quant_state
        return self


def pr_layout(state: bnbF.QuantState, layout: str):
    if layout == "quantstate":  # bitsandbytes >= 0.41
        return state
    nested = [state.state2.absmax, state.state2.code, state.state2.blocksize, False]
    if layout == "bnb-0.39":
        return [state.absmax, state.shape, state.dtype, state.blocksize, [state.offset, nested + [None, None]],
                state.quant_type]
    return [state.absmax, state.shape, state.dtype, state.blocksize,  # bnb 0.40
            [state.offset, nested + [torch.float32, None, None]], state.quant_type, state.code]


def write_pr_checkpoint(bee, path: Path, layout: str, extra: dict | None = None) -> Path:
    """What the PR's quantize_state_dict.py writes: Params4bit(value).cuda() of every projection
    (``quantize_4bit(value.half(), 64, compress_statistics=True, "nf4")``), pickled with the states."""
    state_dict, quant = {}, {}
    for key, value in bee.state.items():
        if key.split(".")[-2] in PROJECTIONS:
            packed, qs = bnbF.quantize_4bit(value.half().contiguous(), blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
            quant[key] = pr_layout(qs, layout)
            state_dict[key] = Params4bit(packed, quant[key])
        else:
            state_dict[key] = value.half()
    torch.save({"state_dict": {**state_dict, **(extra or {})}, "quant_state_dict": quant}, path)
    return path


@pytest.mark.parametrize("layout", ["quantstate", "bnb-0.39", "bnb-0.40"])
def test_pr_checkpoint_converts_bit_identically(bee, tmp_path, layout, capsys):
    pr = write_pr_checkpoint(bee, tmp_path / "quantized_model.pt", layout)
    quantize_state_dict(bee.pt16, tmp_path / "ours.safetensors", device="cpu", progress=False)
    quantize_cli(["--input-path", str(pr), "--output-path", str(tmp_path / "converted.bin"), "--device", "cpu"])
    assert "will hold safetensors" in capsys.readouterr().err
    expected, got = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "converted.bin")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    with safe_open(tmp_path / "ours.safetensors", "pt") as a, safe_open(tmp_path / "converted.bin", "pt") as b:
        assert {**a.metadata(), "source": ""} == {**b.metadata(), "source": ""}
    # --load PR.pt works directly, and gives the model the converted file gives
    config = CPMBeeConfig.from_dict({**bee.config.to_dict(), "int4": True, "half": True})
    direct = build_model(config, pr).state_dict()
    converted = build_model(config, tmp_path / "converted.bin").state_dict()
    assert all(torch.equal(direct[k], converted[k]) for k in converted)


class Trap:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["state_dict", "quant_state"])
def test_booby_trapped_pr_checkpoint_runs_nothing_and_is_refused(bee, tmp_path, where):
    marker = tmp_path / "marker"
    path = tmp_path / "trapped.pt"
    if where == "state_dict":
        write_pr_checkpoint(bee, path, "quantstate", extra={"trap": Trap(marker)})
    else:
        state = bnbF.quantize_4bit(torch.ones(4, 64, dtype=torch.half), blocksize=64, compress_statistics=True)[1]
        state.code = Trap(marker)
        torch.save({"state_dict": {"a.project_q.weight": torch.zeros(128, 1, dtype=torch.uint8)},
                    "quant_state_dict": {"a.project_q.weight": state}}, path)
    torch.load(path, weights_only=False)  # the trap is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"objects other than tensors \(posix.system\).*refused without running"):
        open_checkpoint(path)
    with pytest.raises(SystemExit, match="posix.system"):
        quantize_cli(["--input-path", str(path), "--output-path", str(tmp_path / "out.safetensors")])
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------ flags, names, files beside checkpoints


def train_args(bee, save: Path, *extra: str) -> list[str]:
    data = save.parent / "train.jsonl"
    if not data.exists():
        data.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:24]))
    return ["--model-config", str(bee.root / "config.json"), "--load", str(bee.pt), "--vocab", str(bee.vocab),
            "--dataset", str(data), "--save", str(save), "--max-length", "64", "--batch-size", "4",
            "--engine", "torch", "--device", "cpu", "--inspect-iters", "0", "--no-activation-checkpointing",
            "--use-delta", "--lora-r", "4", "--lora-alpha", "32", *extra]


def test_epoch_decides_the_length_and_train_iters_the_schedule(bee, tmp_path, capsys):
    one = finetune(train_args(bee, tmp_path / "one", "--epoch", "1"))
    assert one["stop_reason"] == "epochs done" and one["step"] >= 2
    two = finetune(train_args(bee, tmp_path / "two", "--epoch", "2", "--train-iters", "3",
                              "--delta-format", "opendelta"))
    assert two == {**two, "step": 2 * one["step"], "stop_reason": "epochs done"}
    assert "only sizes the learning-rate schedule; training runs all --epoch 2 epochs" in capsys.readouterr().out
    pr = qlora_main(train_args(bee, tmp_path / "pr", "--epoch", "2", "--train-iters", "3"))
    assert (pr["step"], pr["stop_reason"]) == (3, "train-iters reached")
    assert "stops after --train-iters 3 steps" in capsys.readouterr().out

    # model_config.json: CPM-Bee's CPMBeeConfig(**json) accepts exactly these arguments (main 95cc575)
    def original_config(vocab_size=30720, dim_model=4096, num_heads=64, dim_head=64, dim_ff=10240, num_layers=32,
                        dropout_p=0.0, position_bias_num_buckets=256, position_bias_num_segment_buckets=256,
                        position_bias_max_distance=2048, eps=1e-6, half=True, mask_modules=None):
        return dict(locals())

    save = tmp_path / "two"
    values = original_config(**json.loads((save / "model_config.json").read_text()))
    assert values == {k: v for k, v in bee.config.to_dict().items() if k in values}
    assert CPMBeeConfig.from_json_file(save / "model_config.cpm_live.json") == bee.config
    # --delta-format opendelta: CPM-Bee's *-delta-last.pt beside the peft directory, same weight deltas
    delta_pt = torch.load(save / "cpm_bee_finetune-delta-last.pt", weights_only=True)
    assert delta_pt and all(k.endswith((".lora.lora_A", ".lora.lora_B")) for k in delta_pt)
    settings, state = read_adapter(save / "cpm_bee_finetune-delta-last")
    peft = LoraDelta(state, settings)
    settings, state = read_adapter(save / "cpm_bee_finetune-delta-last.pt")
    original = LoraDelta(state, settings)
    assert peft.weight_keys == original.weight_keys
    for key in peft.weight_keys:
        assert peft(key).abs().max() > 0
        torch.testing.assert_close(original(key), peft(key), rtol=1e-6, atol=0)


def test_original_names_and_device_flags(tmp_path):
    assert CPMBeeTorch is CPMBee
    with pytest.raises(VocabError, match=r"vocab.txt.*src/cpm_live/vocabs/bee.txt"):
        CPMBeeTokenizer()
    assert device_name("cuda:0") == "cuda:0" and device_name("cpu") == "cpu"
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(Exception, match="must be cpu, cuda or cuda:N"):
            device_name(bad)
    if torch.cuda.device_count() < 4:
        with pytest.raises(SystemExit):
            generate(["--load", str(tmp_path), "--input", "x", "--output", "y", "--device", "cuda:3"])


def test_export_hf_in_bf16_loads_back_as_a_bf16_model(bee, tmp_path):
    """--dtype bf16 --format hf: bf16 shards (config.json's torch_dtype says so), which a bf16 model
    loads with logits close to the fp32 original (bf16 rounding of the weights)."""
    out = tmp_path / "bf16"
    export_checkpoint(bee.config, bee.pt, out, "bf16", fmt="hf", vocab=str(bee.vocab), progress=False)
    with open_checkpoint(out) as reader:
        assert {reader.info(k)[1] for k in reader.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    config = load_config(None, out).with_dtype(torch.bfloat16)
    got, want = logits(build_model(config, out)).float(), logits(build_model(bee.config, bee.pt))
    assert ((got - want).norm() / want.norm()).item() < 0.03
