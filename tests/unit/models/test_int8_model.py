"""End to end on a tiny CPM-Bee with an int8 base: quantize --int8 -> load (file or on the fly) ->
LoRA trains through peft's custom-module dispatch -> export merged fp32 / int8."""

from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from torch import nn

from cpm_live.checkpoint import CheckpointError, build_model
from cpm_live.checkpoint.adapters import save_adapter
from cpm_live.convert.cli import main as quantize_main
from cpm_live.convert.export import main as export_main
from cpm_live.layers import Linear8bit
from cpm_live.lora import LoraQuantized, LoraSettings, add_lora, merged_dense_weight, trainable_parameter_report
from cpm_live.models import CPMBee, CPMBeeConfig
from tests.tiny_models import packed_batch, run, small_vocab_config

MODEL_INPUTS = ("input", "input_sub", "length", "context", "sample_ids", "num_segments", "segment",
                "segment_rel_offset", "segment_rel", "span", "ext_table_ids", "ext_table_sub")
TARGETS = ("project_q", "project_v", "w_0", "w_1", "w_out")
# int8 rows change each N(0, 1) projection weight by ~0.8% (relative L2); the random 2-layer model
# gives ~2-3% relative L2 error of the logits (nf4: 27%, see test_int4_model). Unrelated weights: ~1.4.
LOGITS_RELATIVE_ERROR = 0.06


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    config = small_vocab_config()
    config.to_json_file(root / "config.json")
    config = CPMBeeConfig.from_json_file(root / "config.json")  # errors name the file
    torch.manual_seed(0)
    state = OrderedDict((k, v.half()) for k, v in CPMBee(config).state_dict().items())
    torch.save(state, root / "dense.pt")
    fp_model = CPMBee(config)
    fp_model.load_state_dict({k: v.float() for k, v in state.items()})
    quantize_main(["--input-path", str(root / "dense.pt"), "--output-path", str(root / "int8.safetensors"),
                   "--device", "cpu", "--int8"])
    return root, config, fp_model


def test_quantize_int8_writes_bnb_layout_for_every_projection(base):
    root, config, fp_model = base
    projections = [name for name, m in CPMBee(config.with_quantization("int8")).named_modules()
                   if isinstance(m, Linear8bit)]
    assert len(projections) == 14
    with safe_open(root / "int8.safetensors", "pt") as f:
        assert f.metadata()["format"] == "cpm_live.int8"
        keys = set(f.keys())
        for name in projections:
            weight, scb = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.SCB")
            assert weight.dtype == torch.int8 and scb.dtype == torch.float32 and scb.shape == (weight.shape[0],)
            assert int(f.get_tensor(f"{name}.weight_format")) == 0
            dense = fp_model.get_submodule(name).weight
            assert rel(weight.float() * scb[:, None] / 127, dense) < 0.02
        assert f.get_tensor("input_embedding.weight").dtype == torch.half  # the rest is copied
    assert len(keys) == len(fp_model.state_dict()) + 2 * len(projections)


def test_int8_config_loads_the_file_and_quantizes_fp_on_load_identically(base):
    root, config, fp_model = base
    config8 = CPMBeeConfig.from_json_file(root / "config.json", int8=True)
    from_file = build_model(config8, root / "int8.safetensors")
    on_load = build_model(config8, root / "dense.pt")
    for (key, a), (_, b) in zip(from_file.state_dict().items(), on_load.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    batch = packed_batch(config.vocab_size)
    with torch.no_grad():
        error = rel(run(from_file.eval(), batch), run(fp_model.eval(), batch))
    print(f"\nint8 (threshold 6) vs fp logits: relative L2 error {error:.4f}")
    assert error < LOGITS_RELATIVE_ERROR
    with pytest.raises(CheckpointError, match='int8-compressed: set "int8": true in .*config.json'):
        build_model(config, root / "int8.safetensors")
    with pytest.raises(CheckpointError, match='int8-compressed: set "int8": true .*it has "int4": true'):
        build_model(config.with_quantization("int4"), root / "int8.safetensors")


def test_lora_on_int8_trains_and_peft_never_sees_a_plain_linear(base):
    root, config, _ = base
    model = build_model(config.with_quantization("int8"), root / "int8.safetensors")
    settings = LoraSettings(r=4, alpha=8, targets=TARGETS)
    add_lora(model, settings)
    wrapped = [m for m in model.modules() if isinstance(m, LoraQuantized)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(type(m.base_layer) is Linear8bit for m in wrapped)
    # peft's default dispatch would have built lora.Linear over the int8 tensor; only the adapters'
    # own A/B matrices may be torch Linears.
    plain = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert plain and all(".lora_A." in n or ".lora_B." in n for n in plain)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # int8 weights count as dim_out * dim_in each, SCB is bookkeeping: the dense model's count + LoRA
    lora = 2 * 4 * (2 * (64 + 64) + 3 * (64 + 128))
    dense = sum(p.numel() for p in CPMBee(config).parameters())
    assert trainable_parameter_report(model).startswith(f"trainable params: {lora:,d} || all params: "
                                                        f"{dense + lora:,d} ||")

    # Regress the final hidden states (the logits of this tiny model saturate under its output norm)
    # onto a fixed random target: the int8 base's matmul and backward carry the LoRA gradients.
    batch = packed_batch(config.vocab_size, seed=3)
    target = torch.randn(*batch["input"].shape, config.dim_model, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        _, hidden = model.train()(*(batch[k] for k in MODEL_INPUTS))
        loss = nn.functional.mse_loss(hidden, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\nLoRA on int8: loss {losses[0]:.3f} -> {losses[-1]:.3f}")  # 1.936 -> 0.256 (dense base: 0.243)
    assert losses[-1] < 0.5 * losses[0]
    for m in wrapped:
        assert m.base_layer.weight.grad is None and m.base_layer.weight.dtype == torch.int8
    with pytest.raises(RuntimeError, match="merge.*Linear8bit"):
        wrapped[0].merge()

    save_adapter(model, settings, root / "adapter", base_config=config.with_quantization("int8"))
    with torch.no_grad():
        expected = run(model.eval(), batch)
    # Merged fp32 export = dequantized int8 base + adapter: reproduces the trained model's logits.
    merged = root / "merged.pt"
    export_main(["--model-config", str(root / "config.json"), "--int8", "--load", str(root / "int8.safetensors"),
                 "--delta", str(root / "adapter"), "--output", str(merged), "--dtype", "fp32"])
    state = torch.load(merged, weights_only=True)
    for name, layer in model.named_modules():
        if isinstance(layer, LoraQuantized):  # exactly deq(W) + scaling * sqrt(dim_in) * B @ A, in fp32
            torch.testing.assert_close(state[f"{name}.weight"], merged_dense_weight(layer), rtol=0, atol=1e-6)
    fp = CPMBee(config)
    fp.load_state_dict(state, strict=True)
    with torch.no_grad():  # differs only by the int8 model's activation quantization (~2%)
        assert rel(run(fp.eval(), batch), expected) < LOGITS_RELATIVE_ERROR
    # Merged int8 export: same layout as cpm-bee-quantize --int8, drift reported, loads with "int8": true.
    out8 = root / "merged-int8.safetensors"
    export_main(["--model-config", str(root / "config.json"), "--int8", "--load", str(root / "int8.safetensors"),
                 "--delta", str(root / "adapter"), "--output", str(out8), "--dtype", "int8"])
    reloaded = build_model(config.with_quantization("int8"), out8)
    with torch.no_grad():
        assert rel(run(reloaded.eval(), batch), expected) < LOGITS_RELATIVE_ERROR
    with safe_open(out8, "pt") as f:
        assert f.metadata()["format"] == "cpm_live.int8"


def test_export_int8_of_dense_equals_quantize_and_fp_export_dequantizes(base, tmp_path, capsys):
    root, config, _ = base
    out = tmp_path / "export-int8.safetensors"
    export_main(["--model-config", str(root / "config.json"), "--load", str(root / "dense.pt"),
                 "--output", str(out), "--dtype", "int8"])
    with safe_open(out, "pt") as a, safe_open(root / "int8.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    fp32 = tmp_path / "fp32.pt"
    export_main(["--model-config", str(root / "config.json"), "--int8", "--load", str(root / "int8.safetensors"),
                 "--output", str(fp32), "--dtype", "fp32"])
    config8 = config.with_quantization("int8")
    int8_model = build_model(config8, root / "int8.safetensors")
    state = torch.load(fp32, weights_only=True)
    name = "encoder.layers.1.ffn.ffn.w_out"
    assert torch.equal(state[f"{name}.weight"], int8_model.get_submodule(name).dequantize())
    with pytest.raises(SystemExit, match="already int8; export it to fp16"):
        export_main(["--model-config", str(root / "config.json"), "--int8", "--load", str(root / "int8.safetensors"),
                     "--output", str(tmp_path / "again.safetensors"), "--dtype", "int8"])
    with pytest.raises(SystemExit, match="--int4 and --int8 were both given"):
        export_main(["--model-config", str(root / "config.json"), "--int4", "--int8", "--load", str(fp32),
                     "--output", str(tmp_path / "x.pt")])
