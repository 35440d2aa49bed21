"""cpm_live.lora: LoRA on Linear and Linear4bit through peft, adapter files, merge/export math."""

import argparse
import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cpm_live.checkpoint.adapters import (
    LoraDelta,
    load_adapter,
    merge_lora_into_state_dict,
    read_adapter,
    save_adapter,
)
from cpm_live.errors import AdapterError, MergeError
from cpm_live.layers import Linear, Linear4bit
from cpm_live.lora import (
    LoraLinear,
    LoraQuantized,
    LoraSettings,
    add_lora,
    add_lora_args,
    lora_layers,
    lora_settings_from_args,
    lora_state_dict,
    merged_dense_weight,
    trainable_parameter_report,
)
from cpm_live.lora.inject import lora_parameters
from cpm_live.models import CPMBee, CPMBeeConfig
from tests.conftest import CONFIG_DIR

PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
# Base variants: dense fp32, dense fp16, 4-bit NF4 with fp32 and with fp16 dense dtype.
VARIANTS = {
    "fp32": ("cpm-bee-tiny.json", {}),
    "fp16": ("cpm-bee-tiny.json", {"half": True}),
    # fp32 4-bit matmuls on every CPU ("auto" would pick bf16 on a bf16 CPU): these tests check exact math
    "int4": ("cpm-bee-tiny-int4.json", {"int4_compute_dtype": "float32"}),
    "int4-fp16": ("cpm-bee-tiny-int4.json", {"half": True, "int4_compute_dtype": "float32"}),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model(variant: str = "fp32", seed: int = 0, **overrides) -> CPMBee:
    name, base = VARIANTS[variant]
    torch.manual_seed(seed)
    return CPMBee(CPMBeeConfig.from_json_file(CONFIG_DIR / name, **{**base, **overrides}))


def lora_model(variant: str = "fp32", settings: LoraSettings | None = None, randomize: bool = True,
               seed: int = 0) -> CPMBee:
    """A model with LoRA whose B is random (B = 0 at init would make every LoRA check vacuous)."""
    model = add_lora(make_model(variant, seed), settings or LoraSettings())
    if randomize:
        with torch.no_grad():
            for p in lora_state_dict(model).values():
                p.normal_(0.0, 0.05)
    return model


def tiny_batch(vocab_size: int, B: int = 2, L: int = 10) -> dict[str, torch.Tensor]:
    """One sample per row, one segment; the first half of each row is context."""
    g = torch.Generator().manual_seed(1)
    i32 = torch.int32
    zeros = torch.zeros(B, L, dtype=i32)
    return {
        "input": torch.randint(11, vocab_size, (B, L), generator=g, dtype=i32), "input_sub": zeros,
        "length": torch.tensor([L, L - 3], dtype=i32), "context": torch.arange(L).expand(B, L) < L // 2,
        "sample_ids": zeros, "num_segments": torch.ones(B, L, dtype=i32), "segment": zeros,
        "segment_rel_offset": zeros, "segment_rel": torch.zeros(B, 1, dtype=i32), "span": zeros,
        "ext_table_ids": torch.tensor([0], dtype=i32), "ext_table_sub": torch.tensor([0], dtype=i32),
    }


def logits(model: CPMBee, batch: dict) -> torch.Tensor:
    return model(*batch.values())[0]


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------- injection and freezing
@pytest.mark.parametrize("variant", VARIANTS)
def test_injection_wraps_only_targets_with_fp32_lora(variant):
    model = make_model(variant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, LoraSettings(targets=("project_q", "w_out")))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    base_type = Linear4bit if variant.startswith("int4") else Linear
    lora_type = LoraQuantized if variant.startswith("int4") else LoraLinear
    layers = lora_layers(model)
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == ["project_q", "w_out"]
    assert len(layers) == 2 * model.config.num_layers
    for layer in layers.values():
        assert type(layer) is lora_type and type(layer.base_layer) is base_type
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert layer.lora_B["default"].weight.dtype == torch.float32
        assert layer.scaling["default"] == 2.0
    attention = model.encoder.layers[0].self_att.self_attention
    assert type(attention.project_k) is base_type and type(attention.project_v) is base_type


@pytest.mark.parametrize("variant", ["fp16", "int4-fp16"])
def test_forward_at_init_equals_base_forward(variant):
    batch = tiny_batch(1024)
    base = logits(make_model(variant), batch)
    with_lora = logits(lora_model(variant, randomize=False), batch)
    assert with_lora.dtype == base.dtype
    assert torch.equal(with_lora, base)  # B = 0: the fp32 branch adds exact zeros


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_only_lora_trains_and_base_state_is_unchanged(variant):
    model = lora_model(variant, randomize=False)
    lora_keys = {k.replace(".weight", ".default.weight") for k in lora_state_dict(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits(model, tiny_batch(1024)).float().pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in lora_keys if ".lora_B." in k} <= changed <= lora_keys
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora_keys)
    if variant == "int4":  # the packed 4-bit weight and its statistics are in the state dict, untouched
        assert any(k.endswith("project_q.base_layer.weight.absmax") for k in before)


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_lora_gradients_match_finite_differences(variant):
    """Autograd's gradient of every LoRA weight on all seven projections equals a central difference
    of a cross entropy through the whole model, along a seeded random direction (fp64 sums)."""
    model = lora_model(variant, LoraSettings(r=4, alpha=8, targets=PROJECTIONS))
    batch = tiny_batch(1024)
    target = torch.randint(11, 1024, batch["input"].shape, generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits(model, batch).float().flatten(0, 1), target.flatten().long())

    loss().backward()
    params = lora_parameters(model)
    assert len(params) == 2 * len(PROJECTIONS) * model.config.num_layers
    g = torch.Generator().manual_seed(3)
    eps = 1e-2  # fp32 forward: loss ~7 carries ~1e-6 rounding, i.e. ~1e-5 on the difference quotient
    numerics = []
    for key, p in params.items():
        direction = torch.randn(p.shape, generator=g)
        with torch.no_grad():
            p.add_(eps * direction)
            up = loss().double()
            p.sub_(2 * eps * direction)
            down = loss().double()
            p.add_(eps * direction)
        numeric = float((up - down) / (2 * eps))
        analytic = float((p.grad.double() * direction.double()).sum())
        assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-4), key
        numerics.append(abs(numeric))
    assert min(numerics) > 1e-4 and max(numerics) > 1e-2  # every LoRA weight moves the loss: not 0 == 0


def test_trainable_parameter_report_counts_4bit_weights_logically():
    settings = LoraSettings(r=4)
    dense, int4 = lora_model("fp32", settings), lora_model("int4", settings)
    total = sum(p.numel() for p in make_model("fp32").parameters())
    lora = sum(p.numel() for p in lora_state_dict(dense).values())
    assert lora == 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (q, v) x (A + B)
    expected = f"trainable params: {lora:,d} || all params: {total + lora:,d} || trainable%: "
    assert trainable_parameter_report(dense).startswith(expected)
    assert trainable_parameter_report(int4) == trainable_parameter_report(dense)


def test_add_lora_rejects_bad_settings_and_targets():
    with pytest.raises(ValueError, match="r=0"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="alpha"):
        LoraSettings(alpha=0)
    with pytest.raises(ValueError, match=r"'project_x'.*\['attention_out', "):
        add_lora(make_model(), LoraSettings(targets=("project_q", "project_x")))
    with pytest.raises(ValueError, match="not Linear/Linear4bit"):
        add_lora(make_model(), LoraSettings(targets=("self_attention",)))
    model = lora_model()
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoraSettings())


def test_cli_options():
    parser = add_lora_args(argparse.ArgumentParser())
    assert lora_settings_from_args(parser.parse_args([])) is None
    args = parser.parse_args(["--use-delta", "--lora-r", "4", "--lora-alpha", "32", "--lora-dropout", "0.1",
                              "--lora-targets", "project_q,w_0"])
    expected = LoraSettings(r=4, alpha=32, dropout=0.1, targets=("project_q", "w_0"))
    assert lora_settings_from_args(args) == expected
    assert lora_settings_from_args(parser.parse_args(["--use-delta"])) == LoraSettings()


# ---------------------------------------------------------------- merge properties (one layer)
def lora_layer(base: torch.nn.Module) -> LoraLinear:
    holder = torch.nn.Module()
    holder.project_q = base
    add_lora(holder, LoraSettings(targets=("project_q",)))
    with torch.no_grad():
        for p in lora_state_dict(holder).values():
            p.normal_(0.0, 0.1)
    return holder.project_q


def test_merge_unmerge_and_disable_on_dense_linear():
    layer = lora_layer(Linear(64, 48, dtype=torch.float32))
    x = torch.randn(5, 64)
    base_out = layer.base_layer(x)
    weight = layer.base_layer.weight.detach().clone()
    lora_out = layer(x)
    assert close(lora_out, base_out) > 1e-2  # the adapter does something

    layer.merge(safe_merge=True)
    assert layer.merged and close(layer(x), lora_out) < 1e-5  # merged output == unmerged output
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()  # merging twice adds nothing
    assert close(layer(x), lora_out) < 1e-5
    layer.unmerge()
    assert not layer.merged and close(layer.base_layer.weight, weight) < 1e-6  # unmerge restores
    assert close(layer(x), lora_out) < 1e-6

    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))  # disabled adapter gives the base output
    layer.enable_adapters(True)
    layer.merge()
    layer.enable_adapters(False)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


def test_merged_dense_weight_reproduces_4bit_lora_output():
    layer = lora_layer(Linear4bit(64, 48, dtype=torch.float32))
    x = torch.randn(5, 64)
    merged = merged_dense_weight(layer)
    assert merged.dtype == torch.float32 and merged.shape == (48, 64)
    assert close(x @ merged.T / math.sqrt(64), layer(x)) < 1e-5
    with pytest.raises(RuntimeError, match="merge_lora_into_state_dict"):
        layer.merge()
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


# ---------------------------------------------------------------- export math on a whole model
def dense_base_state(model: CPMBee) -> dict[str, torch.Tensor]:
    """The model's base weights as a dense state dict in CPM-Bee's original key layout."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Linear4bit)):
            owner = name.removesuffix(".base_layer")
            dense = module.dequantize() if isinstance(module, Linear4bit) else module.weight
            state[f"{owner}.weight"] = dense.detach().clone()
    for name, p in model.named_parameters():
        if p.is_floating_point() and ".lora_" not in name and "_absmax" not in name:
            state.setdefault(name.replace(".base_layer", ""), p.detach().clone())
    return state


# Measured max relative logit difference: fp32 1.1e-6, int4 8e-7, fp16 2.3e-3, int4-fp16 1.9e-3 (the
# fp16 cases are the fp16 model's own rounding: merged weights are stored in fp16).
@pytest.mark.parametrize("variant,tol", [("fp32", 1e-5), ("int4", 1e-5), ("fp16", 1e-2), ("int4-fp16", 1e-2)])
def test_merged_state_dict_reproduces_lora_logits(variant, tol):
    settings = LoraSettings(targets=PROJECTIONS)
    model = lora_model(variant, settings)
    batch = tiny_batch(1024)
    expected = logits(model, batch)
    merged = merge_lora_into_state_dict(dense_base_state(model), lora_state_dict(model), settings)
    dense = make_model("fp16" if variant.endswith("fp16") else "fp32", seed=1)
    dense.load_state_dict(merged, strict=True)
    assert close(logits(dense, batch), expected) < tol
    for layer in lora_layers(model).values():
        layer.enable_adapters(False)
    assert close(logits(model, batch), expected) > 0.1  # the adapter changes the logits a lot


def test_qlora_adapter_exports_through_cpm_bee_export(tmp_path):
    """dense .pt -> cpm-bee-quantize -> int4 model + LoRA -> adapter dir -> fp32 export with LoraDelta."""
    from cpm_live.checkpoint import load_model_weights
    from cpm_live.convert.compress import quantize_state_dict
    from cpm_live.convert.export import export_checkpoint

    torch.save(make_model("fp32").state_dict(), tmp_path / "base.pt")
    quantize_state_dict(tmp_path / "base.pt", tmp_path / "base-nf4.safetensors", progress=False)
    qlora = make_model("int4", seed=1)
    load_model_weights(qlora, qlora.config, tmp_path / "base-nf4.safetensors")
    settings = LoraSettings(r=4, alpha=8, targets=PROJECTIONS)
    add_lora(qlora, settings)
    with torch.no_grad():
        for p in lora_state_dict(qlora).values():
            p.normal_(0.0, 0.05)
    save_adapter(qlora, settings, tmp_path / "adapter")

    read_settings, adapter = read_adapter(tmp_path / "adapter")
    delta = LoraDelta(adapter, read_settings)
    summary = export_checkpoint(qlora.config, tmp_path / "base-nf4.safetensors", tmp_path / "merged.pt",
                                dtype="fp32", delta_fn=delta, progress=False)
    assert sorted(summary.merged) == delta.weight_keys and len(delta.weight_keys) == 7 * 2
    dense = make_model("fp32", seed=2)
    dense.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True), strict=True)
    batch = tiny_batch(1024)
    assert close(logits(dense, batch), logits(qlora, batch)) < 1e-5


def test_merge_into_state_dict_refuses_packed_4bit_weights():
    model = lora_model("int4")
    packed = {k.replace(".base_layer", ""): v for k, v in make_model("int4").state_dict().items()}
    with pytest.raises(AdapterError, match="dequantize a 4-bit checkpoint first"):
        merge_lora_into_state_dict(packed, lora_state_dict(model), LoraSettings())


def test_non_finite_merges_are_refused_before_any_weight_changes():
    """The layer's safe merge and the state-dict merge share one fp32 merge that checks finiteness."""
    layer = lora_layer(Linear(64, 48, dtype=torch.float32))
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[3, 0] = float("inf")
    with pytest.raises(MergeError, match="LoRA adapter 'default' gives non-finite values"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged
    base = {"project_q.weight": weight}
    adapter = {"project_q.lora_A.weight": layer.lora_A["default"].weight.detach(),
               "project_q.lora_B.weight": layer.lora_B["default"].weight.detach()}
    with pytest.raises(MergeError, match="'project_q.weight' gives non-finite values"):
        merge_lora_into_state_dict(base, adapter, LoraSettings(r=layer.r["default"], targets=("project_q",)))


# ---------------------------------------------------------------- adapter files
def test_peft_format_round_trip(tmp_path):
    settings = LoraSettings(r=4, alpha=8, targets=("project_q", "project_v", "w_1"))
    model = lora_model("int4", settings)
    save_adapter(model, settings, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]

    config = LoraConfig.from_pretrained(str(tmp_path / "adapter"))  # peft's own reader
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 4, 8)
    assert set(config.target_modules) == {"project_q", "project_v", "w_1"}
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["auto_mapping"]["base_model_shape"]["dim_model"] == 64
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.encoder.layers.1.ffn.ffn.w_in.w_1.lora_B.weight" in tensors

    read_settings, read_state = read_adapter(tmp_path / "adapter")
    assert read_settings == LoraSettings(r=4, alpha=8, targets=("project_q", "project_v", "w_1"))
    assert read_state.keys() == lora_state_dict(model).keys()

    batch = tiny_batch(1024)
    fresh = load_adapter(make_model("int4"), tmp_path / "adapter")  # injects LoRA from the file
    assert torch.equal(logits(fresh, batch), logits(model, batch))

    peft_loaded = add_lora(make_model("int4"), settings)  # peft's loader accepts the file as is
    result = set_peft_model_state_dict(peft_loaded, tensors)
    assert not result.unexpected_keys
    assert torch.equal(logits(peft_loaded, batch), logits(model, batch))


def test_save_from_engine_state_dict_matches_model_save(tmp_path):
    model = lora_model()
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}  # '.default.' keys
    save_adapter(model, LoraSettings(), tmp_path / "a")
    save_adapter(trainable, LoraSettings(), tmp_path / "b", base_config=model.config)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = ((tmp_path / d / "adapter_config.json").read_text() for d in "ab")
    assert config_a == config_b


def cpm_bee_delta(model: CPMBee) -> dict[str, torch.Tensor]:
    """What the original finetune script saved with --use-delta: fp16 LoRA tensors, OpenDelta keys."""
    return {k.replace(".lora_A.weight", ".lora.lora_A").replace(".lora_B.weight", ".lora.lora_B"): v.half()
            for k, v in lora_state_dict(model).items()}


def test_original_cpm_bee_delta_loads(tmp_path):
    model = lora_model()
    delta = cpm_bee_delta(model)
    assert "encoder.layers.0.self_att.self_attention.project_q.lora.lora_A" in delta
    torch.save(delta, tmp_path / "cpm_bee_finetune-delta-best.pt")

    settings, state = read_adapter(tmp_path / "cpm_bee_finetune-delta-best.pt")
    assert settings == LoraSettings()  # r from the shapes, alpha = CPM-Bee's 16, targets from the keys
    fresh = load_adapter(make_model(), tmp_path / "cpm_bee_finetune-delta-best.pt")
    for key, value in lora_state_dict(fresh).items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key])
        assert torch.equal(value, lora_state_dict(model)[key].half().float())
    batch = tiny_batch(1024)
    assert close(logits(fresh, batch), logits(model, batch)) < 1e-3  # fp16 rounding of the delta only


def test_bad_adapter_inputs_name_the_problem(tmp_path):
    with pytest.raises(AdapterError, match="adapter not found: .*nowhere"):
        load_adapter(make_model(), tmp_path / "nowhere")

    model = lora_model()
    delta = cpm_bee_delta(model)
    missing = dict(delta)
    del missing["encoder.layers.1.self_att.self_attention.project_v.lora.lora_B"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(AdapterError, match=r"layers\.1\..*project_v\.lora_B\.weight.*\[64, 8\].*missing\.pt"):
        load_adapter(make_model(), tmp_path / "missing.pt")

    extra = dict(delta, **{"encoder.layers.0.self_att.self_attention.project_q.bias": torch.zeros(64)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(AdapterError, match=r"unexpected key .*project_q\.bias.*/extra\.pt"):
        load_adapter(make_model(), tmp_path / "extra.pt")

    save_adapter(model, LoraSettings(), tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.encoder.layers.0.self_att.self_attention.project_q.lora_A.weight"
    tensors[key] = torch.zeros(8, 32)
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match=r"project_q\.lora_A\.weight.*\[8, 32\].*\[8, 64\]"):
        load_adapter(make_model(), tmp_path / "adapter")

    other = lora_model(settings=LoraSettings(r=4))
    save_adapter(other, LoraSettings(r=4), tmp_path / "r4")
    with pytest.raises(AdapterError, match="r: model 8 vs adapter 4"):
        load_adapter(lora_model(), tmp_path / "r4")

    wide = make_model(dim_ff=96)
    save_adapter(lora_model(), LoraSettings(), tmp_path / "tiny")
    with pytest.raises(AdapterError, match="another model shape .*dim_ff: adapter 128 vs model 96"):
        load_adapter(wide, tmp_path / "tiny")

    save_adapter(lora_model(settings=LoraSettings(alpha=32)), LoraSettings(alpha=32), tmp_path / "alpha32")
    with pytest.raises(AdapterError, match="alpha: model 16 vs adapter 32"):
        load_adapter(lora_model(), tmp_path / "alpha32")

    unpaired = dict(delta)
    del unpaired["encoder.layers.0.self_att.self_attention.project_q.lora.lora_A"]
    torch.save(unpaired, tmp_path / "unpaired.pt")
    with pytest.raises(AdapterError, match=r"project_q\.lora_A\.weight' is missing in .*unpaired\.pt"):
        read_adapter(tmp_path / "unpaired.pt")

    with pytest.raises(AdapterError, match=r"project_v\.lora_A\.weight'.*\['project_q'\]"):
        save_adapter(lora_state_dict(model), LoraSettings(targets=("project_q",)), tmp_path / "wrong")

    torch.save({"not": "tensors"}, tmp_path / "pickle.pt")
    with pytest.raises(AdapterError, match="pickle.pt"):
        read_adapter(tmp_path / "pickle.pt")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "adapter_config.json").write_text(
        (tmp_path / "tiny" / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_adapter(tmp_path / "cfg_only")
