"""4-bit inference kernels (``cpm_live.quant.gemv``): whichever kernel this CPU gets, checked against
``tests/int4_reference.py``; when they are used (few rows, no autograd) and when not (training, long
prompts); the failed-check fallback; bitsandbytes' tiled layout; the build; greedy tokens unchanged.

Runs on any CPU: AVX2 machines exercise ``gemv_4bit.c``, AVX512-BF16 machines also bitsandbytes'
kernel (bf16 compute), machines without either the dequantize-then-matmul fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import bitsandbytes.functional as bnbF
import pytest
import torch

from cpm_live.layers import Linear4bit
from cpm_live.quant import dequant, gemv, native
from tests import int4_reference as ref
from tests.conftest import REPO

ROOT = REPO
sys.path.insert(0, str(ROOT / "benchmarks"))  # compare_greedy lives with the decode benchmark
import bench_decode  # noqa: E402

BF16_ULP = 2.0**-8  # one bf16 ulp, relative: the output of a bf16 call is rounded to bf16


def layer(shape: tuple[int, int], quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
          compute_dtype: torch.dtype = torch.float32, seed: int = 0) -> Linear4bit:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Linear4bit.from_weight(weight, quant_type, double_quant, blocksize, compute_dtype)


def assert_close_to_exact(y: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, state, tolerance: float) -> None:
    """``|y - x W.T| <= tolerance * (|x| |W|.T)`` (+ one bf16 ulp of the result for bf16 outputs), with
    ``W`` the reference dequantization and the product in fp64."""
    weight = ref.dequantize_state(packed, state).double()
    exact = x.double() @ weight.T
    bound = tolerance * (x.double().abs() @ weight.abs().T)
    if y.dtype == torch.bfloat16:
        bound += BF16_ULP * exact.abs()
    excess = ((y.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"


def tolerance_of(dtype: torch.dtype, state) -> float:
    """The bound of the kernel serving ``dtype`` here, or of the dequantize path when none does (fp32:
    rounding order only; bf16: inputs and dequantized weight rounded to bf16)."""
    name = gemv.kernel_for(dtype, state)
    if name is not None:
        return gemv.TOLERANCE[name]
    return gemv.TOLERANCE["avx2"] if dtype == torch.float32 else gemv.TOLERANCE["bnb_avx512bf16"]


KERNEL, DENSE = "kernel", "dense matmul"


def paths(fn) -> set[str]:
    """How ``fn()`` multiplied by 4-bit weights: a kernel (its profiler range) and/or a dense matmul
    (``aten::linear``, what dequantize-then-matmul ends in; a kernel call has none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {event.name for event in prof.events()}
    return {path for path, name in ((KERNEL, gemv.PROFILER_LABEL), (DENSE, "aten::linear")) if name in names}


def has_kernel(dtype: torch.dtype = torch.float32) -> bool:
    return gemv.kernel_for(dtype, layer((64, 128)).quant_state()) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [
    ("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64), ("nf4", True, 32), ("nf4", True, 256),
    ("fp4", False, 128)], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(96, 256), (64, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_inference_matches_the_reference(shape, quant_type, double_quant, blocksize, dtype):
    lin = layer(shape, quant_type, double_quant, blocksize, dtype)
    packed, state = lin.weight, lin.quant_state()
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 11, 16, 32):
        x = torch.randn(rows, shape[1], generator=g).to(dtype)
        with torch.no_grad():
            y = gemv.matmul_4bit_inference(x, packed, state)
        assert y.dtype == dtype and y.shape == (rows, shape[0])
        assert_close_to_exact(y, x, packed, state, tolerance_of(dtype, state))


def test_rows_that_are_not_whole_blocks_use_the_dequantize_path():
    lin = layer((48, 96), blocksize=64)  # a block spans two rows
    assert gemv.kernel_for(torch.float32, lin.quant_state()) is None
    x = torch.randn(1, 96)
    with torch.no_grad():
        assert paths(lambda: lin(x)) == {DENSE}
        assert_close_to_exact(lin(x) * 96**0.5, x, lin.weight, lin.quant_state(), 1e-5)


@pytest.mark.skipif(not has_kernel(), reason=f"no 4-bit kernel on this CPU: {native.unavailable_reason()}")
def test_few_rows_without_autograd_never_dequantize():
    lin = layer((64, 256))
    with torch.no_grad():
        lin(torch.randn(1, 256))  # the first call of a shape also checks the kernel against a dequantization
        assert paths(lambda: lin(torch.randn(2, 3, 256))) == {KERNEL}
        most = gemv.MAX_ROWS[gemv.kernel_for(torch.float32, lin.quant_state())]
        assert paths(lambda: lin(torch.randn(1, most, 256))) == {KERNEL}
        long_prompt = torch.randn(1, most + 1, 256)
        assert paths(lambda: lin(long_prompt)) == {DENSE}
        with gemv.kernels_enabled(False):
            assert paths(lambda: lin(torch.randn(1, 256))) == {DENSE}
    with torch.inference_mode():
        assert paths(lambda: lin(torch.randn(1, 256))) == {KERNEL}


def test_training_keeps_the_dequantize_path_and_its_gradient():
    lin = layer((64, 256))
    x = torch.randn(3, 256, requires_grad=True)
    assert paths(lambda: lin(x)) == {DENSE}
    out = lin(x)
    expected = dequant.matmul_4bit(x, lin.weight, lin.quant_state()) / 256**0.5
    assert torch.equal(out, expected)
    out.sum().backward()
    weight = ref.dequantize_state(lin.weight, lin.quant_state())
    assert torch.allclose(x.grad, weight.sum(0).expand(3, -1) / 256**0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="without autograd"):
        gemv.matmul_4bit_inference(x, lin.weight, lin.quant_state())


@pytest.mark.skipif(not has_kernel(), reason=f"no 4-bit kernel on this CPU: {native.unavailable_reason()}")
def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch):
    lin = layer((64, 256))
    name = gemv.kernel_for(torch.float32, lin.quant_state())
    right = gemv.KERNELS[name]

    def wrong(x, packed, state):  # a kernel with a layout bug: the outputs come out reversed
        return right(x, packed, state).flip(-1)

    monkeypatch.setitem(gemv.KERNELS, name, wrong)
    monkeypatch.setattr(gemv, "_CHECKED", {})
    x = torch.randn(1, 256)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="disagreed with the exact product"):
        out = lin(x)
    with torch.no_grad(), gemv.kernels_enabled(False):
        assert torch.equal(out, lin(x))
    assert gemv.checked_cases() == [{"kernel": name, "shape": [64, 256], "blocksize": 64, "quant_type": "nf4",
                                     "double_quant": True, "passed": False}]


def test_this_cpu_gets_the_kernel_it_should():
    """An AVX2 machine with a compiler must build ``gemv_4bit.c``; an AVX512-BF16 one must pick
    bitsandbytes' kernel for bf16 (otherwise the tests above would only check the fallback)."""
    state = layer((64, 128)).quant_state()
    if native.cpu_has_avx2() and shutil.which(os.environ.get("CC", "cc")):
        assert native.library() is not None, native.unavailable_reason()
        assert gemv.kernel_for(torch.float32, state) == "avx2"
    if gemv.bnbF.has_avx512bf16() and hasattr(gemv.bnb_native, "gemv_4bit_inference_cpu_nf4_bf16"):
        assert gemv.kernel_for(torch.bfloat16, state) == "bnb_avx512bf16"
    if not native.cpu_has_avx2():
        assert gemv.kernel_for(torch.float32, state) is None


def unpack_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[N, K]`` 4-bit codes of the stored layout (value i: nibble i, high nibble first)."""
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(shape)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_tiled_layout_holds_the_same_codes_and_absmax(double_quant):
    """The tiled layout bitsandbytes' AVX512-BF16 kernel reads (csrc/cpu_ops.cpp, tinygemm_kernel_nn):
    per tile of 32 outputs and pair of inputs k = 2j, 2j + 1, 32 bytes; byte 2n + p holds output n's
    code of input 2j + p in its low nibble and output 16 + n's in its high one. Checked on any CPU."""
    n, k, blocksize = 96, 256, 64
    lin = layer((n, k), double_quant=double_quant, blocksize=blocksize)
    state = lin.quant_state()
    tiled, absmax = gemv._bnb_layout(lin.weight, state)
    codes = unpack_codes(lin.weight, (n, k))
    t = tiled.reshape(n // 32, k // 2, 32)
    low = (t & 0xF).reshape(n // 32, k // 2, 16, 2).permute(0, 2, 1, 3).reshape(n // 32, 16, k)
    high = (t >> 4).reshape(n // 32, k // 2, 16, 2).permute(0, 2, 1, 3).reshape(n // 32, 16, k)
    assert torch.equal(torch.cat((low, high), dim=1).reshape(n, k), codes)
    exact = ref.block_absmax(state.absmax, *((state.state2.absmax, state.state2.code, state.offset)
                                             if double_quant else ()))
    assert absmax.dtype == torch.bfloat16 and torch.equal(absmax, exact.reshape(n, k // blocksize).T.bfloat16())
    # derived once per weight, again only when the weight changes
    assert gemv._bnb_layout(lin.weight, lin.quant_state())[0] is tiled
    lin.load_state_dict(layer((n, k), double_quant=double_quant, blocksize=blocksize, seed=5).state_dict())
    again, _ = gemv._bnb_layout(lin.weight, lin.quant_state())
    assert again is not tiled and torch.equal(
        (again.reshape(n // 32, k // 2, 32) & 0xF).reshape(n // 32, k // 2, 16, 2).permute(0, 2, 1, 3)
        .reshape(n // 32, 16, k)[0, 0], unpack_codes(lin.weight, (n, k))[0])



@pytest.mark.skipif(not hasattr(bnbF, "_convert_weight_packed_for_cpu"), reason="no CPU converter in bitsandbytes")
@pytest.mark.parametrize("shape", [(32, 64), (96, 256), (320, 128)])
def test_tile_for_bnb_matches_bitsandbytes_own_converter(shape):
    """Our byte-wise tiling gives exactly the weight bitsandbytes' ``_convert_weight_packed_for_cpu``
    builds (through int32) from the same stored weight."""
    lin = layer(shape, double_quant=False, blocksize=64)
    state = lin.quant_state()
    plain = bnbF.QuantState(absmax=state.absmax.clone(), shape=state.shape, code=state.code,
                            blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.bfloat16)
    theirs, _ = bnbF._convert_weight_packed_for_cpu(lin.weight.detach().clone().view(torch.uint8), plain)
    assert torch.equal(gemv.tile_for_bnb(lin.weight.detach(), *shape), theirs)

BUILD_PROBE = """
import warnings, torch
from cpm_live.layers import Linear4bit
from cpm_live.quant import gemv, native
lin = Linear4bit.from_weight(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))
x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        fused = lin(x)
        with gemv.kernels_enabled(False):
            plain = lin(x)
print("LIB", native.library() is not None)
print("CLOSE", bool(torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)))
print("WARNINGS", len([w for w in caught if "fused 4-bit CPU kernel is unavailable" in str(w.message)]))
"""


def probe(env_changes: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_changes}
    result = subprocess.run([sys.executable, "-c", BUILD_PROBE], capture_output=True, text=True, env=env,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if line[:1].isupper())


@pytest.mark.skipif(not native.cpu_has_avx2(), reason="the kernel needs an x86 CPU with AVX2")
def test_the_kernel_builds_once_into_its_cache(tmp_path):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here")
    first = probe({native.CACHE_ENV: str(tmp_path)})
    built = list(tmp_path.glob("gemv_4bit-*.so"))
    assert first == {"LIB": "True", "CLOSE": "True", "WARNINGS": "0"} and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert probe({native.CACHE_ENV: str(tmp_path)})["LIB"] == "True"
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("*.tmp")) == []


def test_without_a_compiler_decoding_falls_back(tmp_path):
    out = probe({native.CACHE_ENV: str(tmp_path), "CC": str(tmp_path / "no-such-compiler")})
    assert out["LIB"] == "False" and out["CLOSE"] == "True"
    # one warning where the kernel could have run, none where the CPU cannot run it anyway
    assert out["WARNINGS"] == ("1" if native.cpu_has_avx2() else "0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not has_kernel(), reason=f"no 4-bit kernel on this CPU: {native.unavailable_reason()}")
def test_every_strategy_decodes_through_the_kernel_with_lora_unmerged(tmp_path):
    from cpm_live.generation import CPMBeeBeamSearch, CPMBeeGreedy, CPMBeeSampling
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBee, CPMBeeConfig
    from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab

    tokenizer = CPMBeeTokenizer(build_tiny_vocab(tmp_path / "vocab.txt"))
    config = CPMBeeConfig.from_json_file(ROOT / "src" / "config" / "cpm-bee-tiny.json", int4=True,
                                         int4_compute_dtype="float32", vocab_size=tokenizer.vocab_size)
    model = CPMBee(config)
    add_lora(model, LoraSettings())
    strategies = {"greedy": (CPMBeeGreedy(model, tokenizer), {}),
                  "sampling": (CPMBeeSampling(model, tokenizer, seed=0), {}),
                  "beam": (CPMBeeBeamSearch(model, tokenizer), {"beam_size": 3})}
    for name, (generator, options) in strategies.items():
        def generate(generator=generator, options=options):
            generator.generate([{"input": "hello world", "<ans>": ""}], max_length=3, **options)

        assert KERNEL in paths(generate), name
    assert not any(getattr(m, "merged", False) for m in model.modules())  # peft's layers still add B(A(x))


def test_greedy_tokens_match_the_dequantize_path(tiny):
    """The QLoRA setting of the demo at a smaller size: the trained tiny int4 base plus a LoRA adapter
    with non-zero weights, greedy on held-out prompts, kernels vs dequantize-then-matmul."""
    from cpm_live.checkpoint import build_model
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBeeConfig
    from cpm_live.tokenizers import CPMBeeTokenizer

    config = CPMBeeConfig.from_json_file(tiny / "config-int4.json", int4_compute_dtype="float32")
    model = build_model(config, tiny / "base-int4.safetensors")
    add_lora(model, LoraSettings())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tokenizer = CPMBeeTokenizer(tiny / "vocab.txt")
    samples = [{"input": f"cat {w} dog", "question": "Which word is an animal?", "<ans>": ""}
               for w in ("red", "blue", "horse", "apple", "stone", "fish")]
    result = bench_decode.compare_greedy(model, tokenizer, samples, max_length=8)
    assert result["samples"] == 6 and result["compute_dtype"] == "float32"
    assert result["identical"] + result["differing_within_tie"] == 6, result["details"]
    assert result["max_abs_logit_diff"] < 1e-3  # rounding order only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no check failed on the way
        assert all(case["passed"] for case in gemv.checked_cases())
