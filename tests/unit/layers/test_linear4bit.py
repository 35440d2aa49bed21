"""Linear4bit: bytes and state dict as bitsandbytes', forward and gradients as tests/int4_reference.py, FSDP2.

The FSDP2 case runs this file under ``torchrun`` with 2 gloo ranks (see ``_fsdp_worker``).
"""

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

from cpm_live.layers import Linear, Linear4bit
from cpm_live.quant.format import QuantFormatError
from tests import int4_reference as ref

SETTINGS = [
    pytest.param("nf4", True, id="nf4-double"),
    pytest.param("nf4", False, id="nf4-single"),
    pytest.param("fp4", True, id="fp4-double"),
    pytest.param("fp4", False, id="fp4-single"),
]
# Odd shapes: 7x9 has an odd element count (half-filled last byte) and a partial block;
# 33x70 spans 37 blocks with a partial one; 300x260 needs two nested (256-block) absmax values.
SHAPES = [pytest.param((7, 9), id="7x9"), pytest.param((33, 70), id="33x70"),
          pytest.param((300, 260), id="300x260")]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def bnb_reference(weight, quant_type, double_quant, blocksize=64):
    """bitsandbytes' own packed weight and state dict entries (as Linear4bit._save_to_state_dict writes)."""
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type)
    entries = {"weight": packed}
    entries.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return packed, state, entries


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_state_dict_is_bit_identical_to_bitsandbytes(shape, quant_type, double_quant):
    weight = torch.randn(shape, dtype=torch.half)
    layer = Linear4bit.from_weight(weight, quant_type=quant_type, double_quant=double_quant)
    _, _, expected = bnb_reference(weight, quant_type, double_quant)
    state = layer.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        assert state[key].dtype == expected[key].dtype, key
        assert torch.equal(state[key], expected[key]), key
    if not double_quant:
        assert not any("nested" in k for k in state)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_forward_matches_the_reference_dequantization(shape, quant_type, double_quant):
    dim_out, dim_in = shape
    weight = torch.randn(shape, dtype=torch.half)
    layer = Linear4bit.from_weight(weight, quant_type=quant_type, double_quant=double_quant)
    packed, state, _ = bnb_reference(weight, quant_type, double_quant)
    dense32 = ref.dequantize_state(packed, state)  # not bnb's CPU kernel: wrong for some rows on AVX-512
    x = torch.randn(3, 5, dim_in)
    out = layer(x)
    assert out.shape == (3, 5, dim_out) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, dense32) / math.sqrt(dim_in), rtol=1e-5, atol=1e-5)
    # dequantize() is the fp16 weight: the fp32 levels * absmax rounded once.
    torch.testing.assert_close(layer.dequantize(), dense32.half(), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_bnb_linear4bit_gives_the_same_output(quant_type, double_quant):
    """Same bytes as bitsandbytes.nn.Linear4bit; outputs compared on rows that are whole blocks (64 | 128),
    where bnb's CPU kernel is right on every CPU seen (see docs/bitsandbytes-cpu-dequantize-bug.md)."""
    dim_out, dim_in = 40, 128
    weight = torch.randn(dim_out, dim_in, dtype=torch.half)
    layer = Linear4bit.from_weight(weight, quant_type=quant_type, double_quant=double_quant)
    reference = bnb.nn.Linear4bit(dim_in, dim_out, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=double_quant, quant_type=quant_type)
    reference.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, blocksize=64)
    reference = reference.to("cpu")  # bnb quantizes on the move
    assert torch.equal(reference.weight.data, layer.weight)
    x = torch.randn(3, 5, dim_in)
    torch.testing.assert_close(layer(x), reference(x) / math.sqrt(dim_in), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_input_gradients_match_and_weight_gets_none(quant_type, double_quant):
    weight = torch.randn(40, 72, dtype=torch.half)
    layer = Linear4bit.from_weight(weight, quant_type=quant_type, double_quant=double_quant)
    x = torch.randn(4, 72, requires_grad=True)
    upstream = torch.randn(4, 40)
    (layer(x) * upstream).sum().backward()
    # The gradient of the forward: the weight dequantized in the compute dtype (fp32), not the fp16 one.
    dense = ref.dequantize_state(*bnb_reference(weight, quant_type, double_quant)[:2])
    torch.testing.assert_close(x.grad, upstream @ dense / math.sqrt(72), rtol=1e-5, atol=1e-5)
    for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
        assert not tensor.requires_grad and tensor.grad is None, name
    assert layer.weight.dtype == torch.uint8


def test_half_input_keeps_its_dtype_and_compute_dtype_is_used():
    layer = Linear4bit(64, 32, compute_dtype=torch.float32)
    x = torch.randn(2, 64, dtype=torch.half)
    out = layer(x)
    assert out.dtype == torch.half
    torch.testing.assert_close(out, layer(x.float()).half(), rtol=0, atol=0)


def test_reset_parameters_quantizes_a_cpm_bee_init():
    layer = Linear4bit(256, 128)
    dense = layer.dequantize().float()
    assert dense.shape == (128, 256) and layer.dequantize().dtype == torch.half
    assert 0.85 < dense.std().item() < 1.15  # N(0, 1) as CPM-Bee's Linear, through NF4
    assert abs(dense.mean().item()) < 0.05


def test_from_linear_matches_the_dense_layer():
    dense = Linear(96, 48, dtype=torch.float32)
    layer = Linear4bit.from_linear(dense, quant_type="nf4")
    assert (layer.dim_in, layer.dim_out, layer.in_features, layer.out_features) == (96, 48, 96, 48)
    assert layer.dtype == torch.float32
    x = torch.randn(8, 96)
    error = (layer(x) - dense(x)).norm() / dense(x).norm()
    assert error < 0.12, error  # NF4 weight noise, relative (0.27 with bnb's AVX-512 kernel: rows of 1.5 blocks)
    with pytest.raises(ValueError, match="bias"):
        Linear4bit.from_linear(torch.nn.Linear(4, 4))


def test_forward_and_moves_do_not_change_state():
    layer = Linear4bit(64, 16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(3, 64))
    layer.to("cpu")
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="last dim 64"):
        layer(torch.randn(3, 16))


def test_meta_device_allocates_nothing_but_lists_every_key():
    layer = Linear4bit(4096, 4096, device="meta")
    assert layer.weight.is_meta and layer.weight.shape == (4096 * 4096 // 2, 1)
    assert list(layer.state_dict()) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_state_dict_round_trip_and_bnb_from_prequantized(quant_type, double_quant):
    source = Linear4bit(70, 33, quant_type=quant_type, double_quant=double_quant)
    state = source.state_dict()
    target = Linear4bit(70, 33, quant_type=quant_type, double_quant=double_quant)
    target.load_state_dict(state)
    assert torch.equal(target.dequantize(), source.dequantize())
    x = torch.randn(2, 70)
    assert torch.equal(target(x), source(x))
    # bitsandbytes reads the same entries through QuantState.from_dict (70 is not a multiple of 64,
    # so its CPU matmul is not compared here: test_bnb_linear4bit_gives_the_same_output).
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False, device="cpu")
    assert torch.equal(ref.dequantize_state(param.data, param.quant_state).half(), source.dequantize())


def test_load_keeps_the_layer_dtype():
    fp16 = Linear4bit(64, 32, dtype=torch.half)
    fp32 = Linear4bit(64, 32, dtype=torch.float32)
    fp32.load_state_dict(fp16.state_dict())
    assert fp32.dequantize().dtype == torch.float32
    torch.testing.assert_close(fp32.dequantize(), fp16.dequantize().float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("other,match", [
    pytest.param(dict(quant_type="fp4"), "quant_type=fp4.*expects quant_type=nf4", id="quant-type"),
    pytest.param(dict(blocksize=128), "blocksize=128.*blocksize=64", id="blocksize"),
    pytest.param(dict(double_quant=False), "double_quant=False.*double_quant=True", id="double-quant"),
    pytest.param(dict(dim_in=72), r"has shape \[33, 72\], the model needs \[33, 70\]", id="shape"),
])
def test_load_rejects_mismatched_settings(other, match):
    settings = dict(dim_in=70, dim_out=33, quant_type="nf4", double_quant=True, blocksize=64)
    source = Linear4bit(**{**settings, **other})
    with pytest.raises(QuantFormatError, match=match):
        Linear4bit(**settings).load_state_dict(source.state_dict())


def test_load_errors_name_the_key_and_fix():
    layer = Linear4bit(70, 33)
    good = layer.state_dict()
    with pytest.raises(QuantFormatError, match="weight is a dense torch.float16 weight.*cpm-bee-quantize"):
        layer.load_state_dict({"weight": torch.randn(33, 70, dtype=torch.half)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*weight\.absmax"):
        layer.load_state_dict({})
    with pytest.raises(QuantFormatError, match=r"missing weight.nested_absmax"):
        layer.load_state_dict({k: v for k, v in good.items() if k != "weight.nested_absmax"})
    with pytest.raises(QuantFormatError, match=r"unexpected entries \['weight.extra'\]"):
        layer.load_state_dict({**good, "weight.extra": torch.zeros(1)})
    bad_map = dict(good, **{"weight.quant_map": good["weight.quant_map"].flip(0)})
    with pytest.raises(QuantFormatError, match="quant_map is not bitsandbytes' nf4 table"):
        layer.load_state_dict(bad_map)
    corrupt = dict(good, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)})
    with pytest.raises(QuantFormatError, match="not quant-state JSON"):
        layer.load_state_dict(corrupt)
