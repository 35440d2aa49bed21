"""bf16 model dtype (``precision``) and the ``auto`` compute dtype of 4-bit layers: resolution per
device, dtypes through the model, bf16 QLoRA logits against fp32 on the same weights, training with
resume, merge and generation in bf16."""

import copy
import json

import pytest
import torch

from cpm_live.config import ConfigError, CPMBeeConfig, resolve_compute_dtype
from cpm_live.generation import CPMBeeBeamSearch, CPMBeeGreedy
from cpm_live.layers import Linear4bit
from cpm_live.lora import LoraSettings, add_lora, lora_layers, merged_dense_weight
from cpm_live.models import CPMBee
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from tests.tiny_models import packed_batch, run, tiny_config

# bf16 QLoRA (bf16 model, bf16 4-bit matmuls, fp32 LoRA branch) vs fp32 QLoRA on the same packed weights
# and adapter, tiny 2-layer model: relative L2 error of the logits 0.010-0.012 over seeds 0-4 (bf16's
# unit roundoff is 2^-9 = 0.2% per rounding). docs/architecture.md states this tolerance.
BF16_LOGITS_RELATIVE_ERROR = 0.03


@pytest.mark.parametrize(("device", "capability", "cpu_bf16", "model_dtype", "expected"), [
    ("cuda", (9, 0), None, torch.float16, "bfloat16"),
    ("cuda", (8, 0), None, torch.float32, "bfloat16"),
    ("cuda", (7, 5), None, torch.float16, "float16"),  # Turing: no bf16 tensor cores, the model's dtype
    ("cuda", (7, 0), None, torch.float32, "float32"),
    ("cpu", None, True, torch.float32, "bfloat16"),     # avx512_bf16 / AMX
    ("cpu", None, False, torch.float32, "float32"),
    ("cpu", None, False, torch.float16, "float32"),     # emulated half matmuls are slower than fp32
    ("cpu", None, False, torch.bfloat16, "float32"),
], ids=["sm90", "sm80-fp32-model", "sm75-fp16-model", "sm70-fp32-model", "cpu-bf16", "cpu-plain",
        "cpu-plain-fp16-model", "cpu-plain-bf16-model"])
def test_auto_compute_dtype_follows_the_hardware(device, capability, cpu_bf16, model_dtype, expected):
    assert resolve_compute_dtype("auto", model_dtype, device, cuda_capability=capability,
                                 cpu_bf16=cpu_bf16) == expected


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16", "torch.bfloat16"])
def test_explicit_compute_dtype_is_kept_on_any_device(setting):
    for device, capability, cpu_bf16 in (("cuda", (9, 0), None), ("cpu", None, True), ("cpu", None, False)):
        assert resolve_compute_dtype(setting, torch.float16, device, capability, cpu_bf16) == \
            setting.removeprefix("torch.")


def test_auto_is_the_default_and_a_resolved_config_records_the_choice():
    config = tiny_config(int4=True)
    assert config.int4_compute_dtype == "auto"
    resolved = config.resolve_compute_dtype("cpu")
    assert resolved.int4_compute_dtype == resolve_compute_dtype("auto", torch.float32, "cpu")
    assert json.loads(resolved.to_json_string())["int4_compute_dtype"] == resolved.int4_compute_dtype
    assert tiny_config(int4=True, int4_compute_dtype="float32").resolve_compute_dtype("cpu").compute_dtype \
        == torch.float32
    with pytest.raises(ConfigError, match=r"int4_compute_dtype.*'fp8'"):
        tiny_config(int4_compute_dtype="fp8")


def test_precision_names_the_model_dtype_and_half_keeps_its_meaning(tmp_path):
    assert tiny_config().dtype == torch.float32 and tiny_config(half=True).dtype == torch.float16
    for name, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                        ("half", torch.float16), ("float32", torch.float32)):
        config = tiny_config(precision=name, half=True)
        assert config.dtype == dtype and config.half == (dtype == torch.float16)
    bf16 = tiny_config(precision="bf16")
    assert bf16.to_original_dict()["half"] is False  # CPM-Bee's loader gets the nearest dtype it knows
    bf16.to_json_file(tmp_path / "c.json")
    again = CPMBeeConfig.from_json_file(tmp_path / "c.json")
    assert again == bf16 and again.dtype == torch.bfloat16
    assert bf16.with_dtype(torch.float32).dtype == torch.float32
    assert tiny_config(half=True).with_dtype(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"precision.*'int8'.*cpm-bee-tiny\.json"):
        tiny_config(precision="int8")


def bf16_twin(fp32_model: CPMBee) -> CPMBee:
    """The same weights (packed 4-bit bytes copied as they are, the rest cast) in a bf16 model."""
    config = CPMBeeConfig.from_dict({**fp32_model.config.to_dict(), "precision": "bf16",
                                     "int4_compute_dtype": "bfloat16"})
    model = CPMBee(config)
    if lora_layers(fp32_model):
        add_lora(model, LoraSettings())
    model.load_state_dict(fp32_model.state_dict())
    return model


def trained_looking_qlora(seed: int) -> CPMBee:
    torch.manual_seed(seed)
    model = CPMBee(tiny_config(int4=True, int4_compute_dtype="float32"))
    add_lora(model, LoraSettings())
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.5)
    return model


def test_bf16_model_keeps_lora_fp32_and_4bit_state_exact():
    model = bf16_twin(trained_looking_qlora(0))
    assert model.input_embedding.weight.dtype == torch.bfloat16
    assert model.position_bias.relative_attention_bias.dtype == torch.bfloat16
    assert model.encoder.output_layernorm.weight.dtype == torch.bfloat16
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized and all(m.dtype == torch.bfloat16 and m.compute_dtype == torch.bfloat16 and
                             m.weight.dtype == torch.uint8 and m.weight_nested_absmax.dtype == torch.float32
                             for m in quantized)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    logits = run(model, packed_batch(model.config.vocab_size))
    assert logits.dtype == torch.bfloat16
    logits.float().nan_to_num(0.0, 0.0, 0.0).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_qlora_logits_match_fp32_on_the_same_weights(seed):
    fp32 = trained_looking_qlora(seed).eval()
    bf16 = bf16_twin(fp32).eval()
    batch = packed_batch(fp32.config.vocab_size, seed)
    with torch.no_grad():
        expected, got = run(fp32, batch), run(bf16, batch)
    valid = torch.isfinite(expected)
    assert torch.equal(valid, torch.isfinite(got))  # the same masked (-inf) columns
    error = ((got.float() - expected)[valid].norm() / expected[valid].norm()).item()
    assert 0 < error < BF16_LOGITS_RELATIVE_ERROR


def test_bf16_merge_uses_the_exact_4bit_values():
    fp32 = trained_looking_qlora(0)
    bf16 = bf16_twin(fp32)
    for name, layer in lora_layers(fp32).items():
        assert torch.equal(merged_dense_weight(lora_layers(bf16)[name]), merged_dense_weight(layer))


def test_bf16_int4_lora_model_generates(tmp_path):
    tokenizer = CPMBeeTokenizer(build_tiny_vocab(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    config = tiny_config(int4=True, precision="bf16", vocab_size=tokenizer.vocab_size)
    model = CPMBee(config)
    torch.nn.init.normal_(model.input_embedding.weight, std=1.0)
    add_lora(model, LoraSettings())
    model.eval()
    samples = [{"input": "hello world", "<ans>": ""}, {"input": "a b c", "<ans>": {"x": "", "y": ""}}]
    greedy = CPMBeeGreedy(model, tokenizer).generate(copy.deepcopy(samples), max_length=4)
    beam1 = CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples), beam_size=1, max_length=4)
    assert greedy == beam1 and all(isinstance(r["<ans>"], (str, dict)) for r in greedy)
