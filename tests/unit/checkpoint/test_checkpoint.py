"""Reading checkpoints safely, atomic saving, and load_model_weights for every model/checkpoint pairing."""

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cpm_live.checkpoint import (
    CheckpointError,
    CheckpointReader,
    build_model,
    load_model_weights,
    read_metadata,
    read_state_dict,
    save_state_dict,
)
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.layers import Linear4bit
from cpm_live.models import CPMBee, CPMBeeConfig
from tests.conftest import CONFIG_DIR


class NotATensor:
    pass


def config_file(tmp_path: Path, name: str, **overrides) -> CPMBeeConfig:
    """The tiny fp config with overrides, written to ``name`` so errors can name the file."""
    values = json.loads((CONFIG_DIR / "cpm-bee-tiny.json").read_text())
    values.update(overrides)
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return CPMBeeConfig.from_json_file(path)


@pytest.fixture
def dense(tmp_path):
    """A tiny CPM-Bee fp16 checkpoint (.pt) and its config."""
    torch.manual_seed(0)
    config = config_file(tmp_path, "tiny.json")
    state = OrderedDict((k, v.half()) for k, v in CPMBee(config).state_dict().items())
    path = tmp_path / "dense.pt"
    torch.save(state, path)
    return config, state, path


def test_read_state_dict_pt_and_safetensors(dense, tmp_path):
    _, state, path = dense
    loaded = read_state_dict(path)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    save_file(dict(state), tmp_path / "dense.safetensors", metadata={"note": "x"})
    loaded = read_state_dict(tmp_path / "dense.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert read_metadata(tmp_path / "dense.safetensors") == {"note": "x"}
    assert read_metadata(path) == {}
    with CheckpointReader(path) as reader:
        assert reader.info("input_embedding.weight") == ((1024, 64), torch.half)
        assert not reader.is_compressed()


def test_unreadable_checkpoints_name_the_file(tmp_path, dense):
    _, state, path = dense
    cases = {
        "truncated.pt": path.read_bytes()[: len(path.read_bytes()) // 2],
        "garbage.pt": b"not a checkpoint at all" * 8,
        "empty.safetensors": b"",
        "huge-header.safetensors": (10 ** 12).to_bytes(8, "little") + b"{}",
        "bad-json.safetensors": (9).to_bytes(8, "little") + b"{nope!!!}",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"cannot read .*{name}.*(truncated|corrupt)"):
            read_state_dict(tmp_path / name)
    torch.save({"a": torch.ones(1), "b": NotATensor()}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match=r"objects.pt holds objects other than tensors \(.*NotATensor\)"):
        read_state_dict(tmp_path / "objects.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.pt"):
        read_state_dict(tmp_path / "nowhere.pt")


def test_save_state_dict_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out.safetensors"
    state = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.uint8), "c": torch.randn(2).bfloat16()}
    save_state_dict(state, path, metadata={"step": "3"})
    loaded = read_state_dict(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert read_metadata(path) == {"step": "3"}
    before = path.read_bytes()
    with pytest.raises(NotImplementedError):  # a meta tensor has no bytes: fails midway
        save_state_dict({"a": torch.ones(2), "z": torch.empty(3, device="meta")}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_fp_model_loads_fp_checkpoint_strictly(dense):
    config, state, path = dense
    model = CPMBee(config)
    load_model_weights(model, config, path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k].float()) for k in state)


def test_int4_model_loads_compressed_or_quantizes_on_the_fly_identically(dense, tmp_path):
    config, state, path = dense
    config4 = dataclasses.replace(config, int4=True)
    compressed = tmp_path / "int4.safetensors"
    quantize_state_dict(path, compressed, device="cpu", progress=False)
    from_compressed, on_the_fly = CPMBee(config4), CPMBee(config4)
    load_model_weights(from_compressed, config4, compressed)
    load_model_weights(on_the_fly, config4, path)
    a, b = from_compressed.state_dict(), on_the_fly.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    layer = from_compressed.encoder.layers[0].self_att.self_attention.project_q
    assert isinstance(layer, Linear4bit)
    dense_q = state["encoder.layers.0.self_att.self_attention.project_q.weight"].float()
    assert (layer.dequantize() - dense_q).abs().max() < 0.6  # NF4 of N(0, 1) values
    assert torch.equal(a["input_embedding.weight"], state["input_embedding.weight"].float())


def test_fp_model_refuses_compressed_checkpoint(dense, tmp_path):
    config, _, path = dense
    compressed = tmp_path / "int4.safetensors"
    quantize_state_dict(path, compressed, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=f'int4-compressed: set "int4": true in {config.source}.*cpm-bee-export'):
        load_model_weights(CPMBee(config), config, compressed)


def test_quant_settings_mismatch_names_config_and_fix(dense, tmp_path):
    config, _, path = dense
    compressed = tmp_path / "fp4.safetensors"
    quantize_state_dict(path, compressed, quant_type="fp4", device="cpu", progress=False)
    config4 = config_file(tmp_path, "int4.json", int4=True)
    with pytest.raises(CheckpointError, match=r"fp4.*int4\.json.*nf4.*\"int4_quant_type\": \"fp4\""):
        load_model_weights(CPMBee(config4), config4, compressed)
    # Without the metadata (a state dict saved from an fp4 model), the layer itself names the key.
    fp4_model = CPMBee(config_file(tmp_path, "fp4.json", int4=True, int4_quant_type="fp4"))
    bare = tmp_path / "bare.safetensors"
    save_state_dict(fp4_model.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bitsandbytes__fp4.*quant_type=fp4.*int4\.json"):
        load_model_weights(CPMBee(config4), config4, bare)


def test_missing_unexpected_and_misshaped_keys_are_listed(dense, tmp_path):
    config, state, path = dense
    broken = OrderedDict(state)
    del broken["encoder.layers.1.ffn.ffn.w_out.weight"]
    broken["encoder.layers.2.ffn.ffn.w_out.weight"] = torch.zeros(64, 128).half()
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(CPMBee(config), config, tmp_path / "broken.pt")
    message = str(info.value)
    assert "broken.pt does not match the model built from" in message and config.source in message
    assert "missing from the checkpoint (1): encoder.layers.1.ffn.ffn.w_out.weight (model: [64, 128])" in message
    assert "not in the model (1): encoder.layers.2.ffn.ffn.w_out.weight" in message
    assert "Fix: use the model config" in message
    wider = config_file(tmp_path, "wide.json", dim_ff=96, int4=True)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(6\): encoder.layers.0.ffn.ffn.w_in.w_0.weight: "
                                              r"checkpoint \[128, 64\] vs \[96, 64\]"):
        load_model_weights(CPMBee(wider), wider, path)
    compressed = tmp_path / "int4.safetensors"
    quantize_state_dict(path, compressed, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"(?s)int4.safetensors does not match .*wide.json.*shape mismatch"):
        load_model_weights(CPMBee(wider), wider, compressed)


def test_meta_model_gets_the_tensors_assigned(dense, tmp_path):
    config, state, path = dense
    config4 = dataclasses.replace(config, int4=True)
    compressed = tmp_path / "int4.safetensors"
    quantize_state_dict(path, compressed, device="cpu", progress=False)
    reference = CPMBee(config4)
    load_model_weights(reference, config4, compressed)
    for source in (compressed, path):  # compressed, and quantized on the fly
        with torch.device("meta"):
            model = CPMBee(config4)
        load_model_weights(model, config4, source)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
        assert model.input_embedding.weight.dtype == torch.float32 and model.input_embedding.weight.requires_grad
        assert not model.encoder.layers[0].ffn.ffn.w_out.weight.requires_grad


def test_build_model_chooses_auto_compute_dtype_for_its_device_not_meta(dense, tmp_path, monkeypatch):
    """``build_model`` builds on the meta device; an ``auto`` compute dtype must still follow the target
    device (a bf16-capable CPU decodes in bf16), so the model is never left at meta's fp32."""
    import cpm_live.config as config_module

    config, _, path = dense
    config4 = dataclasses.replace(config, int4=True, int4_compute_dtype="auto")
    compressed = tmp_path / "int4.safetensors"
    quantize_state_dict(path, compressed, device="cpu", progress=False)
    for cpu_has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(config_module, "native_bf16",
                            lambda device, *_, has=cpu_has_bf16: has and torch.device(device).type == "cpu")
        model = build_model(config4, compressed)
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and all(layer.compute_dtype == expected for layer in layers)
