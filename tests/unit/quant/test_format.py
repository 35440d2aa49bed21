"""The 4-bit format: bit-exactness with bitsandbytes, the spec's math, sizes, streaming writer, metadata."""

import json
import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open

from cpm_live.checkpoint.writer import SafetensorsWriter
from cpm_live.quant import format as qformat
from tests import int4_reference as ref

SETTINGS = [
    pytest.param(qformat.QuantSettings("nf4", True), id="nf4-double"),
    pytest.param(qformat.QuantSettings("nf4", False), id="nf4-single"),
    pytest.param(qformat.QuantSettings("fp4", True), id="fp4-double"),
    pytest.param(qformat.QuantSettings("fp4", False), id="fp4-single"),
]
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in [(1, 1), (3, 5), (31, 33), (129, 67), (513, 130)]]

# CPM-Bee spec 6.4 (bitsandbytes' NF4 table, index 0..15).
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["fp16", "fp32", "bf16"])
@pytest.mark.parametrize("part_elements", [qformat.PART_ELEMENTS, 200], ids=["whole", "parts"])
def test_quantize_is_bit_identical_to_bnb_and_matches_layout(shape, settings, dtype, part_elements, monkeypatch):
    """``quantize`` runs bnb's kernel on parts and joins them; with parts of 200 elements (3-5 blocks
    of 64, several parts per weight, a partial last block) the bytes must still be quantize_4bit's."""
    monkeypatch.setattr(qformat, "PART_ELEMENTS", part_elements)
    weight = torch.randn(shape, dtype=dtype) * 3
    entries = qformat.quantize_entries("w", weight, settings)
    packed, state = bnbF.quantize_4bit(weight, blocksize=settings.blocksize,
                                       compress_statistics=settings.double_quant, quant_type=settings.quant_type)
    expected = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert list(entries) == list(expected) == qformat.entry_keys("w", settings)
    for key in expected:
        assert torch.equal(entries[key], expected[key]), key
    for suffix, (want_shape, want_dtype) in qformat.tensor_layout(shape, settings).items():
        assert (tuple(entries["w" + suffix].shape), entries["w" + suffix].dtype) == (want_shape, want_dtype)
    blob = qformat.validate("w", entries, settings, shape, hint="fix")
    assert blob["shape"] == list(shape) and blob["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("shape", [(3, 6), (129, 66), (31, 33), (2, 48)], ids=["3x6", "129x66", "31x33", "2x48"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_dequantize_reloads_through_quant_state_from_dict(shape, settings):
    weight = torch.randn(shape, dtype=torch.half) * 3
    packed, state = bnbF.quantize_4bit(weight, blocksize=settings.blocksize,
                                       compress_statistics=settings.double_quant, quant_type=settings.quant_type)
    entries = qformat.quantize_entries("w", weight, settings)
    rebuilt = qformat.quant_state("w", entries)  # QuantState.from_dict
    assert rebuilt == state
    dense = qformat.dequantize("w", entries, dtype=torch.float32)  # exact: level * absmax in fp32
    assert torch.equal(dense, ref.dequantize_state(packed, state))
    assert qformat.dequantize("w", entries).dtype == torch.half


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_are_bit_identical(blocksize):
    weight = torch.randn(100, 70, dtype=torch.half)
    settings = qformat.QuantSettings("nf4", True, blocksize)
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    entries = qformat.quantize_entries("w", weight, settings)
    assert torch.equal(entries["w"], packed) and torch.equal(entries["w.absmax"], state.absmax)
    qformat.validate("w", entries, settings, (100, 70), hint="fix")


def test_spec_math_nf4_levels_absmax_and_nibble_order():
    """An independent reimplementation of spec 6.4 (single quant) gives bnb's bytes."""
    assert torch.equal(bnbF.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4_LEVELS))
    weight = torch.randn(37, 45, dtype=torch.half)  # 1665 values: odd count, partial last block
    flat = weight.float().reshape(-1)
    blocks = [flat[i:i + 64] for i in range(0, flat.numel(), 64)]
    absmax = torch.stack([b.abs().max() for b in blocks])
    scaled = torch.cat([b / m for b, m in zip(blocks, absmax)])
    codes = (scaled[:, None] - torch.tensor(NF4_LEVELS)[None, :]).abs().argmin(dim=1).to(torch.uint8)
    codes = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])  # pad with the code of 0.0
    packed = (codes[0::2] << 4) | codes[1::2]  # even element -> high nibble
    entries = qformat.quantize_entries("w", weight, qformat.QuantSettings("nf4", False))
    torch.testing.assert_close(entries["w.absmax"], absmax, rtol=0, atol=0)
    assert torch.equal(entries["w"].reshape(-1), packed)


def test_spec_math_fp4_magnitudes_and_double_quant_offset():
    levels = bnbF.get_4bit_type("fp4", device="cpu")
    spec = [0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.16666667, 0.25]
    torch.testing.assert_close(levels[:8], torch.tensor(spec), rtol=0, atol=1e-7)
    torch.testing.assert_close(levels[8:], -torch.tensor(spec), rtol=0, atol=1e-7)  # bit 3 = sign
    weight = torch.randn(64, 64 * 9)
    entries = qformat.quantize_entries("w", weight, qformat.QuantSettings("nf4", True))
    blob = qformat.read_blob("w.quant_state.bitsandbytes__nf4", entries["w.quant_state.bitsandbytes__nf4"])
    single = qformat.quantize_entries("w", weight, qformat.QuantSettings("nf4", False))
    assert blob["nested_offset"] == pytest.approx(single["w.absmax"].mean().item(), rel=1e-6)
    assert (blob["nested_blocksize"], blob["nested_dtype"]) == (256, "float32")


def test_bytes_per_param_double_quant_blocksize_64():
    settings = qformat.QuantSettings("nf4", True, 64)
    shape = (4096, 4096)
    blob = qformat.quantize_entries("w", torch.randn(64, 64), settings)["w.quant_state.bitsandbytes__nf4"]
    per_param = qformat.quantized_bytes(shape, settings, blob.numel()) / math.prod(shape)
    print(f"\nbytes/param (nf4, double quant, blocksize 64, 4096x4096): {per_param:.5f}")
    assert per_param <= 0.5160
    single = qformat.quantized_bytes(shape, qformat.QuantSettings("nf4", False, 64)) / math.prod(shape)
    assert single == pytest.approx(0.5 + 4 / 64, abs=1e-4)  # fp32 absmax per 64 values


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qformat.QuantSettings("int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qformat.QuantSettings("nf4", True, 48)
    with pytest.raises(qformat.QuantFormatError, match="fp16/bf16/fp32"):
        qformat.quantize(torch.zeros(4, 4, dtype=torch.int32), qformat.QuantSettings())


def test_metadata_round_trip_and_version_check():
    settings = qformat.QuantSettings("fp4", False, 128)
    meta = qformat.checkpoint_metadata(settings, "float32", "in.pt", {"a.w_0.weight": ((3, 4), torch.float16)})
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["weights"]) == {"a.w_0.weight": {"dtype": "float16", "shape": [3, 4]}}
    assert qformat.settings_from_metadata(meta, "x") == settings
    assert qformat.settings_from_metadata({}, "x") is None
    with pytest.raises(qformat.QuantFormatError, match="version '2'.*upgrade cpm_live"):
        qformat.settings_from_metadata({**meta, "format_version": "2"}, "x")
    with pytest.raises(qformat.QuantFormatError, match="invalid int4 metadata"):
        qformat.settings_from_metadata({**meta, "blocksize": "48"}, "x")


def test_logical_shapes_collapse_quantized_entries():
    settings = qformat.QuantSettings()
    entries = qformat.quantize_entries("l.project_q.weight", torch.randn(6, 10), settings)
    entries["l.norm.weight"] = torch.ones(10)
    shapes = qformat.logical_shapes({k: tuple(v.shape) for k, v in entries.items()}, entries.__getitem__)
    assert shapes == {"l.project_q.weight": (6, 10), "l.norm.weight": (10,)}


def test_stream_writer_matches_safetensors_reader(tmp_path):
    tensors = {
        "fp16": torch.randn(3, 5, dtype=torch.half), "fp32": torch.randn(7), "bf16": torch.randn(2, 2).bfloat16(),
        "u8": torch.arange(5, dtype=torch.uint8), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "i64": torch.arange(3), "strided": torch.randn(4, 6).t(),
    }
    tails = {"blob": torch.tensor(list(b'{"a": 1.25}'), dtype=torch.uint8)}
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, tails,
                               metadata={"k": "v"})
    for key in reversed(list(tensors)):  # any order
        writer.write(key, tensors[key])
    writer.write("blob", tails["blob"])
    writer.close()
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors) | {"blob"}
        for key, value in {**tensors, **tails}.items():
            assert torch.equal(f.get_tensor(key), value), key
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0


def test_stream_writer_takes_parts_from_threads(tmp_path):
    """write_at: parts of one tensor written from several threads land where they belong; the tensor
    counts as written only once covered, and a part outside it or of another dtype is refused."""
    from concurrent.futures import ThreadPoolExecutor

    big, small = torch.randn(1000), torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, {"big": ((1000,), torch.float32), "small": ((3, 4), torch.uint8)})
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda a: writer.write_at("big", a * 4, big[a:a + 70]), range(0, 1000, 70)))
    writer.write_at("small", 4, small[1:])
    with pytest.raises(ValueError, match=r"never written.*\['small'\]"):
        writer.close()
    writer = SafetensorsWriter(path, {"big": ((1000,), torch.float32), "small": ((3, 4), torch.uint8)})
    with pytest.raises(ValueError, match="does not fit tensor big"):
        writer.write_at("big", 3996, torch.zeros(2))
    with pytest.raises(ValueError, match="does not fit tensor small"):
        writer.write_at("small", 0, torch.zeros(2))
    writer.write_at("big", 0, big[:500])
    with pytest.raises(ValueError, match="written twice"):
        writer.write("big", big)
    writer.write_at("big", 2000, big[500:])
    writer.write("small", small)
    writer.close()
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("big"), big) and torch.equal(f.get_tensor("small"), small)


def test_stream_writer_rejects_what_was_not_planned(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {"a": ((2,), torch.float32)}, ["t"])
    with pytest.raises(ValueError, match="not planned"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor a .*float16.*float32"):
        writer.write("a", torch.zeros(2, dtype=torch.half))
    with pytest.raises(ValueError, match="at most 4096 bytes"):
        writer.write("t", torch.zeros(5000, dtype=torch.uint8))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"never written.*\['t'\]"):
        writer.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("settings", SETTINGS)
def test_cuda_quantization_matches_cpu(settings):
    """cpm-bee-quantize uses CUDA when present; load_model_weights may quantize on CPU: same bytes?"""
    weight = torch.randn(257, 130, dtype=torch.half)
    cpu = qformat.quantize_entries("w", weight, settings)
    cuda = qformat.quantize_entries("w", weight.cuda(), settings)
    for key in cpu:
        assert torch.equal(cuda[key].cpu(), cpu[key]), key
    dense = qformat.dequantize("w", {k: v.cuda() for k, v in cpu.items()}, dtype=torch.float32)
    torch.testing.assert_close(dense.cpu(), qformat.dequantize("w", cpu, dtype=torch.float32), rtol=0, atol=0)
