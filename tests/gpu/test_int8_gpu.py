"""CUDA paths of the int8 base (skipped without CUDA): Linear8bit's CUDA kernels against the LLM.int8
reference of tests/unit/layers/test_linear8bit.py, and both engines (FSDP2, BMTrain's DistributedParameter4Int8
for the int8 weights) on real torchrun processes with tests/dist_scripts/int8_checks.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from cpm_live.layers import Linear8bit
from cpm_live.quant import int8 as qint8
from tests.dist_scripts import int8_checks
from tests.dist_scripts.launch import run_torchrun
from tests.int8_reference import reference_matmul, reference_quantize, rel

NPROC = max(1, min(2, torch.cuda.device_count()))


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["no-outliers", "threshold6"])
def test_linear8bit_cuda_matches_the_reference_and_cpu(threshold):
    torch.manual_seed(0)
    weight = torch.randn(80, 96)
    cpu = Linear8bit.from_weight(weight, threshold=threshold)
    cuda = Linear8bit.from_weight(weight.cuda(), threshold=threshold)
    ref_cb, ref_scb = reference_quantize(weight)
    assert (cuda.weight.cpu().int() - ref_cb.int()).abs().max() <= 1
    torch.testing.assert_close(cuda.SCB.cpu(), ref_scb, rtol=1e-6, atol=0)
    x = torch.randn(3, 7, 96)
    x[..., 5] *= 20
    xc = x.cuda().requires_grad_(True)
    y = cuda(xc)
    expected = reference_matmul(x, cuda.weight.cpu(), cuda.SCB.cpu(), threshold) / math.sqrt(96)
    assert rel(y.cpu(), expected) < 2e-3
    assert rel(y.cpu(), cpu(x)) < 5e-3  # two devices, one format
    grad = torch.randn_like(y)
    y.backward(grad)
    dense = qint8.dequantize(cuda.weight, cuda.SCB)
    torch.testing.assert_close(xc.grad, grad @ dense / math.sqrt(96), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("engine", ["torch", "bmtrain"])
def test_engines_shard_int8_and_lora_trains(engine, tmp_path):
    if engine == "bmtrain" and importlib.util.find_spec("bmtrain") is None:
        pytest.skip("bmtrain is not installed (pip install 'cpm_live[gpu]')")
    run_torchrun(Path(int8_checks.__file__), NPROC, "--out", str(tmp_path), "--engine", engine, "--device", "cuda")
    results = [json.loads((tmp_path / f"int8-rank{r}.json").read_text()) for r in range(NPROC)]
    for r in results:
        assert r["forward_max_diff"] < 1e-4
        assert r["weight_dtype"] == "torch.int8"
        torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=1e-3, atol=1e-3)
        assert r["losses"][-1] < r["losses"][0]
    assert results[0]["state_keys_equal"] and results[0]["int8_state_equal"]
