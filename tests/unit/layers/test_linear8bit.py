"""Linear8bit and the int8 setting: config, format, matmul against a reference written here, bnb interop."""

import math

import bitsandbytes as bnb
import pytest
import torch

from cpm_live.config import ConfigError, CPMBeeConfig, Int4Quantization, Int8Quantization
from cpm_live.layers import PROJECTION_TYPES, Linear, Linear4bit, Linear8bit, make_linear
from cpm_live.lora.layers import CUSTOM_MODULES
from cpm_live.quant import int8 as qint8
from cpm_live.quant.format import QuantFormatError
from tests.int8_reference import reference_matmul, reference_quantize, rel


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ config
def test_config_int8_setting_is_one_typed_object():
    dense = CPMBeeConfig()
    assert dense.quantization is None and dense.int8_threshold == 6.0
    assert CPMBeeConfig(int8=True).quantization == Int8Quantization(threshold=6.0)
    assert CPMBeeConfig(int8=True, int8_threshold=0).quantization.threshold == 0.0
    pinned = {"int4_compute_dtype": "float32"}  # "auto" (the default) depends on the CPU
    assert CPMBeeConfig(int4=True, int4_blocksize=128, **pinned).quantization == Int4Quantization(blocksize=128)
    assert CPMBeeConfig(int8=True).quantization.kind == "int8"
    # int4's and int8's compute dtype are one field name
    assert CPMBeeConfig(int8=True).quantization.compute_dtype == torch.float16
    assert CPMBeeConfig(int4=True, **pinned).quantization.compute_dtype == torch.float32
    config = CPMBeeConfig(int8=True, int8_threshold=4.0)
    assert CPMBeeConfig.from_dict(config.to_dict()) == config
    assert "int8" not in config.to_original_dict()
    assert config.with_quantization("int4").quantization.kind == "int4"
    assert config.with_quantization(None).quantization is None


def test_config_refuses_int4_with_int8_and_bad_thresholds():
    with pytest.raises(ConfigError, match=r'"int4".*"int8".*x\.json'):
        CPMBeeConfig(int4=True, int8=True, source="x.json")
    for bad in (-1.0, float("inf")):
        with pytest.raises(ConfigError, match="int8_threshold must be a finite number >= 0"):
            CPMBeeConfig(int8=True, int8_threshold=bad)
    for bad in ("6", True):  # JSON types, checked for every key
        with pytest.raises(ConfigError, match="config key 'int8_threshold' must be a number"):
            CPMBeeConfig(int8=True, int8_threshold=bad)
    with pytest.raises(ConfigError, match="config key 'int8' must be true or false"):
        CPMBeeConfig(int8="false")


def test_factory_builds_the_kind_and_lora_dispatch_covers_every_projection():
    tiny = dict(vocab_size=8, dim_model=8, num_heads=1, dim_head=8, dim_ff=8, num_layers=1, half=False)
    assert type(make_linear(CPMBeeConfig(**tiny))(8, 4)) is Linear
    assert type(make_linear(CPMBeeConfig(**tiny, int4=True))(64, 4)) is Linear4bit
    layer = make_linear(CPMBeeConfig(**tiny, int8=True, int8_threshold=3.0))(8, 4)
    assert type(layer) is Linear8bit and layer.threshold == 3.0 and layer.dtype == torch.float32
    assert set(CUSTOM_MODULES) == set(PROJECTION_TYPES)


# ------------------------------------------------------------------ format
@pytest.mark.parametrize("shape", [(256, 512), (3, 40), (1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_quantize_matches_reference_and_error_is_small(shape):
    weight = torch.randn(*shape)
    cb, scb = qint8.quantize(weight)
    ref_cb, ref_scb = reference_quantize(weight)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32 and scb.shape == (shape[0],)
    torch.testing.assert_close(scb, ref_scb, rtol=0, atol=0)
    assert (cb.int() - ref_cb.int()).abs().max() <= 1  # ties may round either way
    assert (cb != ref_cb).float().mean() < 0.01
    if shape == (256, 512):  # N(0, 1): row absmax ~3.3 sigma, step/sqrt(12) ~0.8% of sigma
        assert rel(qint8.dequantize(cb, scb), weight) < 0.02


def test_validate_names_the_key_and_the_fix():
    entries = qint8.quantize_entries("a.w.weight", torch.randn(4, 8))
    qint8.validate("a.w.weight", entries, (4, 8))
    with pytest.raises(QuantFormatError, match=r"a.w.weight lacks \['a.w.SCB'\].*cpm-bee-quantize --int8"):
        qint8.validate("a.w.weight", {k: v for k, v in entries.items() if k != "a.w.SCB"})
    with pytest.raises(QuantFormatError, match="a.w.weight has shape .4, 8. but the model expects .8, 4."):
        qint8.validate("a.w.weight", entries, (8, 4))
    with pytest.raises(QuantFormatError, match="weight_format is 1: only 0"):
        qint8.validate("a.w.weight", {**entries, "a.w.weight_format": torch.tensor(1, dtype=torch.uint8)})


# ------------------------------------------------------------------ layer
@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["no-outliers", "threshold6"])
def test_forward_matches_reference_and_backward_reaches_input_only(threshold):
    layer = Linear8bit(96, 40, threshold=threshold, dtype=torch.float32)
    x = torch.randn(2, 5, 96)
    x[..., 7] *= 20  # an outlier feature: above the threshold in every row
    x.requires_grad_(True)
    y = layer(x)
    expected = reference_matmul(x.detach(), layer.weight, layer.SCB, threshold) / math.sqrt(96)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 40)
    assert rel(y, expected) < 2e-3  # fp16 output rounding only
    grad = torch.randn_like(y)
    y.backward(grad)
    dense = qint8.dequantize(layer.weight, layer.SCB)
    torch.testing.assert_close(x.grad, grad @ dense / math.sqrt(96), rtol=2e-3, atol=2e-3)
    assert not layer.weight.requires_grad and layer.weight.grad is None and layer.SCB.grad is None


def test_outlier_decomposition_keeps_outlier_features_exact():
    weight = torch.randn(32, 64)
    layer = Linear8bit.from_weight(weight, threshold=6.0)
    x = torch.randn(16, 64)
    x[:, 3] = 200.0  # one huge feature, as in LLM.int8's emergent outliers
    exact = x @ layer.dequantize().T / 8
    with_outliers = rel(layer(x), exact)
    layer.threshold = 0.0
    without = rel(layer(x), exact)
    assert with_outliers < 0.01 < without


def test_state_dict_is_bitsandbytes_linear8bitlt_layout_and_bnb_reads_it():
    layer = Linear8bit(64, 32, threshold=6.0, dtype=torch.float32)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "SCB", "weight_format"]
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32 and int(sd["weight_format"]) == 0
    theirs = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0).to("cpu")
    theirs.load_state_dict(sd)
    assert torch.equal(theirs.weight.data, layer.weight) and torch.equal(theirs.weight.SCB, layer.SCB)
    x = torch.randn(4, 64).half()
    with torch.no_grad():  # bnb's layer has no 1/sqrt(dim_in)
        torch.testing.assert_close(theirs.eval()(x).float(), layer(x).float() * 8, rtol=1e-3, atol=1e-3)
    copy = Linear8bit(64, 32, dtype=torch.float32)
    copy.load_state_dict(sd)
    assert torch.equal(copy.weight, layer.weight) and torch.equal(copy.SCB, layer.SCB)


def test_loading_dense_weights_or_meta_and_moving_do_not_quantize():
    layer = Linear8bit(8, 4, dtype=torch.float32)
    with pytest.raises(QuantFormatError, match="weight is a dense torch.float32 weight .* cpm-bee-quantize --int8"):
        layer.load_state_dict({"weight": torch.randn(4, 8), "SCB": torch.ones(4)})
    meta = Linear8bit(8, 4, device="meta")
    assert meta.weight.is_meta and meta.SCB.is_meta
    before = layer.weight.clone()
    layer.to("cpu")
    layer(torch.randn(2, 8))
    assert torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="last dim 8"):
        layer(torch.randn(2, 9))
